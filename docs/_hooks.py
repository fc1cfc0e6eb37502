"""MkDocs hooks for the lsx site (named in mkdocs.yml; not a page: files starting with "_" are excluded).

- The benchmark results stay where ``python -m benchmarks.*`` writes them (``benchmarks/results/``): the
  tables named in the navigation and every chart (``*.png``) are served from there under the same path, so
  a rerun of the benchmarks updates the site without copying anything into ``docs/``.
- The API pages import every backend. TensorFlow loaded before Triton (which ``lsx.torch`` brings in through
  torch) aborts the process with "LLVM ERROR: inconsistency in registered CommandLine options", so
  ``lsx.torch`` is imported first.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
#: served under the same relative path in the site as in the repository
MOUNTED = "benchmarks/results"


def nav_paths(nav: Any) -> list[str]:
    """Every page path named in a MkDocs ``nav`` (nested lists of ``{title: path or list}`` or paths)."""
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [path for value in nav.values() for path in nav_paths(value)]
    if isinstance(nav, list):
        return [path for item in nav for path in nav_paths(item)]
    return []


def mounted_files(nav: Any) -> list[str]:
    """The repository files under ``benchmarks/results/`` the site serves: the tables in ``nav``, every chart."""
    tables = [path for path in nav_paths(nav) if path.startswith(MOUNTED + "/")]
    charts = sorted(path.relative_to(ROOT).as_posix() for path in (ROOT / MOUNTED).glob("*.png"))
    return tables + charts


def on_config(config: Any) -> Any:
    if importlib.util.find_spec("torch") is not None:
        import lsx.torch  # noqa: F401 -- before TensorFlow, see the module docstring
    return config


def on_files(files: Files, config: Any) -> Files:
    for path in mounted_files(config["nav"]):
        source = ROOT / path
        if not source.is_file():
            raise FileNotFoundError(f"mkdocs.yml's nav names {path}, which is not in the repository")
        files.append(File.generated(config, path, abs_src_path=str(source)))
    return files
