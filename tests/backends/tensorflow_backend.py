"""lsx.tensorflow, eager and compiled (``tf.function(jit_compile=True)``, i.e. XLA).

A ``sample_weight`` becomes a float64 tensor (lsx computes in float32 or float64, whatever the logits' dtype); under ``tf.function`` it and a ``denominator`` are
traced arguments (their values unknown at trace time, as in a training step).
"""

from __future__ import annotations

import numpy as np

REQUIRES = ("tensorflow",)
DTYPES = ("float64", "float32", "float16", "bfloat16")
MODES = ("eager", "compiled")


def run(logits, target, options, *, axis, dtype, mode):
    import tensorflow as tf

    import lsx.tensorflow

    x = tf.cast(tf.constant(logits), dtype)
    t = tf.constant(target)
    options = dict(options)
    arrays = {name: options.pop(name) for name in ("sample_weight", "denominator") if name in options}
    if "sample_weight" in arrays:
        arrays["sample_weight"] = tf.constant(arrays["sample_weight"], tf.float64)
    if "denominator" in arrays:
        arrays["denominator"] = tf.constant(arrays["denominator"], tf.float64)

    def value_and_grad(x, t, arrays):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = lsx.tensorflow.loss(x, t, axis=axis, **options, **arrays)
            total = tf.reduce_sum(value)
        return value, tape.gradient(total, x)

    if mode == "compiled":
        value_and_grad = tf.function(value_and_grad, jit_compile=True)
    value, grad = value_and_grad(x, t, arrays)
    assert isinstance(value, tf.Tensor) and value.dtype == x.dtype, (type(value), value.dtype)
    assert grad.dtype == x.dtype and tuple(grad.shape) == tuple(x.shape)
    return np.asarray(tf.cast(value, tf.float64)), np.asarray(tf.cast(grad, tf.float64))
