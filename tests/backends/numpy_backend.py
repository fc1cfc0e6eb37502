"""lsx.numpy with its default engine (the Numba kernel when Numba is installed)."""

from __future__ import annotations

import numpy as np

REQUIRES = ("numpy",)
DTYPES = ("float64", "float32", "float16")
MODES = ("eager",)


def run(logits, target, options, *, axis, dtype, mode):
    import lsx.numpy

    x = logits.astype(dtype)
    value, grad = lsx.numpy.loss_and_grad(x, target, axis=axis, **options)
    assert isinstance(value, np.ndarray) and value.dtype == x.dtype, (type(value), getattr(value, "dtype", None))
    assert grad.dtype == x.dtype and grad.shape == x.shape
    alone = lsx.numpy.loss(x, target, axis=axis, **options)
    np.testing.assert_array_equal(alone, value)
    return value, grad
