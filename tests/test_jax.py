"""lsx.jax against optax, the T5X loss, the float64 reference, and JAX's transformations."""

from __future__ import annotations

import functools

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import lsx.jax  # noqa: E402
from lsx import spec  # noqa: E402
from tests.cases import assert_close  # noqa: E402


def _data(shape, k, seed=0, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=shape + (k,))
    labels = rng.integers(0, k, size=shape)
    return jnp.asarray(logits, dtype), jnp.asarray(labels)


# ----------------------------------------------------------------------------------------------------------
# Parity with optax and T5X
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("k", [2, 257])
def test_matches_optax_smooth_labels_recipe(alpha, k):
    x, y = _data((6,), k, seed=k)

    @jax.jit
    def recipe(x):
        return optax.softmax_cross_entropy(x, optax.smooth_labels(jax.nn.one_hot(y, k, dtype=x.dtype), alpha))

    def ours(x):
        return lsx.jax.loss(x, y, label_smoothing=alpha, convention="optax")

    np.testing.assert_allclose(ours(x), recipe(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(
        jax.jit(jax.grad(lambda x: ours(x).sum()))(x), jax.grad(lambda x: recipe(x).sum())(x), rtol=1e-12, atol=1e-12
    )


def test_class_mask_matches_optax_where():
    # optax: smooth over the valid classes only (K = their count), softmax over them only
    k = 9
    x, y = _data((5,), k, seed=3)
    mask = jnp.arange(k) % 3 != 2
    y = jnp.asarray([0, 1, 3, 4, 7])
    alpha = 0.2

    @jax.jit
    def recipe(x):
        labels = optax.smooth_labels(jax.nn.one_hot(y, k, dtype=x.dtype), alpha, where=mask)
        return optax.softmax_cross_entropy(x, jnp.where(mask, labels, 0), where=jnp.broadcast_to(mask, x.shape))

    def ours(x):
        return lsx.jax.loss(x, y, label_smoothing=alpha, class_mask=mask, convention="optax")

    np.testing.assert_allclose(ours(x), recipe(x), rtol=1e-12)
    grad = jax.grad(lambda x: ours(x).sum())(x)
    np.testing.assert_allclose(grad, jax.grad(lambda x: recipe(x).sum())(x), rtol=1e-12, atol=1e-14)
    assert np.all(np.asarray(grad)[:, ~np.asarray(mask)] == 0)
    # a traced mask gives the same numbers
    traced = jax.jit(lambda x, m: lsx.jax.loss(x, y, label_smoothing=alpha, class_mask=m, convention="optax"))
    np.testing.assert_allclose(traced(x, mask), ours(x), rtol=1e-12)


@functools.partial(jax.jit, static_argnames=("label_smoothing", "z_loss"))
def _t5x_loss(logits, targets, weights, label_smoothing, z_loss):
    """T5X's compute_weighted_cross_entropy, written out: (K−1)-spread soft targets, the target entropy
    subtracted as a normalising constant, z_loss·LSE² per token, weighted and summed."""
    k = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low = (1.0 - confidence) / (k - 1)
    normalizing_constant = -(confidence * jnp.log(confidence) + (k - 1) * low * jnp.log(low + 1e-20))
    soft_targets = jax.nn.one_hot(targets, k, dtype=logits.dtype) * (confidence - low) + low
    log_z = jax.nn.logsumexp(logits, axis=-1)
    token_loss = -jnp.sum(soft_targets * (logits - log_z[..., None]), axis=-1) - normalizing_constant
    token_loss = token_loss + z_loss * log_z**2
    return jnp.sum(token_loss * weights)


@pytest.mark.parametrize("z_loss", [0.0, 0.01])
@pytest.mark.parametrize("eps", [0.1, 0.4])
def test_matches_t5x_loss(eps, z_loss):
    x, y = _data((3, 4), 11, seed=5)
    ones = jnp.ones(y.shape)
    expected = _t5x_loss(x, y, ones, eps, z_loss)
    ours = functools.partial(lsx.jax.loss, label_smoothing=eps, z_loss=z_loss, convention="t5x")
    np.testing.assert_allclose(ours(x, y), expected, rtol=1e-12)
    np.testing.assert_allclose(
        jax.jit(jax.grad(ours))(x, y), jax.grad(_t5x_loss)(x, y, ones, eps, z_loss), rtol=1e-10, atol=1e-14
    )
    # T5X's own closed form: (1 + 2s·LSE)·softmax − q
    q = jax.nn.one_hot(y, 11) * (1 - eps - eps / 10) + eps / 10
    closed = (1 + 2 * z_loss * jax.nn.logsumexp(x, axis=-1))[..., None] * jax.nn.softmax(x) - q
    np.testing.assert_allclose(jax.grad(ours)(x, y), closed, rtol=1e-10, atol=1e-14)


def test_t5x_default_z_loss_and_minimum_zero():
    x, y = _data((4,), 6, seed=2)
    np.testing.assert_allclose(
        lsx.jax.loss(x, y, label_smoothing=0.1, convention="t5x"), _t5x_loss(x, y, jnp.ones(4), 0.1, 1e-4), rtol=1e-12
    )
    # KL form: logits equal to log q give the z-loss term only
    q = jax.nn.one_hot(y, 6) * (0.9 - 0.02) + 0.02
    at_target = jnp.log(q)
    assert abs(float(lsx.jax.loss(at_target, y, label_smoothing=0.1, convention="t5x", z_loss=0.0))) < 1e-12


# ----------------------------------------------------------------------------------------------------------
# JAX transformations
# ----------------------------------------------------------------------------------------------------------
OPTIONS = dict(label_smoothing=0.1, z_loss=1e-3, ignore_index=-1)


def test_jit_with_partial_and_static_argnames_equals_eager():
    x, y = _data((8,), 5, seed=7)
    y = y.at[2].set(-1)
    eager = lsx.jax.loss(x, y, **OPTIONS)
    np.testing.assert_allclose(eager, spec.reference_loss(np.asarray(x), np.asarray(y), **OPTIONS), rtol=1e-12)
    np.testing.assert_allclose(jax.jit(functools.partial(lsx.jax.loss, **OPTIONS))(x, y), eager, rtol=1e-12)
    static = jax.jit(lsx.jax.loss, static_argnames=tuple(OPTIONS))
    np.testing.assert_allclose(static(x, y, **OPTIONS), eager, rtol=1e-12)


def test_traced_option_gets_a_helpful_error():
    x, y = _data((3,), 4)
    with pytest.raises(TypeError, match="static option"):
        jax.jit(lsx.jax.loss)(x, y, label_smoothing=0.1)


def test_grad_and_value_and_grad_match_reference():
    x, y = _data((8,), 6, seed=11)
    y = y.at[0].set(-1)
    weight = jnp.linspace(0.5, 2.0, 6)
    opts = dict(OPTIONS, weight=weight, spread="others", normalize=True)
    f = functools.partial(lsx.jax.loss, **opts)
    value, grad = jax.value_and_grad(f)(x, y)
    ref_opts = dict(opts, weight=np.asarray(weight))
    np.testing.assert_allclose(value, spec.reference_loss(np.asarray(x), np.asarray(y), **ref_opts), rtol=1e-12)
    expected = spec.reference_grad(np.asarray(x), np.asarray(y), **ref_opts)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jax.jit(jax.grad(f))(x, y), expected, rtol=1e-10, atol=1e-14)


def test_vmap_equals_batched():
    x, y = _data((5, 7), 4, seed=13)
    y = y.at[1, 3].set(-1)
    per_row = jax.vmap(functools.partial(lsx.jax.loss, **OPTIONS))(x, y)  # mean over each row of 7
    expected = [spec.reference_loss(np.asarray(x[i]), np.asarray(y[i]), **OPTIONS) for i in range(5)]
    np.testing.assert_allclose(per_row, expected, rtol=1e-12)
    grads = jax.vmap(jax.grad(functools.partial(lsx.jax.loss, **OPTIONS)))(x, y)
    expected = [spec.reference_grad(np.asarray(x[i]), np.asarray(y[i]), **OPTIONS) for i in range(5)]
    np.testing.assert_allclose(grads, expected, rtol=1e-10, atol=1e-14)


@functools.partial(jax.jit, static_argnames=("eps", "normalize", "z_loss", "probs"))
def _naive(x, t, weight, *, eps, normalize, z_loss, probs):
    """The definition with a materialised q, differentiated by JAX itself (for gradients we do not write out)."""
    k = x.shape[-1]
    q = (1 - eps) * (t if probs else jax.nn.one_hot(t, k, dtype=x.dtype)) + eps / k
    lse = jax.nn.logsumexp(x, axis=-1)
    w_y = 1.0 if probs else weight[t]
    loss = jnp.sum(weight * q * (lse[..., None] - x), axis=-1) + z_loss * w_y * lse**2
    if normalize:
        loss = loss + jnp.sum(weight * q * jnp.log(q), axis=-1)
    return jnp.sum(loss)


@pytest.mark.parametrize("probs", [False, True], ids=["index", "probs"])
@pytest.mark.parametrize("normalize", [False, True])
def test_gradients_for_weight_and_probability_target(probs, normalize):
    x, y = _data((6,), 5, seed=17)
    t = jax.nn.softmax(jnp.asarray(np.random.default_rng(1).normal(size=(6, 5)))) if probs else y
    weight = jnp.linspace(0.5, 2.0, 5)
    kw = dict(eps=0.2, normalize=normalize, z_loss=0.01, probs=probs)

    def ours(x, t, weight):
        return lsx.jax.loss(x, t, label_smoothing=0.2, normalize=normalize, z_loss=0.01, weight=weight, reduction="sum")

    np.testing.assert_allclose(ours(x, t, weight), _naive(x, t, weight, **kw), rtol=1e-12)
    argnums = (0, 1, 2) if probs else (0, 2)
    got = jax.jit(jax.grad(ours, argnums=argnums))(x, t, weight)
    want = jax.grad(functools.partial(_naive, **kw), argnums=argnums)(x, t, weight)
    for g, e in zip(got, want):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_traced_weight_equals_concrete_weight():
    x, y = _data((6,), 5, seed=19)
    weight = jnp.asarray([1.0, 0.5, 2.0, 0.0, 1.5])
    concrete = lsx.jax.loss(x, y, weight=weight, label_smoothing=0.1)
    traced = jax.jit(lambda x, w: lsx.jax.loss(x, y, weight=w, label_smoothing=0.1))(x, weight)
    np.testing.assert_allclose(traced, concrete, rtol=1e-12)


def test_residuals_are_logits_labels_and_lse():
    x, y = _data((16,), 300, seed=23, dtype=jnp.float32)
    _, vjp = jax.vjp(lambda x: lsx.jax.loss(x, y, label_smoothing=0.1), x)
    large = [leaf for leaf in jax.tree_util.tree_leaves(vjp) if np.size(leaf) >= 300]
    assert len(large) == 1 and large[0].shape == x.shape and large[0].dtype == x.dtype


# ----------------------------------------------------------------------------------------------------------
# Axis and dtypes
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [0, 1, -1, 2])
def test_axis_anywhere(axis):
    rng = np.random.default_rng(axis + 10)
    x = rng.normal(size=(3, 4, 5))
    labels_shape = tuple(s for i, s in enumerate(x.shape) if i != axis % 3)
    y = rng.integers(0, x.shape[axis], size=labels_shape)
    opts = dict(label_smoothing=0.1, reduction="none")
    total, grad = jax.value_and_grad(lambda x: lsx.jax.loss(x, y, axis=axis, **opts).sum())(jnp.asarray(x))
    expected = spec.reference_loss(x, y, axis=axis, **opts)
    assert_close(lsx.jax.loss(jnp.asarray(x), y, axis=axis, **opts), expected, "float64", "loss")
    assert_close(total, expected.sum(), "float64", "summed loss")
    assert_close(grad, spec.reference_grad(x, y, axis=axis, **opts), "float64", "grad")
    moved = lsx.jax.loss(jnp.moveaxis(jnp.asarray(x), axis, -1), y, **opts)
    np.testing.assert_allclose(lsx.jax.loss(jnp.asarray(x), y, axis=axis, **opts), moved, rtol=1e-12)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_accumulates_in_float32(dtype):
    # 8192 classes: a sum of the smoothing term in bfloat16 would be off by far more than one output ulp
    x, y = _data((4,), 8192, seed=29, dtype=dtype)
    f = functools.partial(lsx.jax.loss, label_smoothing=0.1, z_loss=1e-4)
    value, grad = jax.jit(jax.value_and_grad(f))(x, y)
    assert value.dtype == jnp.dtype(dtype) and grad.dtype == jnp.dtype(dtype) and grad.shape == x.shape
    x64 = np.asarray(x.astype(jnp.float64))
    expected = spec.reference_loss(x64, np.asarray(y), label_smoothing=0.1, z_loss=1e-4)
    # float32 accumulation: the only error left is rounding the result to the output dtype
    assert abs(float(value) - float(expected)) <= float(jnp.finfo(dtype).eps) * abs(float(expected))
    assert_close(grad, spec.reference_grad(x64, np.asarray(y), label_smoothing=0.1, z_loss=1e-4), dtype, "grad")


