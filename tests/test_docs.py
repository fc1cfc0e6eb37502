"""The documentation: relative links resolve, the pages' examples run, and ``mkdocs build --strict`` passes.

The build needs the ``docs`` extra and every backend (the API pages import them); without them that test is
skipped with the reason. CI builds the site in ``.ci/run`` as well.
"""

from __future__ import annotations

import doctest
import importlib.util
import os
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
#: served by docs/_hooks.py under the same path in the site as in the repository
MOUNTED = "benchmarks/results"
#: the front page: its links are relative to the repository root; its doctest runs through --doctest-glob
README = ROOT / "README.md"

_FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[ \t]*$", re.MULTILINE | re.DOTALL)
_CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _prose(text: str) -> str:
    """``text`` without fenced code blocks and code spans (links inside them are not links)."""
    return _CODE_SPAN.sub("", _FENCE.sub("", text))


def links(text: str) -> list[str]:
    """The targets of the Markdown links and images in ``text``, outside code."""
    return _LINK.findall(_prose(text))


def slug(heading: str) -> str:
    """The anchor MkDocs (Python-Markdown's toc) gives a heading."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def anchors(page: Path) -> set[str]:
    return {slug(match.group(2)) for match in _HEADING.finditer(_FENCE.sub("", page.read_text(encoding="utf-8")))}


def site_pages() -> list[Path]:
    """The pages of the site: docs/**/*.md but files starting with "_" (mkdocs.yml's exclude_docs)."""
    return sorted(path for path in DOCS.rglob("*.md") if not path.name.startswith("_"))


def _resolve_in_site(page: Path, target: str) -> Path | None:
    """The repository file a site page's relative link points to, or None."""
    relative = (page.parent / target).resolve().relative_to(DOCS.resolve()) if target else None
    if relative is None:
        return page
    candidate = DOCS / relative
    if candidate.exists():
        return candidate
    if relative.as_posix().startswith(MOUNTED + "/") and (ROOT / relative).is_file():
        return ROOT / relative
    return None


def broken_links(page: Path, *, in_site: bool) -> list[str]:
    problems = []
    for link in links(page.read_text(encoding="utf-8")):
        if re.match(r"^[a-z][a-z0-9+.-]*:", link, re.IGNORECASE) or link.startswith("//"):
            continue  # an address elsewhere: not checked offline
        target, _, anchor = link.partition("#")
        if in_site:
            try:
                resolved = _resolve_in_site(page, target)
            except ValueError:
                resolved = None  # a link out of docs/: not part of the site
        else:
            resolved = page.parent / target if target else page
            resolved = resolved if resolved.exists() else None
        if resolved is None:
            problems.append(f"{page.relative_to(ROOT)}: {link} (no such file)")
        elif anchor and resolved.suffix == ".md" and resolved.is_relative_to(DOCS) and anchor not in anchors(resolved):
            problems.append(f"{page.relative_to(ROOT)}: {link} (no heading with that anchor)")
    return problems


def test_link_finder_sees_links_and_skips_code():
    text = "See [a](a.md#x), ![chart](c.png) and [b][ref].\n\n```\n[not](code.md)\n```\n`[not](span.md)`"
    assert links(text) == ["a.md#x", "c.png"]
    assert slug("Choosing `spread`") == "choosing-spread"
    assert slug("Rules for the edge cases (every backend, eager and compiled)") == (
        "rules-for-the-edge-cases-every-backend-eager-and-compiled"
    )


def test_every_relative_link_resolves():
    pages = site_pages()
    assert pages, "no pages under docs/"
    problems = [problem for page in pages for problem in broken_links(page, in_site=True)]
    problems += broken_links(README, in_site=False)
    assert not problems, "broken links:\n" + "\n".join(problems)


_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def quick_starts() -> list[str]:
    """The front page's Python blocks that are scripts (the ``>>>`` ones are doctests)."""
    return [block for block in _PYTHON_BLOCK.findall(README.read_text(encoding="utf-8")) if ">>>" not in block]


@pytest.mark.parametrize(
    "page",
    [page for page in site_pages() if ">>>" in page.read_text(encoding="utf-8")],
    ids=lambda page: page.name,
)
def test_page_examples_run(page):
    result = doctest.testfile(
        str(page), module_relative=False, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False
    )
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {page.name} failed (printed above)"


@pytest.mark.parametrize("number", range(len(quick_starts())))
def test_front_page_quick_start_runs(number, tmp_path):
    """Each quick start runs as written, in a fresh process (as a reader would paste it)."""
    code = quick_starts()[number]
    imported = set(re.findall(r"^(?:import|from)\s+([A-Za-z_]\w*)", code, re.MULTILINE))
    missing = sorted(name for name in imported if not _installed(name))
    if missing:
        pytest.skip(f"quick start {number} needs {', '.join(missing)}")
    script = tmp_path / "quick_start.py"
    script.write_text(code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"quick start {number} of README.md failed:\n{code}\n{result.stderr[-4000:]}"


def test_rst_in_docstrings_becomes_markdown():
    pytest.importorskip("griffe", reason="griffe comes with the docs extra (mkdocstrings[python])")
    spec = importlib.util.spec_from_file_location("_griffe_rst", DOCS / "_griffe_rst.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = "Loss.\n\n.. math::\n\n    x = y\n\nSee :func:`lsx.jax.loss` and :mod:`~lsx.spec`."
    assert module.markdown(text) == "Loss.\n\n\n    x = y\n\nSee ``lsx.jax.loss`` and ``lsx.spec``."


def test_mkdocs_build_strict(tmp_path):
    needed = {"mkdocs": "docs", "material": "docs", "mkdocstrings_handlers.python": "docs"}
    needed |= {module: "all" for module in ("torch", "jax", "tensorflow", "keras", "transformers")}
    missing = sorted(f"{module} (extra {extra})" for module, extra in needed.items() if not _installed(module))
    if missing:
        pytest.skip("the site's build needs " + ", ".join(missing))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env |= {"NO_MKDOCS_2_WARNING": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
    site = tmp_path / "site"
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}"
    # the benchmark chart is served from where the benchmarks write it
    assert (site / "benchmarks" / "results" / "results.png").is_file()
    # the API sections are generated from the docstrings, their doctested examples included
    numpy_page = (site / "numpy" / "index.html").read_text(encoding="utf-8")
    assert 'id="lsx.numpy.loss_and_grad"' in numpy_page
    assert "1.4178" in numpy_page
    transformers_page = (site / "transformers" / "index.html").read_text(encoding="utf-8")
    assert 'id="lsx.transformers.apply"' in transformers_page
    assert 'id="lsx.transformers.loss_function"' in transformers_page
    for page in site.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        assert ".. math::" not in text and ":func:`" not in text, f"reStructuredText left in {page}"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a missing parent package
        return False


def test_front_page_is_short_and_starts_where_users_start():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) < 200, "README.md is the front page: the reference belongs under docs/"
    blocks = quick_starts()
    wanted = {
        "a PyTorch classifier": lambda code: "lsx.torch.CrossEntropyLoss" in code and ".backward()" in code,
        "an LM head with linear_loss and gradient accumulation": lambda code: "linear_loss(" in code
        and "denominator=" in code,
        "Keras fit": lambda code: "lsx.keras" in code and ".fit(" in code,
        "a jitted optax step": lambda code: "jax.jit" in code and "optax" in code,
    }
    missing = [name for name, found in wanted.items() if not any(found(code) for code in blocks)]
    assert not missing, f"README.md has no quick start for {', '.join(missing)}"
    # the CPU-only torch comes before the install command that would pull the CUDA build
    cpu = text.index("--index-url https://download.pytorch.org/whl/cpu")
    assert cpu < text.index('pip install -e ".[all')
    assert "lsx parity" in text and "python -m pytest" in text
