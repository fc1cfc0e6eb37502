"""lsx.jax, eagerly and under ``jax.jit``: the loss and ``jax.grad`` of its sum, in float64 with x64 enabled.

Integer targets keep their dtype (with x64 enabled JAX holds every integer dtype, int8…uint64): eagerly the
caller's NumPy array itself is handed over (checked on the host), under ``jit`` a JAX array of the same
dtype is a traced argument (handled on the device). Probability targets take the logits' dtype; a
``sample_weight`` is a JAX array, traced under ``jit`` like a ``denominator``. Nothing is written into the
given arrays.
"""

from __future__ import annotations

import numpy as np

REQUIRES = ("jax",)
DTYPES = ("float64", "float32", "float16", "bfloat16")
MODES = ("eager", "compiled")


def run(logits, target, options, *, axis, dtype, mode):
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import lsx.jax

    x = jnp.asarray(logits, dtype=dtype)
    labels = np.issubdtype(target.dtype, np.integer)
    t = target if labels else jnp.asarray(target.astype(dtype))
    # per-element weights as a JAX array; under jit they and a denominator are traced arguments
    options = dict(options)
    arrays = {name: options.pop(name) for name in ("sample_weight", "denominator") if name in options}
    if "sample_weight" in arrays:
        arrays["sample_weight"] = jnp.asarray(arrays["sample_weight"])

    def total(x, t, arrays):
        value = lsx.jax.loss(x, t, axis=axis, **options, **arrays)
        return jnp.sum(value), value

    value_and_grad = jax.value_and_grad(total, has_aux=True)
    if mode == "compiled":
        t = jnp.asarray(t)
        assert t.dtype == target.dtype or not labels, (t.dtype, target.dtype)
        traced = {name: jnp.asarray(value) for name, value in arrays.items()}
        # one program: the loss with its gradient, and the loss alone (the path without autodiff)
        (_, value), grad, alone = jax.jit(
            lambda x, t, arrays: (*value_and_grad(x, t, arrays), lsx.jax.loss(x, t, axis=axis, **options, **arrays))
        )(x, t, traced)
        np.testing.assert_array_equal(np.asarray(alone, np.float64), np.asarray(value, np.float64))
    else:
        (_, value), grad = value_and_grad(x, t, arrays)
    assert isinstance(value, jax.Array) and value.dtype == x.dtype, (type(value), getattr(value, "dtype", None))
    assert isinstance(grad, jax.Array) and grad.dtype == x.dtype and grad.shape == x.shape
    return np.asarray(value, np.float64), np.asarray(grad, np.float64)
