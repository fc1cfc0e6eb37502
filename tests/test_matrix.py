"""One matrix: backend × dtype × case × mode, value and gradient against the float64 reference (compiled, each
case runs in one of the two half-precision dtypes: see :func:`_compiled_in`)."""

from __future__ import annotations

import numpy as np
import pytest

from lsx import spec
from tests import backends
from tests.cases import CASES, assert_close, round_to_dtype

DTYPES = ("float64", "float32", "float16", "bfloat16")
MODES = ("eager", "compiled")


@pytest.mark.parametrize("name", backends.NAMES)
def test_required_backends_are_installed(name):
    if name in backends.required():
        assert backends.load(name) is not None, f"backend {name!r} is required by LSX_TEST_BACKENDS but unavailable"
    elif backends.load(name) is None:
        pytest.skip(f"{name} not installed")


def _compiled_in(dtype: str, position: int, driver) -> bool:
    """Every case runs compiled in float64 and float32; in the half-precision dtypes, each case once: float16
    takes the cases at even positions and bfloat16 the odd ones, unless the backend lacks one of the two (each
    compile costs about a second, and the traced program differs between the half dtypes only in the casts)."""
    half = ("float16", "bfloat16")
    if dtype not in half or not all(h in driver.DTYPES for h in half):
        return True
    return half[position % 2] == dtype


def _combinations():
    """Only the combinations that exist: each backend's own dtypes and modes, each case's dtypes. A skip then
    means something is missing (a framework not installed), never "does not apply"."""
    for name in backends.NAMES:
        driver = backends.driver(name)
        for dtype in DTYPES:
            if dtype not in driver.DTYPES:
                continue
            for position, case in enumerate(CASES):
                if not case.applies_to(dtype):
                    continue
                for mode in MODES:
                    if mode not in driver.MODES or (mode == "compiled" and not _compiled_in(dtype, position, driver)):
                        continue
                    yield pytest.param(name, dtype, case, mode, id=f"{name}-{dtype}-{case.id}-{mode}")


@pytest.mark.parametrize(("name", "dtype", "case", "mode"), list(_combinations()))
def test_backend_matches_reference(name, dtype, case, mode):
    driver = backends.load(name)
    if driver is None:
        pytest.skip(f"{name} not installed")
    logits, target, options = case.make()
    logits = round_to_dtype(logits, dtype)
    if case.readonly:
        logits.flags.writeable = False
    expected_loss = spec.reference_loss(logits, target, axis=case.axis, **options)
    expected_grad = spec.reference_grad(logits, target, axis=case.axis, **options)
    value, grad = driver.run(logits, target, options, axis=case.axis, dtype=dtype, mode=mode)
    assert_close(np.asarray(value), expected_loss, dtype, f"{name} loss")
    assert_close(np.asarray(grad), expected_grad, dtype, f"{name} gradient")