# ----------------------------------------------------------------------------------------------------------
# Bad values
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [7, -3])
def test_bad_label_raises_eagerly_naming_it(bad):
    x, y = _data((4,), 5)
    y = y.at[2].set(bad)
    with pytest.raises(ValueError, match=f"label {bad}"):
        lsx.jax.loss(x, y)
    with pytest.raises(ValueError, match=f"label {bad}"):
        jax.grad(lsx.jax.loss)(x, y)  # the labels are concrete even while the logits are traced


@pytest.mark.parametrize("bad", [7, -3, 5])
def test_bad_label_under_jit_is_nan_never_finite(bad):
    x, y = _data((4,), 5)
    y = y.at[2].set(bad)
    per_element = jax.jit(functools.partial(lsx.jax.loss, label_smoothing=0.1, reduction="none"))(x, y)
    assert np.isnan(per_element[2]) and np.all(np.isfinite(np.delete(np.asarray(per_element), 2)))
    value, grad = jax.jit(jax.value_and_grad(functools.partial(lsx.jax.loss, label_smoothing=0.1)))(x, y)
    assert np.isnan(value) and np.all(np.isnan(grad[2]))


def test_label_on_masked_class_is_an_error_or_nan():
    x, y = _data((4,), 5)
    mask = jnp.asarray([True, True, True, False, True])
    y = y.at[1].set(3)
    with pytest.raises(ValueError, match="label 3"):
        lsx.jax.loss(x, y, class_mask=mask)
    traced = jax.jit(lambda x, y: lsx.jax.loss(x, y, class_mask=mask, reduction="none"))(x, y)
    assert np.isnan(traced[1]) and np.isfinite(traced[0])


