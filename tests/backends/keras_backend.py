"""lsx.keras's ``keras.ops`` implementation (the one its loss classes use), on the active Keras backend."""

from __future__ import annotations

import numpy as np

REQUIRES = ("keras",)
DTYPES = ("float64", "float32")
MODES = ("eager",)


def run(logits, target, options, *, axis, dtype, mode):
    import keras

    import lsx.keras

    backend = keras.backend.backend()
    x = keras.ops.convert_to_tensor(logits.astype(dtype))
    # the target stays a NumPy array in its own dtype: lsx.keras checks its values before any conversion
    # (Keras-on-JAX without x64 has no int64 and Keras-on-torch no uint64 tensors)
    t = target
    options = dict(options)
    if "sample_weight" in options:  # per-element weights as a backend tensor in the logits' dtype
        options["sample_weight"] = keras.ops.convert_to_tensor(options["sample_weight"].astype(dtype))

    def total(x):
        value = lsx.keras.loss(x, t, axis=axis, **options)
        return keras.ops.sum(value), value

    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            summed, value = total(x)
        grad = tape.gradient(summed, x)
    elif backend == "jax":
        import jax

        (_, value), grad = jax.value_and_grad(total, has_aux=True)(x)
    else:  # torch
        x = x.detach().requires_grad_(True)
        summed, value = total(x)
        (grad,) = __import__("torch").autograd.grad(summed, x)
    assert keras.backend.standardize_dtype(value.dtype) == dtype, value.dtype
    assert keras.backend.standardize_dtype(grad.dtype) == dtype and tuple(grad.shape) == tuple(x.shape)
    return np.asarray(keras.ops.convert_to_numpy(value), np.float64), np.asarray(
        keras.ops.convert_to_numpy(grad), np.float64
    )
