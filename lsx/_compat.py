"""Import order between frameworks that share a process (nothing is imported here unless asked).

TensorFlow and Triton each link their own copy of LLVM. Loading Triton after TensorFlow registers LLVM's
command-line options a second time and aborts the interpreter (``LLVM ERROR: inconsistency in registered
CommandLine options``, SIGABRT: no exception to catch); the other order is safe. PyTorch's Dynamo
(``torch.compile``, also imported by ``lsx.torch``) imports Triton whenever it is installed, and PyPI's Linux
torch depends on it. So every lsx module that imports TensorFlow (or Keras, which may import it) first calls
:func:`load_triton_first`, and so does ``lsx.torch``: any order of lsx imports is safe. When TensorFlow was
imported before anything of lsx, ``lsx.torch`` calls :func:`block_triton` and warns.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

__all__ = ["TRITON_BLOCKED", "block_triton", "load_triton_first"]

#: the warning of ``lsx.torch`` imported into a process that loaded TensorFlow before Triton
TRITON_BLOCKED = (
    "TensorFlow was imported before Triton, and Triton is installed: loading Triton now would abort Python "
    "('LLVM ERROR: inconsistency in registered CommandLine options'; both link their own LLVM), and "
    "torch.compile imports it. lsx has made `import triton` raise ImportError in this process instead, so "
    "torch.compile runs without Triton (CPU code works; GPU kernels are unavailable). Fix: import lsx.torch "
    "or triton before tensorflow (and before keras on its TensorFlow backend), e.g. `import lsx.torch` or "
    "`import triton` at the top of the script; `import torch` alone does not load Triton."
)

#: Triton was tried and failed to import (a broken install loads no LLVM, so it cannot collide)
_triton_failed = False


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a broken install, or a module without __spec__
        return False


def load_triton_first() -> bool:
    """Import Triton now when it is installed and TensorFlow is not loaded yet; False when it is too late.

    Returns False only when Triton is installed and not loaded while TensorFlow is: importing it then would
    abort, so it is not attempted. A Triton that fails to import (a broken install, a missing driver library)
    is left alone: it loaded no LLVM, so it cannot collide with TensorFlow's.
    """
    global _triton_failed
    if "triton" in sys.modules or _triton_failed or not _installed("triton"):
        return True
    if "tensorflow" in sys.modules:
        return False
    try:
        importlib.import_module("triton")
    except Exception:  # any failure: no second LLVM was loaded, and whoever imports triton next sees the error
        _triton_failed = True
    return True


def block_triton() -> None:
    """Make ``import triton`` raise ImportError in this process (what a missing Triton does), instead of
    aborting it. Callers do this only when :func:`load_triton_first` returned False."""
    sys.modules["triton"] = None  # the import system's marker for "not importable"