def test_bad_weight_and_mask_values_raise_when_concrete():
    x, y = _data((4,), 5)
    with pytest.raises(ValueError, match=r"weight\[1\]"):
        lsx.jax.loss(x, y, weight=jnp.asarray([1.0, -1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="at least one valid class"):
        lsx.jax.loss(x, y, class_mask=jnp.zeros(5, bool))
    with pytest.raises(TypeError, match="boolean"):
        lsx.jax.loss(x, y, class_mask=jnp.ones(5))
    with pytest.raises(TypeError, match="floating"):
        lsx.jax.loss(y[:, None], y)


# ----------------------------------------------------------------------------------------------------------
# Integer labels of every dtype, for any K (nothing compared in a dtype that wraps)
# ----------------------------------------------------------------------------------------------------------
LABEL_CASES = [
    # dtype, K, ignore_index, labels (edge values of the dtype: uint8 156 is −100 wrapped, 255 is −1 wrapped)
    ("int8", 200, -100, [127, 0, -100, 5]),
    ("uint8", 200, -100, [156, 199, 0, 3]),
    ("uint8", 300, -100, [156, 255, 0, 3]),
    ("uint8", 300, 255, [156, 255, 254, 0]),
    ("int16", 70000, -1, [32767, -1, 0, 9]),
    ("uint16", 70000, -100, [65436, 65535, 0, 1]),
    ("int32", 300, -100, [299, -100, 0, 1]),
    ("uint32", 300, 7, [299, 7, 0, 1]),
    ("int64", 300, 2**40, [299, 2**40, 0, 1]),
    ("uint64", 300, 7, [299, 7, 0, 1]),
    ("uint64", 300, None, [299, 7, 0, 1]),
]


@pytest.mark.parametrize(("dtype", "k", "ignore_index", "values"), LABEL_CASES, ids=lambda v: str(v))
def test_labels_of_every_integer_dtype_for_any_k(dtype, k, ignore_index, values):
    x = jnp.asarray(np.random.default_rng(k).normal(size=(len(values), k)))
    y = np.asarray(values, dtype)
    opts = dict(label_smoothing=0.1, ignore_index=ignore_index, reduction="none")
    expected = spec.reference_loss(np.asarray(x), y, **opts)
    expected_grad = spec.reference_grad(np.asarray(x), y, **opts)
    f = functools.partial(lsx.jax.loss, **opts)
    for labels in (y, jnp.asarray(y)):
        assert jnp.asarray(labels).dtype == np.dtype(dtype)  # handed over unconverted
        np.testing.assert_allclose(f(x, labels), expected, rtol=1e-12)
        np.testing.assert_allclose(jax.jit(f)(x, labels), expected, rtol=1e-12)
        grad = jax.jit(jax.grad(lambda x, t: f(x, t).sum()))(x, labels)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(jax.vmap(f)(x[:, None], jnp.asarray(y)[:, None])[:, 0], expected, rtol=1e-12)
    mean = functools.partial(lsx.jax.loss, label_smoothing=0.1, ignore_index=ignore_index)
    np.testing.assert_allclose(
        jax.jit(mean)(x, jnp.asarray(y)), spec.reference_loss(np.asarray(x), y, **dict(opts, reduction="mean"))
    )


@pytest.mark.parametrize(
    ("dtype", "k", "ignore_index", "bad"),
    [("uint8", 200, -1, 255), ("uint8", 200, -100, 200), ("int8", 100, -100, 100), ("uint16", 300, -1, 65535)],
)
def test_out_of_range_narrow_labels_raise_eagerly_and_are_nan_under_jit(dtype, k, ignore_index, bad):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, k)))
    y = np.asarray([1, bad, 2], dtype)
    f = functools.partial(lsx.jax.loss, label_smoothing=0.1, ignore_index=ignore_index, reduction="none")
    with pytest.raises(ValueError, match=f"label {bad}"):
        f(x, y)
    traced = jax.jit(f)(x, jnp.asarray(y))  # the labels are traced: no check, NaN for that element
    assert np.isnan(traced[1]) and np.all(np.isfinite(np.asarray(traced)[[0, 2]]))
    grad = jax.jit(jax.grad(lambda x, t: f(x, t).sum()))(x, jnp.asarray(y))
    assert np.all(np.isnan(grad[1])) and np.all(np.isfinite(np.asarray(grad)[[0, 2]]))


_X32_SCRIPT = """
import numpy as np, jax, jax.numpy as jnp
import lsx.jax
from lsx import spec
assert not jax.config.jax_enable_x64
x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 5)), jnp.float32)
for bad in (2**32 + 1, 2**32 - 100, 2**40, 2**31, -(2**32) - 100):
    for dtype in ("int64", "uint64") if bad >= 0 else ("int64",):
        y = np.asarray([0, bad, 2], dtype)
        for f in (lsx.jax.loss, jax.jit(lambda x: lsx.jax.loss(x, y))):
            try:
                f(x, y) if f is lsx.jax.loss else f(x)
            except ValueError as error:
                assert f"label {bad}" in str(error), error
            else:
                raise AssertionError(f"label {bad} ({dtype}) was accepted")
# an ignore_index that int32 cannot hold still ignores exactly the elements equal to it
for dtype in ("int64", "uint64"):
    y = np.asarray([0, 2**40, 2], dtype)
    for f in (lsx.jax.loss, jax.jit(lambda x, y=y: lsx.jax.loss(x, y, ignore_index=2**40, reduction="none"))):
        got = f(x, y, ignore_index=2**40, reduction="none") if f is lsx.jax.loss else f(x)
        want = spec.reference_loss(np.asarray(x, np.float64), y, ignore_index=2**40, reduction="none")
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
        assert got[1] == 0
print("ok")
"""


