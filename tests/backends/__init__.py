"""Backend drivers for the cross-backend matrix.

Each module ``tests/backends/<name>_backend.py`` defines:

- ``REQUIRES``: the modules it imports (the backend is unavailable when one is missing),
- ``DTYPES``: the dtypes it runs, a subset of float64/float32/float16/bfloat16,
- ``MODES``: ``("eager",)`` or ``("eager", "compiled")``,
- ``run(logits, target, options, *, axis, dtype, mode) -> (loss, grad)``: float64 NumPy logits (already
  rounded to ``dtype``) in, the loss and ∂Σloss/∂logits out as NumPy arrays. It asserts that the framework
  returned the input's dtype and array type, and may ``pytest.skip`` a combination it does not support,
  with the reason.

``LSX_TEST_BACKENDS`` (comma-separated) names backends that must be available: a missing one fails the run
instead of being skipped, so CI cannot pass by silently skipping a framework.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

NAMES = ("numpy", "numpy-pure", "torch", "jax", "tensorflow", "keras")


def required() -> set[str]:
    """Backends named by ``LSX_TEST_BACKENDS`` (``all`` names every one)."""
    names = {name.strip() for name in os.environ.get("LSX_TEST_BACKENDS", "").split(",") if name.strip()}
    unknown = names - set(NAMES) - {"all"}
    if unknown:
        raise ValueError(f"LSX_TEST_BACKENDS names unknown backends {sorted(unknown)}; known: {', '.join(NAMES)}")
    return set(NAMES) if "all" in names else names


def driver(name: str) -> ModuleType:
    """The driver module itself, whether or not its framework is installed (drivers import it lazily)."""
    return importlib.import_module(f"tests.backends.{name.replace('-', '_')}_backend")


def load(name: str) -> ModuleType | None:
    """The driver module, or None when its framework is not installed (or the driver does not exist yet)."""
    module_name = f"tests.backends.{name.replace('-', '_')}_backend"
    if importlib.util.find_spec(module_name) is None:
        return None
    driver = importlib.import_module(module_name)
    if any(importlib.util.find_spec(req) is None for req in driver.REQUIRES):
        return None
    return driver
