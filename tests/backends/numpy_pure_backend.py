"""lsx.numpy forced onto the pure-NumPy engine (what runs when Numba is not installed)."""

from __future__ import annotations

import numpy as np

from tests.backends.numpy_backend import as_dtype

REQUIRES = ("numpy",)
DTYPES = ("float64", "float32", "float16", "bfloat16")
MODES = ("eager",)


def run(logits, target, options, *, axis, dtype, mode):
    import lsx.numpy

    x = as_dtype(logits, dtype)
    saved = lsx.numpy._numba_kernel
    lsx.numpy._numba_kernel = lambda: None
    try:
        value, grad = lsx.numpy.loss_and_grad(x, target, axis=axis, **options)
        alone = lsx.numpy.loss(x, target, axis=axis, **options)
    finally:
        lsx.numpy._numba_kernel = saved
    assert isinstance(value, np.ndarray) and value.dtype == x.dtype
    assert grad.dtype == x.dtype and grad.shape == x.shape
    np.testing.assert_array_equal(alone.astype(np.float64), value.astype(np.float64))  # bfloat16 NaN compares unequal
    return value.astype(np.float64), grad.astype(np.float64)
