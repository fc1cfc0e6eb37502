"""lsx.numpy with its default engine (the Numba kernel when Numba is installed)."""

from __future__ import annotations

import numpy as np

REQUIRES = ("numpy",)
DTYPES = ("float64", "float32", "float16", "bfloat16")
MODES = ("eager",)


def as_dtype(logits: np.ndarray, dtype: str) -> np.ndarray:
    """The logits in ``dtype`` (bfloat16: ml_dtypes' NumPy dtype), read-only when the given ones are.

    The target (labels of any integer dtype, or probabilities), weight and class mask are handed over as
    given: NumPy has every dtype, and lsx.numpy never writes into its inputs.
    """
    if dtype == "bfloat16":
        import ml_dtypes

        x = logits.astype(ml_dtypes.bfloat16)
    else:
        x = logits.astype(dtype)
    x.flags.writeable = logits.flags.writeable
    return x


def run(logits, target, options, *, axis, dtype, mode):
    import lsx.numpy

    x = as_dtype(logits, dtype)
    value, grad = lsx.numpy.loss_and_grad(x, target, axis=axis, **options)
    assert isinstance(value, np.ndarray) and value.dtype == x.dtype, (type(value), getattr(value, "dtype", None))
    assert grad.dtype == x.dtype and grad.shape == x.shape
    alone = lsx.numpy.loss(x, target, axis=axis, **options)
    np.testing.assert_array_equal(alone.astype(np.float64), value.astype(np.float64))  # bfloat16 NaN compares unequal
    return value.astype(np.float64), grad.astype(np.float64)