def test_int64_labels_are_checked_before_32_bit_mode_narrows_them():
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "JAX_ENABLE_X64"}
    env["PYTHONPATH"] = root
    done = subprocess.run([sys.executable, "-c", _X32_SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ----------------------------------------------------------------------------------------------------------
# Under jit: concrete values are checked, traced ones give NaN
# ----------------------------------------------------------------------------------------------------------
def test_closed_over_numpy_weight_mask_and_labels_are_checked_under_jit():
    x, y = _data((4,), 5)
    negative = np.asarray([1.0, -1.0, 1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=r"weight\[1\]"):
        jax.jit(lambda x: lsx.jax.loss(x, y, weight=negative))(x)
    with pytest.raises(ValueError, match="at least one valid class"):
        jax.jit(lambda x: lsx.jax.loss(x, y, class_mask=np.zeros(5, bool)))(x)
    labels = np.asarray([0, 1, 7, 2])
    with pytest.raises(ValueError, match="label 7"):
        jax.jit(lambda x: lsx.jax.loss(x, labels))(x)
    mask = np.asarray([True, True, True, False, True])
    with pytest.raises(ValueError, match="label 3"):
        jax.jit(lambda x: lsx.jax.loss(x, np.asarray([0, 3, 1, 2]), class_mask=mask))(x)
    probs = np.full((4, 5), 0.2)
    with pytest.raises(ValueError, match="class 3"):
        jax.jit(lambda x: lsx.jax.loss(x, probs, class_mask=mask))(x)


def test_traced_bad_weight_gives_nan():
    x, y = _data((4,), 5)
    f = jax.jit(lambda x, w: lsx.jax.loss(x, y, weight=w, label_smoothing=0.1))
    assert np.isfinite(f(x, jnp.ones(5)))
    for bad in (-1.0, np.inf, np.nan):
        w = jnp.ones(5).at[1].set(bad)
        value, grad = jax.value_and_grad(lambda x, w=w: f(x, w))(x)
        assert np.isnan(value) and np.all(np.isnan(grad))


def test_traced_probability_mass_on_masked_class_is_nan():
    x, _ = _data((3,), 5)
    mask = jnp.asarray([True, True, True, False, True])
    t = jnp.full((3, 5), 0.25).at[:, 3].set(0.0).at[1, 3].set(0.1)
    with pytest.raises(ValueError, match="class 3"):
        lsx.jax.loss(x, t, class_mask=mask)
    f = jax.jit(lambda x, t, m: lsx.jax.loss(x, t, class_mask=m, label_smoothing=0.1, reduction="none"))
    for m in (mask, np.asarray(mask)):
        value = f(x, t, m)
        assert np.isnan(value[1]) and np.all(np.isfinite(np.asarray(value)[[0, 2]]))
        grad = jax.grad(lambda x, m=m: f(x, t, m).sum())(x)
        assert np.all(np.isnan(grad[1])) and np.all(np.isfinite(np.asarray(grad)[[0, 2]]))
    # concrete mask closed over, traced target
    g = jax.jit(lambda x, t: lsx.jax.loss(x, t, class_mask=np.asarray(mask), reduction="none"))
    assert np.isnan(g(x, t)[1])


# ----------------------------------------------------------------------------------------------------------
# Infinite logits, huge logits, probability targets off the simplex
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("jit", [False, True])
def test_positive_inf_logit_gives_nan_like_the_reference(eps, jit):
    x, y = _data((3,), 5)
    y = y.at[0].set(2).at[2].set(-100)
    x = x.at[0, 4].set(np.inf).at[2, 1].set(np.inf)  # row 2 is ignored: 0 loss, 0 gradient
    f = functools.partial(lsx.jax.loss, label_smoothing=eps, reduction="none")
    f = jax.jit(f) if jit else f
    grad = jax.grad(lambda x: f(x, y).sum())(x)
    expected = spec.reference_loss(np.asarray(x), np.asarray(y), label_smoothing=eps, reduction="none")
    assert np.isnan(expected[0])
    np.testing.assert_allclose(f(x, y), expected, rtol=1e-12)
    expected_grad = spec.reference_grad(np.asarray(x), np.asarray(y), label_smoothing=eps, reduction="none")
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-10, atol=1e-14)
    assert np.all(np.isnan(grad[0])) and np.all(np.asarray(grad[2]) == 0)


def test_zero_weight_against_negative_inf_logit_contributes_nothing():
    x, y = _data((4,), 5)
    x = x.at[:, 3].set(-np.inf)
    y = jnp.asarray([0, 1, 2, 4])
    weight = jnp.asarray([1.0, 0.5, 2.0, 0.0, 1.5])
    opts = dict(label_smoothing=0.1, weight=weight)
    value, grad = jax.jit(jax.value_and_grad(functools.partial(lsx.jax.loss, **opts)))(x, y)
    ref_opts = dict(opts, weight=np.asarray(weight))
    expected = spec.reference_loss(np.asarray(x), np.asarray(y), **ref_opts)
    assert np.isfinite(expected)
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    np.testing.assert_allclose(grad, spec.reference_grad(np.asarray(x), np.asarray(y), **ref_opts), atol=1e-14)


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_huge_float64_logits_without_z_loss_are_finite(kind):
    rng = np.random.default_rng(3)
    x = rng.normal(scale=1e155, size=(4, 5))
    t = rng.integers(0, 5, size=4) if kind == "index" else rng.dirichlet(np.ones(5), size=4)
    for opts in (dict(label_smoothing=0.1), dict(label_smoothing=0.1, normalize=True, weight=np.linspace(1, 2, 5))):
        expected = spec.reference_loss(x, t, **opts)
        assert np.isfinite(expected)
        value, grad = jax.jit(jax.value_and_grad(functools.partial(lsx.jax.loss, **opts)))(jnp.asarray(x), t)
        np.testing.assert_allclose(value, expected, rtol=1e-12)
        np.testing.assert_allclose(grad, spec.reference_grad(x, t, **opts), rtol=1e-10, atol=1e-14)


def _finite_differences(f, arg, step=1e-6):
    arg = np.asarray(arg, np.float64)
    out = np.zeros(arg.shape)
    for index in np.ndindex(arg.shape):
        up, down = arg.copy(), arg.copy()
        up[index] += step
        down[index] -= step
        out[index] = (float(f(jnp.asarray(up))) - float(f(jnp.asarray(down)))) / (2 * step)
    return out


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("spread", ["all", "others"])
def test_negative_probabilities_count_linearly_with_consistent_gradients(spread, normalize):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=(4, 5)))
    t = rng.dirichlet(np.ones(5), size=4)
    t[::2, 0] -= 0.5  # rows still sum to 1, with a negative entry
    t[::2, 1] += 0.5
    t[1, 2:] = [0.6, 0.0, 0.0]  # zero entries: the loss is linear in them too
    t[1, :2] = [0.3, 0.1]
    w = jnp.asarray(rng.uniform(0.5, 2.0, size=5))
    eps = 0.0 if normalize else 0.2  # with ε = 0 the KL form sees the negative q (NaN), and zeros
    opts = dict(label_smoothing=eps, spread=spread, z_loss=0.01, normalize=normalize, reduction="sum")

    def f(x, t, w):
        return lsx.jax.loss(x, t, weight=w, **opts)

    value = f(x, jnp.asarray(t), w)
    expected = spec.reference_loss(np.asarray(x), t, **dict(opts, weight=np.asarray(w)))
    if normalize:  # q·log q of a negative q: NaN, loss and gradients alike
        assert np.isnan(expected) and np.isnan(value)
        gx, gt, _ = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, jnp.asarray(t), w)
        # the entropy term does not depend on the logits: their gradient is the reference's, finite
        ref = spec.reference_grad(np.asarray(x), t, **dict(opts, weight=np.asarray(w)))
        np.testing.assert_allclose(gx, ref, rtol=1e-12, atol=1e-12)
        assert np.all(np.isfinite(ref)) and np.array_equal(np.isnan(gt), t < 0)
        t = t[1::2]  # the rows without negative entries still have finite, consistent gradients
        x = x[1::2]
        value = f(x, jnp.asarray(t), w)
        expected = spec.reference_loss(np.asarray(x), t, **dict(opts, weight=np.asarray(w)))
    np.testing.assert_allclose(value, expected, rtol=1e-12)
    gx, gt, gw = jax.jit(jax.grad(f, argnums=(0, 1, 2)))(x, jnp.asarray(t), w)
    np.testing.assert_allclose(
        gx, spec.reference_grad(np.asarray(x), t, **dict(opts, weight=np.asarray(w))), atol=1e-12
    )
    np.testing.assert_allclose(gx, _finite_differences(lambda v: f(v, jnp.asarray(t), w), x), rtol=1e-6, atol=1e-7)
    zero = t == 0
    if normalize:  # ∂(q log q)/∂q is −inf at q = 0: compare the other entries
        t_fd = _finite_differences(lambda v: f(x, jnp.where(zero, 0.0, v), w), np.where(zero, 0.5, t))
        np.testing.assert_allclose(np.asarray(gt)[~zero], t_fd[~zero], rtol=1e-6, atol=1e-7)
    else:
        np.testing.assert_allclose(gt, _finite_differences(lambda v: f(x, v, w), t), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(gw, _finite_differences(lambda v: f(x, jnp.asarray(t), v), w), rtol=1e-6, atol=1e-7)


def test_nan_probability_makes_its_element_and_its_gradients_nan():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(3, 4)))
    t = rng.dirichlet(np.ones(4), size=3)
    t[1, 2] = np.nan
    f = jax.jit(functools.partial(lsx.jax.loss, label_smoothing=0.1, reduction="none"))
    value = f(x, jnp.asarray(t))
    np.testing.assert_allclose(value, spec.reference_loss(np.asarray(x), t, label_smoothing=0.1, reduction="none"))
    assert np.isnan(value[1]) and np.all(np.isfinite(np.asarray(value)[[0, 2]]))
    gx, gt = jax.grad(lambda x, t: f(x, t).sum(), argnums=(0, 1))(x, jnp.asarray(t))
    ref = spec.reference_grad(np.asarray(x), t, label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(gx, ref, rtol=1e-10, atol=1e-14)
    assert np.all(np.isnan(gx[1])) and np.all(np.isnan(gt[1]))
    assert np.all(np.isfinite(np.asarray(gx)[[0, 2]])) and np.all(np.isfinite(np.asarray(gt)[[0, 2]]))


# ----------------------------------------------------------------------------------------------------------
# softcap, sample_weight, denominator
# ----------------------------------------------------------------------------------------------------------
def _plain_ce(x, y, eps):
    """Label-smoothed cross-entropy per element, written out (K-spread), for the hand-written formulas."""
    k = x.shape[-1]
    q = (1 - eps) * jax.nn.one_hot(y, k, dtype=x.dtype) + eps / k
    return jnp.sum(q * (jax.nn.logsumexp(x, axis=-1)[..., None] - x), axis=-1)


@pytest.mark.parametrize("jit", [False, True])
def test_softcap_against_the_formula(jit):
    x, y = _data((7,), 6, seed=31)
    x = x * 4
    c, eps = 3.0, 0.1
    f = functools.partial(lsx.jax.loss, label_smoothing=eps, softcap=c, reduction="none")
    f = jax.jit(f) if jit else f
    capped = c * jnp.tanh(x / c)
    np.testing.assert_allclose(f(x, y), _plain_ce(capped, y, eps), rtol=1e-12)
    cot = jnp.linspace(0.5, 1.5, 7)
    grad = jax.grad(lambda x: jnp.sum(cot * f(x, y)))(x)
    # chain rule: (1 − tanh²(x/c))·(softmax(x') − q)·cotangent
    q = (1 - eps) * jax.nn.one_hot(y, 6, dtype=x.dtype) + eps / 6
    expected = cot[:, None] * (jax.nn.softmax(capped, axis=-1) - q) * (1 - jnp.tanh(x / c) ** 2)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-14)
    # and it is not the uncapped loss
    assert not np.allclose(f(x, y), _plain_ce(x, y, eps))


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_softcap_with_huge_and_infinite_logits_and_a_class_mask(kind, dtype):
    rng = np.random.default_rng(5)
    x = rng.normal(scale=3.0, size=(5, 7))
    x[0, 1], x[1, 2], x[2, 0], x[3, 4] = 1e30, -np.inf, np.inf, -1e30
    x[:, 6] = 1e30  # a padding lane with a huge logit: masked, it must not leak mass after capping
    mask = np.ones(7, bool)
    mask[6] = False
    if kind == "index":
        t = np.asarray([1, 0, 2, 3, 5])
    else:
        t = rng.dirichlet(np.ones(6), size=5)
        t = np.concatenate([t, np.zeros((5, 1))], axis=1)
    opts = dict(label_smoothing=0.1, softcap=30.0, class_mask=mask, reduction="none")
    xd = np.asarray(jnp.asarray(x, dtype).astype(jnp.float64))
    expected = spec.reference_loss(xd, t, **opts)
    expected_grad = spec.reference_grad(xd, t, **opts)
    assert np.all(np.isfinite(expected)) and np.all(np.isfinite(expected_grad))
    tj = t if kind == "index" else jnp.asarray(t, dtype)
    xj = jnp.asarray(x, dtype)
    for f in (lsx.jax.loss, jax.jit(lsx.jax.loss, static_argnames=tuple(o for o in opts if o != "class_mask"))):
        grad = jax.grad(lambda x, f=f: f(x, tj, **opts).sum())(xj)
        assert_close(f(xj, tj, **opts), expected, dtype, "loss")
        assert_close(grad, expected_grad, dtype, "gradient")
        assert np.all(np.asarray(grad, np.float64)[:, 6] == 0)
        # ±inf and ±1e30 sit where tanh is flat: their gradient is exactly 0
        g = np.asarray(grad, np.float64)
        assert g[0, 1] == 0 and g[1, 2] == 0 and g[2, 0] == 0 and g[3, 4] == 0


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_softcap_gradient_is_the_derivative(kind):
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(scale=3.0, size=(4, 5)))
    t = jnp.asarray([0, 3, 1, 4]) if kind == "index" else jnp.asarray(rng.dirichlet(np.ones(5), size=4))
    w = jnp.asarray([1.0, 0.5, 2.0, 1.0, 1.5])
    sw = jnp.asarray([1.0, 0.75, 2.5, 0.5])  # > 0: the finite differences stay valid weights
    opts = dict(label_smoothing=0.2, softcap=2.0, z_loss=0.01, normalize=True, weight=w)

    def f(x, sw):
        return lsx.jax.loss(x, t, sample_weight=sw, **opts)

    gx, gsw = jax.grad(f, argnums=(0, 1))(x, sw)
    h = 1e-6
    for i, j in [(0, 0), (1, 3), (2, 2), (3, 4)]:
        e = jnp.zeros_like(x).at[i, j].set(h)
        np.testing.assert_allclose(gx[i, j], (f(x + e, sw) - f(x - e, sw)) / (2 * h), rtol=1e-6, atol=1e-9)
    for i in range(4):
        e = jnp.zeros_like(sw).at[i].set(h)
        np.testing.assert_allclose(gsw[i], (f(x, sw + e) - f(x, sw - e)) / (2 * h), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("jit", [False, True])
def test_sample_weight_against_the_formula(jit):
    x, y = _data((8,), 5, seed=37)
    y = y.at[2].set(-100)
    w = jnp.asarray([1.0, 0.5, 2.0, 0.0, 1.5])
    sw = jnp.asarray([1.0, 0.0, 3.0, 0.5, 2.0, 1.0, 0.25, 4.0])
    eps = 0.1
    f = functools.partial(lsx.jax.loss, label_smoothing=eps, weight=w)
    f = jax.jit(f, static_argnames=("reduction",)) if jit else f
    active = np.asarray(y) != -100
    yy = jnp.where(active, y, 0)
    q = (1 - eps) * jax.nn.one_hot(yy, 5, dtype=x.dtype) + eps / 5
    per = jnp.where(active, jnp.sum(w * q * (jax.nn.logsumexp(x, axis=-1)[:, None] - x), axis=-1), 0)
    np.testing.assert_allclose(f(x, y, sample_weight=sw, reduction="none"), sw * per, rtol=1e-12)
    np.testing.assert_allclose(f(x, y, sample_weight=sw, reduction="sum"), jnp.sum(sw * per), rtol=1e-12)
    d = jnp.sum(jnp.where(active, sw * w[yy], 0))
    mean = jnp.sum(sw * per) / d
    np.testing.assert_allclose(f(x, y, sample_weight=sw), mean, rtol=1e-12)
    # ∂mean/∂x = sw_i·(Σ w q·softmax − w∘q)/D;  ∂mean/∂sw_j = (ℓ_j − mean·w_{y_j})/D
    gx, gsw = jax.grad(lambda x, sw: f(x, y, sample_weight=sw), argnums=(0, 1))(x, sw)
    wq = w * q
    row = jnp.sum(wq, axis=-1, keepdims=True) * jax.nn.softmax(x, axis=-1) - wq
    np.testing.assert_allclose(gx, jnp.where(active[:, None], sw[:, None] * row / d, 0), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(gsw, jnp.where(active, (per - mean * w[yy]) / d, 0), rtol=1e-10, atol=1e-14)
    # with a caller's denominator: ∂mean/∂sw_j = ℓ_j / denominator, ∂mean/∂denominator = −mean/denominator
    den = jnp.asarray(20.0)
    value, (gsw, gden) = jax.value_and_grad(lambda sw, den: f(x, y, sample_weight=sw, denominator=den), argnums=(0, 1))(
        sw, den
    )
    np.testing.assert_allclose(value, jnp.sum(sw * per) / 20.0, rtol=1e-12)
    np.testing.assert_allclose(gsw, per / 20.0, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(gden, -value / 20.0, rtol=1e-10)


def test_sample_weight_probability_targets_and_vmap():
    rng = np.random.default_rng(41)
    x = jnp.asarray(rng.normal(size=(3, 4, 6)))
    t = jnp.asarray(rng.dirichlet(np.ones(6), size=(3, 4)))
    sw = jnp.asarray(rng.uniform(0, 2, size=(3, 4)))
    f = functools.partial(lsx.jax.loss, label_smoothing=0.1)
    per = jax.vmap(lambda x, t, sw: f(x, t, sample_weight=sw))(x, t, sw)
    for i in range(3):
        ref = spec.reference_loss(
            np.asarray(x[i]), np.asarray(t[i]), label_smoothing=0.1, sample_weight=np.asarray(sw[i])
        )
        np.testing.assert_allclose(per[i], ref, rtol=1e-12)
        # probability targets: D = Σ sample_weight
        plain = f(x[i], t[i], reduction="none")
        np.testing.assert_allclose(per[i], jnp.sum(sw[i] * plain) / jnp.sum(sw[i]), rtol=1e-12)


_COMPOSED = [
    dict(label_smoothing=0.1, softcap=5.0, sample_weight="r"),
    dict(label_smoothing=0.2, spread="others", weight="r", sample_weight="r", reduction="sum"),
    dict(label_smoothing=0.1, z_loss=0.01, normalize=True, softcap=2.0, sample_weight="r", reduction="none"),
    dict(label_smoothing=0.3, weight="r", class_mask="m", softcap=3.0, sample_weight="r", denominator=7.0),
    dict(convention="t5x", label_smoothing=0.1, reduction="mean", softcap=30.0, sample_weight="r", denominator=9.0),
    dict(label_smoothing=0.1, spread="others", ignore_index=None, denominator=5.0, empty_mean="zero"),
]


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("case", range(len(_COMPOSED)))
def test_new_options_compose_with_the_others(kind, case):
    rng = np.random.default_rng(case)
    k = 6
    x = rng.normal(scale=4.0, size=(3, 5, k))
    mask = np.ones(k, bool)
    mask[4] = False
    opts = dict(_COMPOSED[case])
    valid = mask if opts.get("class_mask") == "m" else np.ones(k, bool)
    if kind == "index":
        t = rng.choice(np.flatnonzero(valid), size=(3, 5))
        if opts.get("ignore_index", -100) is not None and opts.get("convention") != "t5x":
            t[0, 1] = t[2, 3] = -100
    else:
        t = np.where(valid, rng.dirichlet(np.ones(k), size=(3, 5)), 0.0)
        t /= t.sum(-1, keepdims=True)
    for name, value in list(opts.items()):
        if value == "r":
            opts[name] = rng.uniform(0.0, 2.0, size=(k,) if name == "weight" else (3, 5))
        elif value == "m":
            opts[name] = mask
    expected = spec.reference_loss(x, t, **opts)
    expected_grad = spec.reference_grad(x, t, **opts)
    arrays = {
        n: jnp.asarray(v) for n, v in opts.items() if n in ("weight", "class_mask", "sample_weight", "denominator")
    }
    static = {n: v for n, v in opts.items() if n not in arrays}
    f = lambda x, arrays: lsx.jax.loss(x, jnp.asarray(t), **static, **arrays).sum()
    for run in (jax.value_and_grad(f), jax.jit(jax.value_and_grad(f))):
        value, grad = run(jnp.asarray(x), arrays)
        np.testing.assert_allclose(value, np.sum(expected), rtol=1e-11)
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("softcap", [None, 10.0])
def test_gradient_accumulation_with_the_global_denominator(softcap):
    rng = np.random.default_rng(43)
    x = jnp.asarray(rng.normal(scale=3.0, size=(12, 7)))
    y = jnp.asarray(rng.integers(0, 7, size=12)).at[jnp.asarray([1, 5, 6, 10])].set(-100)
    sw = jnp.asarray(rng.uniform(0.5, 2.0, size=12))
    opts = dict(label_smoothing=0.1, softcap=softcap)
    big, big_grad = jax.value_and_grad(lambda x: lsx.jax.loss(x, y, sample_weight=sw, **opts))(x)
    count = jnp.sum(jnp.where(y != -100, sw, 0))  # the global denominator, a device scalar
    step = jax.jit(jax.value_and_grad(lambda x, y, sw, d: lsx.jax.loss(x, y, sample_weight=sw, denominator=d, **opts)))
    total, grads = 0.0, []
    for part in np.split(np.arange(12), 4):  # micro-batches of unequal ignored counts
        value, grad = step(x[part], y[part], sw[part], count)
        total, grads = total + value, grads + [grad]
    np.testing.assert_allclose(total, big, rtol=1e-13)
    np.testing.assert_allclose(jnp.concatenate(grads), big_grad, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("empty_mean", ["nan", "zero"])
def test_zero_denominator_follows_empty_mean_with_zero_gradient(empty_mean):
    x, y = _data((4,), 5)
    for d in (0.0, jnp.asarray(0.0)):
        for f in (lsx.jax.loss, jax.jit(lsx.jax.loss, static_argnames=("label_smoothing", "empty_mean"))):
            value, grad = jax.value_and_grad(
                lambda x, f=f, d=d: f(x, y, label_smoothing=0.1, denominator=d, empty_mean=empty_mean)
            )(x)
            assert np.isnan(value) if empty_mean == "nan" else value == 0
            assert np.all(np.asarray(grad) == 0)


def test_bad_softcap_sample_weight_and_denominator_values_raise():
    x, y = _data((4,), 5)
    for bad in (0.0, -1.0, np.nan, np.inf):
        with pytest.raises(ValueError, match="softcap"):
            lsx.jax.loss(x, y, softcap=bad)
    with pytest.raises(TypeError, match="softcap"):
        jax.jit(lambda x, c: lsx.jax.loss(x, y, softcap=c))(x, 1.0)
    for bad in (-1.0, np.nan, np.inf):
        sw = np.ones(4)
        sw[2] = bad
        with pytest.raises(ValueError, match=r"sample_weight\[\(2,\)\]"):
            lsx.jax.loss(x, y, sample_weight=sw)
        with pytest.raises(ValueError, match="sample_weight"):  # a NumPy array closed over by jit is concrete
            jax.jit(lambda x, sw=sw: lsx.jax.loss(x, y, sample_weight=sw))(x)
    with pytest.raises(ValueError, match=r"sample_weight must have the per-element loss's shape \(4,\)"):
        lsx.jax.loss(x, y, sample_weight=jnp.ones((4, 1)))
    with pytest.raises(TypeError, match="sample_weight"):
        lsx.jax.loss(x, y, sample_weight=np.ones(4, bool))
    for bad in (-1.0, np.nan, jnp.asarray(-2.0)):
        with pytest.raises(ValueError, match="denominator"):
            lsx.jax.loss(x, y, denominator=bad)
    with pytest.raises(ValueError, match="denominator"):
        lsx.jax.loss(x, y, denominator=4.0, reduction="sum")
    with pytest.raises(ValueError, match="denominator"):
        lsx.jax.loss(x, y, denominator=jnp.ones(2))


def test_traced_bad_sample_weight_and_denominator_give_nan():
    x, y = _data((4,), 5)
    f = jax.jit(lambda x, sw, d: lsx.jax.loss(x, y, sample_weight=sw, denominator=d, reduction="mean"))
    assert np.isfinite(f(x, jnp.ones(4), jnp.asarray(3.0)))
    for bad in (-1.0, np.nan, np.inf):
        value, grad = jax.value_and_grad(f)(x, jnp.ones(4).at[1].set(bad), jnp.asarray(3.0))
        assert np.isnan(value) and np.all(np.isnan(grad[1]))
        value, grad = jax.value_and_grad(f)(x, jnp.ones(4), jnp.asarray(bad))
        assert np.isnan(value) and np.all(np.isnan(grad))
    g = jax.jit(lambda x, sw: lsx.jax.loss(x, y, sample_weight=sw, reduction="none"))
    value = g(x, jnp.ones(4).at[1].set(-1.0))
    assert np.isnan(value[1]) and np.all(np.isfinite(np.asarray(value)[[0, 2, 3]]))


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_engine_entry_points_apply_softcap(kind):
    # _forward and _per_element_bwd, which the fused-linear engine calls on chunks of logits, cap inside
    from lsx.jax import _engine

    rng = np.random.default_rng(47)
    x = jnp.asarray(rng.normal(scale=5.0, size=(6, 5)))
    t = jnp.asarray(rng.integers(0, 5, size=6)) if kind == "index" else jnp.asarray(rng.dirichlet(np.ones(5), size=6))
    cfg = _engine.Config(
        kind=kind, label_smoothing=0.1, spread="all", z_loss=0.0, normalize=False, ignore_index=-100,
        reduction="none", empty_mean="nan", valid_count=5, compute="float64", softcap=4.0,
    )  # fmt: skip
    loss, lse = _engine._forward(cfg, x, t, None, None)
    opts = dict(label_smoothing=0.1, softcap=4.0, reduction="none")
    np.testing.assert_allclose(loss, spec.reference_loss(np.asarray(x), np.asarray(t), **opts), rtol=1e-12)
    np.testing.assert_allclose(lse, jax.nn.logsumexp(4.0 * jnp.tanh(x / 4.0), axis=-1), rtol=1e-12)
    cot = jnp.linspace(0.5, 2.0, 6)
    grad = _engine._per_element_bwd(cfg, (x, t, None, None, lse), cot)[0]
    expected = spec.reference_grad(np.asarray(x), np.asarray(t), cotangent=np.asarray(cot), **opts)
    np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------------------------
# Reliability, round 3: softcap and weight ranges, non-real denominators, a massless target at −inf
# (lsx.jax.loss and lsx.jax.linear_loss)
# --------------------------------------------------------------------------------------------------------
_X3 = np.array([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
_Y3 = np.array([2, 1, 0])


def _linear_inputs(logits):
    """hidden and kernel whose product is ``logits`` (hidden = the logits, kernel = identity)."""
    return jnp.asarray(logits), jnp.eye(logits.shape[1], dtype=jnp.asarray(logits).dtype)


@pytest.mark.parametrize("dtype, cap", [("float32", 1e-39), ("float32", 1e39), ("bfloat16", 1e39), ("float16", 1e39),
                                        ("float64", 1e-320), ("float64", 1e308)])
@pytest.mark.parametrize("jit", [False, True])
def test_softcap_outside_the_dtypes_range_raises(dtype, cap, jit):
    x = jnp.asarray(_X3, dtype)
    wrap = jax.jit if jit else (lambda f: f)
    with pytest.raises(ValueError, match="softcap"):
        wrap(lambda x: lsx.jax.loss(x, _Y3, softcap=cap))(x)
    h, kernel = _linear_inputs(x)
    with pytest.raises(ValueError, match="softcap"):
        wrap(lambda h: lsx.jax.linear_loss(h, kernel, _Y3, softcap=cap))(h)


@pytest.mark.parametrize("dtype, cap", [("float32", 1.2e-38), ("float32", 1e31), ("float64", 1e291)])
def test_softcap_at_the_ends_of_the_range_matches_the_reference(dtype, cap):
    x = jnp.asarray(_X3, dtype)
    expected = spec.reference_loss(np.asarray(x), _Y3, softcap=cap, label_smoothing=0.1)
    assert_close(jax.jit(lambda x: lsx.jax.loss(x, _Y3, softcap=cap, label_smoothing=0.1))(x), expected, dtype, "loss")
    grad = jax.grad(lambda x: lsx.jax.loss(x, _Y3, softcap=cap, label_smoothing=0.1))(x)
    assert_close(grad, spec.reference_grad(np.asarray(x), _Y3, softcap=cap, label_smoothing=0.1), dtype, "gradient")


@pytest.mark.parametrize("options", [{"sample_weight": np.array([1e39, 1.0, 2.0])},
                                     {"weight": np.array([1e39, 1, 1, 1, 1.0])},
                                     {"weight": np.full(5, 1e20), "sample_weight": np.full(3, 1e20)}])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_that_could_overflow_float32_raise_naming_them(options, reduction):
    x = jnp.asarray(_X3, jnp.float32)
    with pytest.raises(ValueError, match="weight"):
        lsx.jax.loss(x, _Y3, reduction=reduction, **options)
    with pytest.raises(ValueError, match="weight"):
        jax.jit(lambda x: lsx.jax.loss(x, _Y3, reduction=reduction, **options))(x)  # concrete, closed over
    h, kernel = _linear_inputs(x)
    with pytest.raises(ValueError, match="weight"):
        lsx.jax.linear_loss(h, kernel, _Y3, reduction=reduction, **options)
    # float64 holds them: the reference's numbers
    assert_close(lsx.jax.loss(jnp.asarray(_X3), _Y3, reduction=reduction, **options),
                 spec.reference_loss(_X3, _Y3, reduction=reduction, **options), "float64", "loss")


@pytest.mark.parametrize("bad", ["4", 4 + 0j, np.complex64(4), np.array(4 + 0j), np.array(True)])
def test_a_denominator_that_is_not_a_real_number_raises_naming_it(bad):
    x = jnp.asarray(_X3)
    with pytest.raises(ValueError, match="denominator"):
        lsx.jax.loss(x, _Y3, denominator=bad)
    with pytest.raises(ValueError, match="denominator"):
        lsx.jax.loss(x, _Y3, denominator=jnp.asarray(bad) if not isinstance(bad, str) else bad)
    h, kernel = _linear_inputs(x)
    with pytest.raises(ValueError, match="denominator"):
        lsx.jax.linear_loss(h, kernel, _Y3, denominator=bad)
    with pytest.raises(ValueError, match="denominator"):  # traced: the dtype is known all the same
        jax.jit(lambda d: lsx.jax.loss(x, _Y3, denominator=d))(jnp.asarray(4 + 0j))


@pytest.mark.parametrize("options", [{}, {"weight": np.array([0.5, 2.0, 1.0, 0.0, 3.0])},
                                     {"class_mask": np.array([True, True, True, True, False])},
                                     {"softcap": 3.0, "z_loss": 0.01, "normalize": True}])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("jit", [False, True])
def test_massless_target_at_minus_infinity_contributes_nothing(options, reduction, jit):
    """ε = 1 with spread="others" gives q_y = 0: x_y = −inf must not turn the loss into NaN."""
    x = _X3.copy()
    x[0, 2] = x[2, 0] = -np.inf
    opts = dict(label_smoothing=1.0, spread="others", reduction=reduction, **options)
    wrap = jax.jit if jit else (lambda f: f)
    value = wrap(lambda x: lsx.jax.loss(x, _Y3, **opts))(jnp.asarray(x))
    assert_close(value, spec.reference_loss(x, _Y3, **opts), "float64", "loss")
    grad = jax.grad(lambda x: jnp.sum(lsx.jax.loss(x, _Y3, **opts)))(jnp.asarray(x))
    assert_close(grad, spec.reference_grad(x, _Y3, **opts), "float64", "gradient")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("z_loss", [0.0, 0.01])
def test_massless_target_at_minus_infinity_weight_gradient(reduction, z_loss):
    x = _X3.copy()
    x[0, 2] = x[2, 0] = -np.inf
    w = np.array([0.5, 2.0, 1.0, 0.7, 3.0])
    opts = dict(label_smoothing=1.0, spread="others", reduction=reduction, z_loss=z_loss)
    grad = jax.jit(jax.grad(lambda w: lsx.jax.loss(jnp.asarray(x), _Y3, weight=w, **opts)))(jnp.asarray(w))
    f = lambda w: float(spec.reference_loss(x, _Y3, weight=w, **opts))
    numeric = np.array([(f(w + 1e-6 * e) - f(w - 1e-6 * e)) / 2e-6 for e in np.eye(5)])
    np.testing.assert_allclose(np.asarray(grad), numeric, rtol=1e-6)
