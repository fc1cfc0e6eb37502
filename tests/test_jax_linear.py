"""lsx.jax.linear_loss: the loss of hidden @ kernel + bias without the logits, against the float64 reference
(and lsx.jax.loss on the materialised logits), under jit, grad and vmap; residual and temporary memory."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import lsx.jax  # noqa: E402
from lsx import spec  # noqa: E402

N, H, V = 11, 6, 9  # 11 rows: chunks of 4 leave a remainder of 3
RTOL = 1e-12


def assert_rel(actual, expected, what, rtol=RTOL):
    """Equal to ``rtol`` relative to the largest magnitude of ``expected``, with the same NaN pattern."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN pattern {actual} vs {expected}"
    finite = np.isfinite(expected)
    assert np.array_equal(actual[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)]), what
    if finite.any():
        scale = max(1.0, float(np.max(np.abs(expected[finite]))))
        error = float(np.max(np.abs(actual[finite] - expected[finite])))
        assert error <= rtol * scale, f"{what}: max abs error {error:.3g} > {rtol:.1g}·{scale:.3g}"


def _problem(seed, kind="index", lead=(N,), masked=False, ignored=False, k=V):
    rng = np.random.default_rng(seed)
    h = rng.normal(size=lead + (H,))
    kernel = rng.normal(scale=0.7, size=(H, k))
    bias = rng.normal(size=k)
    valid = np.ones(k, bool)
    if masked:
        valid[-2:] = False
    if kind == "index":
        target = rng.integers(0, int(valid.sum()), size=lead)
        if ignored:
            target.reshape(-1)[::4] = -100
    else:
        target = np.where(valid, rng.dirichlet(np.ones(k), size=lead), 0.0)
        target = target / target.sum(-1, keepdims=True)
    return h, kernel, bias, target, (valid if masked else None)


# every option, alone and composed; "random" arrays are filled in per case
OPTIONS = {
    "plain": {},
    "smooth_all": dict(label_smoothing=0.1),
    "smooth_others": dict(label_smoothing=0.2, spread="others"),
    "weight": dict(weight="random", label_smoothing=0.1),
    "ignore": dict(label_smoothing=0.1, _ignored=True),
    "z_loss": dict(z_loss=1e-2, label_smoothing=0.1),
    "kl": dict(normalize=True, label_smoothing=0.3, spread="others"),
    "class_mask": dict(label_smoothing=0.1, _masked=True),
    "softcap": dict(softcap=1.5, label_smoothing=0.1),
    "softcap_mask": dict(softcap=1.5, label_smoothing=0.1, _masked=True),
    "sample_weight": dict(sample_weight="random"),
    "denominator": dict(denominator=7.0, label_smoothing=0.1),
    "composed": dict(
        label_smoothing=0.2,
        spread="others",
        weight="random",
        z_loss=1e-3,
        normalize=True,
        softcap=2.0,
        sample_weight="random",
        _masked=True,
        _ignored=True,
    ),
}
PROB_OPTIONS = (
    "plain",
    "smooth_all",
    "weight",
    "z_loss",
    "kl",
    "class_mask",
    "softcap_mask",
    "sample_weight",
    "composed",
)


def _case(name, kind, reduction, seed=0, lead=(N,)):
    raw = dict(OPTIONS[name])
    masked, ignored = raw.pop("_masked", False), raw.pop("_ignored", False) and kind == "index"
    h, kernel, bias, target, valid = _problem(seed, kind, lead, masked, ignored)
    rng = np.random.default_rng(seed + 1)
    if raw.get("weight") == "random":
        raw["weight"] = rng.uniform(0.2, 2.0, size=V)
        raw["weight"][1] = 0.0
    if raw.get("sample_weight") == "random":
        raw["sample_weight"] = rng.uniform(0.0, 3.0, size=lead)
        raw["sample_weight"].reshape(-1)[::3] = 0.0
    if valid is not None:
        raw["class_mask"] = valid
    if "denominator" in raw and reduction != "mean":
        del raw["denominator"]
    raw["reduction"] = reduction
    return h, kernel, bias, target, raw


def _reference(h, kernel, bias, target, opts, cotangent=None):
    """Loss and gradients (hidden, kernel, bias) from the float64 reference on the materialised logits."""
    logits = h @ kernel + bias
    value = spec.reference_loss(logits, target, **opts)
    dz = spec.reference_grad(logits, target, cotangent=cotangent, **opts)
    dz2 = dz.reshape(-1, dz.shape[-1])
    return value, (dz @ kernel.T, h.reshape(-1, h.shape[-1]).T @ dz2, dz2.sum(0))


def _loss_takes(opts) -> bool:
    names = inspect.signature(lsx.jax.loss).parameters
    return all(name in names for name in opts)


def _check(h, kernel, bias, target, opts, chunk_size, seed=0):
    reduction = opts["reduction"]
    rng = np.random.default_rng(seed + 2)
    cotangent = rng.normal(size=h.shape[:-1]) if reduction == "none" else np.asarray(1.7)

    def ours(h, kernel, bias):
        out = lsx.jax.linear_loss(h, kernel, target, bias=bias, chunk_size=chunk_size, **opts)
        return jnp.sum(out * cotangent), out

    (_, value), grads = jax.jit(jax.value_and_grad(ours, (0, 1, 2), has_aux=True))(h, kernel, bias)
    ref_value, ref_grads = _reference(h, kernel, bias, target, opts, cotangent)
    assert_rel(value, ref_value, "loss")
    for name, got, want in zip(("hidden", "kernel", "bias"), grads, ref_grads):
        assert_rel(got, want, f"d{name}")

    if _loss_takes(opts):  # the materialised path gives the same numbers

        def materialised(h, kernel, bias):
            out = lsx.jax.loss(h @ kernel + bias, target, **opts)
            return jnp.sum(out * cotangent), out

        (_, value2), grads2 = jax.value_and_grad(materialised, (0, 1, 2), has_aux=True)(h, kernel, bias)
        assert_rel(value, value2, "loss vs lsx.jax.loss")
        for name, got, want in zip(("hidden", "kernel", "bias"), grads, grads2):
            assert_rel(got, want, f"d{name} vs lsx.jax.loss")


# every option with "mean" and "none" (a random cotangent); "sum" where the mean's denominator hides nothing
LABEL_CASES = [(name, r) for name in OPTIONS for r in ("mean", "none")]
LABEL_CASES += [(name, "sum") for name in ("plain", "weight", "sample_weight", "composed")]
PROB_CASES = [(name, "mean") for name in PROB_OPTIONS] + [(name, "none") for name in ("weight", "kl", "composed")]


@pytest.mark.parametrize(("name", "reduction"), LABEL_CASES)
def test_labels_match_reference(name, reduction):
    h, kernel, bias, target, opts = _case(name, "index", reduction)
    _check(h, kernel, bias, target, opts, chunk_size=4)


@pytest.mark.parametrize(("name", "reduction"), PROB_CASES)
def test_probabilities_match_reference(name, reduction):
    h, kernel, bias, target, opts = _case(name, "probs", reduction, seed=5)
    _check(h, kernel, bias, target, opts, chunk_size=4)


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 12])
def test_chunk_sizes(chunk_size):
    h, kernel, bias, target, opts = _case("composed", "index", "mean", seed=3)
    _check(h, kernel, bias, target, opts, chunk_size=chunk_size)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_leading_dims(reduction):
    h, kernel, bias, target, opts = _case("composed", "index", reduction, seed=4, lead=(2, 3, 5))
    _check(h, kernel, bias, target, opts, chunk_size=4)
    out = lsx.jax.linear_loss(h, kernel, target, bias=bias, **opts)
    assert out.shape == ((2, 3, 5) if reduction == "none" else ())


def test_without_bias_and_default_chunk():
    h, kernel, _, target, _ = _problem(6)
    got = jax.jit(jax.value_and_grad(lambda h, k: lsx.jax.linear_loss(h, k, target, label_smoothing=0.1), (0, 1)))
    value, (dh, dk) = got(h, kernel)
    logits = h @ kernel
    assert_rel(value, spec.reference_loss(logits, target, label_smoothing=0.1), "loss")
    dz = spec.reference_grad(logits, target, label_smoothing=0.1)
    assert_rel(dh, dz @ kernel.T, "dhidden")
    assert_rel(dk, h.T @ dz, "dkernel")


def test_weight_sample_weight_and_probability_target_gradients():
    """Gradients with respect to the class weights, per-element weights and probabilities: the class
    weights and probabilities against lsx.jax.loss, sample_weight against (ℓ_j − mean·w_{y_j})/D."""
    h, kernel, bias, y, opts = _case("composed", "index", "mean", seed=7)
    w, sw = opts.pop("weight"), opts.pop("sample_weight")

    def ours(w, sw):
        return lsx.jax.linear_loss(h, kernel, y, bias=bias, weight=w, sample_weight=sw, chunk_size=4, **opts)

    value, (dw, dsw) = jax.jit(jax.value_and_grad(ours, (0, 1)))(w, sw)
    logits = h @ kernel + bias
    per = spec.reference_loss(logits, y, weight=w, **{**opts, "reduction": "none"})
    active = y != -100
    w_y = np.where(active, np.where(opts["class_mask"], w, 0)[np.where(active, y, 0)], 0)
    d = np.sum(sw * w_y)
    assert_rel(value, np.sum(per * sw) / d, "loss")
    assert_rel(dsw, (per - value * w_y) / d, "dsample_weight")
    materialised = (
        jax.grad(lambda w: lsx.jax.loss(logits, y, weight=w, **opts, sample_weight=sw))
        if _loss_takes({"sample_weight": 1})
        else None
    )
    if materialised is not None:
        assert_rel(dw, materialised(w), "dweight vs lsx.jax.loss")
    # without sample_weight the class-weight gradient is the engine's
    dw2 = jax.grad(lambda w: lsx.jax.linear_loss(h, kernel, y, bias=bias, weight=w, chunk_size=4, **opts))(w)
    assert_rel(dw2, jax.grad(lambda w: lsx.jax.loss(logits, y, weight=w, **opts))(w), "dweight")

    # probability targets, reduction "none" with a cotangent: dtarget and dweight
    h, kernel, bias, t, popts = _case("weight", "probs", "none", seed=8)
    w = popts.pop("weight")
    ct = np.random.default_rng(9).normal(size=N)
    dt, dw = jax.grad(
        lambda t, w: jnp.sum(ct * lsx.jax.linear_loss(h, kernel, t, bias=bias, weight=w, chunk_size=4, **popts)),
        (0, 1),
    )(t, w)
    dt2, dw2 = jax.grad(lambda t, w: jnp.sum(ct * lsx.jax.loss(h @ kernel + bias, t, weight=w, **popts)), (0, 1))(t, w)
    assert_rel(dt, dt2, "dtarget")
    assert_rel(dw, dw2, "dweight (probabilities)")


def test_vmap_jit_grad():
    rng = np.random.default_rng(10)
    hs = rng.normal(size=(3, N, H))
    ys = rng.integers(0, V, size=(3, N))
    _, kernel, bias, _, _ = _problem(10)

    def one(h, y, kernel, bias):
        return lsx.jax.linear_loss(h, kernel, y, bias=bias, label_smoothing=0.1, z_loss=1e-3, chunk_size=4)

    values, grads = jax.jit(jax.vmap(jax.value_and_grad(one, (0, 2, 3)), (0, 0, None, None)))(hs, ys, kernel, bias)
    for i in range(3):
        ref_value, ref_grads = _reference(hs[i], kernel, bias, ys[i], dict(label_smoothing=0.1, z_loss=1e-3))
        assert_rel(values[i], ref_value, "loss")
        for got, want in zip(grads, ref_grads):
            assert_rel(got[i], want, "gradient")
    # the batched gradient of the summed losses
    total = jax.grad(lambda k: jnp.sum(jax.vmap(one, (0, 0, None, None))(hs, ys, k, bias)))(kernel)
    assert_rel(
        total,
        sum(_reference(hs[i], kernel, bias, ys[i], dict(label_smoothing=0.1, z_loss=1e-3))[1][1] for i in range(3)),
        "dkernel",
    )


def test_softcap_huge_and_minus_inf_bias_with_class_mask():
    h, kernel, _, _, valid = _problem(11, masked=True)
    bias = np.zeros(V)
    bias[0], bias[1], bias[-1] = 1e30, -np.inf, 1e30  # the last class is masked: capped or not, no mass
    y = np.arange(N) % 7
    opts = dict(softcap=3.0, label_smoothing=0.1, class_mask=valid, reduction="mean")
    _check(h, kernel, bias, y, opts, chunk_size=4)


def test_plus_inf_logit_gives_nan_for_its_row():
    h, kernel, bias, y, _ = _problem(12)
    bias = bias.copy()
    bias[2] = np.inf
    out = lsx.jax.linear_loss(h, kernel, y, bias=bias, reduction="none", chunk_size=4)
    assert np.isnan(np.asarray(out)).all()
    h = h.copy()
    kernel = kernel.copy()
    kernel[:, 2] = 0.0
    h[0, 0] = np.inf  # row 0 only: h_0 · kernel has inf entries (NaN where kernel is 0)
    out = np.asarray(lsx.jax.linear_loss(h, kernel, y, reduction="none", chunk_size=4))
    assert np.isnan(out[0]) and np.isfinite(out[1:]).all()


def test_empty_mean_and_zero_denominator():
    h, kernel, bias, y, _ = _problem(13)
    ignored = np.full(N, -100)
    for empty, expected in (("nan", np.nan), ("zero", 0.0)):
        f = lambda h, e=empty: lsx.jax.linear_loss(h, kernel, ignored, bias=bias, empty_mean=e)
        value, dh = jax.value_and_grad(f)(h)
        assert_rel(value, expected, "empty mean")
        assert np.all(np.asarray(dh) == 0)
        g = lambda h, e=empty: lsx.jax.linear_loss(h, kernel, y, bias=bias, empty_mean=e, denominator=0.0)
        value, dh = jax.jit(jax.value_and_grad(g))(h)
        assert_rel(value, expected, "zero denominator")
        assert np.all(np.asarray(dh) == 0)
    # N = 0
    value, (dh, dk) = jax.value_and_grad(lambda h, k: lsx.jax.linear_loss(h, k, y[:0], reduction="sum"), (0, 1))(
        h[:0], kernel
    )
    assert float(value) == 0 and dh.shape == (0, H) and np.all(np.asarray(dk) == 0)


def test_gradient_accumulation_with_global_denominator():
    h, kernel, bias, y, opts = _case("weight", "index", "mean", seed=14)
    opts.pop("reduction")
    w = opts["weight"]
    count = float(np.sum(w[y]))
    whole = jax.grad(lambda k: lsx.jax.linear_loss(h, k, y, bias=bias, **opts), 0)(kernel)
    parts = sum(
        jax.grad(lambda k, s=s: lsx.jax.linear_loss(h[s], k, y[s], bias=bias, denominator=count, **opts))(kernel)
        for s in (slice(0, 4), slice(4, 9), slice(9, N))
    )
    assert_rel(parts, whole, "accumulated dkernel")


def test_traced_bad_label_gives_nan_and_concrete_one_raises():
    h, kernel, bias, y, _ = _problem(15)
    bad = y.copy()
    bad[3] = V + 2
    with pytest.raises(ValueError, match=f"label {V + 2}"):
        lsx.jax.linear_loss(h, kernel, bad, bias=bias)
    out = jax.jit(lambda y: lsx.jax.linear_loss(h, kernel, y, bias=bias, reduction="none", chunk_size=4))(bad)
    out = np.asarray(out)
    assert np.isnan(out[3]) and np.isfinite(np.delete(out, 3)).all()
    assert np.isnan(float(jax.jit(lambda y: lsx.jax.linear_loss(h, kernel, y, bias=bias))(bad)))
    # a traced negative sample weight gives NaN for its element
    sw = np.ones(N)
    sw[2] = -1.0
    out = jax.jit(lambda s: lsx.jax.linear_loss(h, kernel, y, sample_weight=s, reduction="none"))(sw)
    assert np.isnan(np.asarray(out)[2]) and np.isfinite(np.delete(np.asarray(out), 2)).all()


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64"])
def test_label_dtypes(dtype):
    h, kernel, bias, y, _ = _problem(16, k=200)
    y = (y % 120).astype(dtype)
    ref = spec.reference_loss(h @ kernel + bias, y, ignore_index=None)
    assert_rel(lsx.jax.linear_loss(h, kernel, y, bias=bias, ignore_index=None, chunk_size=4), ref, dtype)
    assert_rel(jax.jit(lambda y: lsx.jax.linear_loss(h, kernel, y, bias=bias, ignore_index=None))(y), ref, dtype)


def test_float32_and_bfloat16_inputs():
    h, kernel, bias, y, _ = _problem(17)
    ref_value, ref_grads = _reference(h, kernel, bias, y, dict(label_smoothing=0.1))
    for dtype, tol in ((jnp.float32, 2e-5), (jnp.bfloat16, 3e-2)):
        args = [jnp.asarray(a, dtype) for a in (h, kernel, bias)]
        value, grads = jax.value_and_grad(
            lambda h, k, b: lsx.jax.linear_loss(h, k, y, bias=b, label_smoothing=0.1, chunk_size=4), (0, 1, 2)
        )(*args)
        assert value.dtype == dtype and all(g.dtype == dtype for g in grads)
        assert_rel(value, ref_value, "loss", tol)
        for got, want in zip(grads, ref_grads):
            assert_rel(got, want, "gradient", tol)


def test_bad_inputs():
    h, kernel, bias, y, _ = _problem(18)
    for chunk in (0, -3, 2.5, True, "4"):
        with pytest.raises(ValueError, match="chunk_size"):
            lsx.jax.linear_loss(h, kernel, y, chunk_size=chunk)
    with pytest.raises(ValueError, match=r"kernel must have shape \(H, V\).*H = hidden.shape\[-1\] = 6"):
        lsx.jax.linear_loss(h, kernel.T, y)
    with pytest.raises(ValueError, match="kernel must have shape"):
        lsx.jax.linear_loss(h, kernel[0], y)
    with pytest.raises(ValueError, match=r"bias must have shape \(9,\)"):
        lsx.jax.linear_loss(h, kernel, y, bias=bias[:-1])
    with pytest.raises(ValueError, match=r"weight must have shape \(9,\)"):
        lsx.jax.linear_loss(h, kernel, y, weight=np.ones(8))
    with pytest.raises(ValueError, match="sample_weight must have the per-element loss's shape"):
        lsx.jax.linear_loss(h, kernel, y, sample_weight=np.ones(N + 1))
    with pytest.raises(ValueError, match="sample_weight must be finite"):
        lsx.jax.linear_loss(h, kernel, y, sample_weight=-np.ones(N))
    with pytest.raises(ValueError, match="target of integer labels must have shape"):
        lsx.jax.linear_loss(h, kernel, y[:-1])
    with pytest.raises(ValueError, match="denominator must be finite"):
        lsx.jax.linear_loss(h, kernel, y, denominator=-1.0)
    with pytest.raises(ValueError, match="denominator must be finite"):
        lsx.jax.linear_loss(h, kernel, y, denominator=np.asarray(np.inf))
    with pytest.raises(ValueError, match="softcap"):
        lsx.jax.linear_loss(h, kernel, y, softcap=0.0)
    with pytest.raises(TypeError, match="hidden must be floating point"):
        lsx.jax.linear_loss(h.astype(np.int32), kernel, y)
    with pytest.raises(ValueError, match="hidden must have shape"):
        lsx.jax.linear_loss(np.float64(1.0), kernel, y)
    with pytest.raises(TypeError, match="label_smoothing is a static option"):
        jax.jit(lambda e: lsx.jax.linear_loss(h, kernel, y, label_smoothing=e))(0.1)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_logits_sized_residual_or_temporary(reduction):
    n, hidden_size, k = 256, 8, 2048
    rng = np.random.default_rng(19)
    h = jnp.asarray(rng.normal(size=(n, hidden_size)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(hidden_size, k)), jnp.float32)
    y = jnp.asarray(rng.integers(0, k, size=n))

    def ours(h, kernel):
        return jnp.sum(lsx.jax.linear_loss(h, kernel, y, label_smoothing=0.1, reduction=reduction, chunk_size=16))

    def materialised(h, kernel):
        return jnp.sum(lsx.jax.loss(h @ kernel, y, label_smoothing=0.1, reduction=reduction))

    # residuals of the vjp: every saved array is O(N·H + H·V + N), none N·V
    _, vjp = jax.vjp(ours, h, kernel)
    sizes = [leaf.size for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "size")]
    assert sizes and max(sizes) <= max(n * hidden_size, hidden_size * k) < n * k
    _, vjp = jax.vjp(materialised, h, kernel)
    assert max(leaf.size for leaf in jax.tree.leaves(vjp) if hasattr(leaf, "size")) >= n * k  # the check can fail

    # compiled forward + backward: temporaries far below one logits-sized buffer (2 MiB here)
    logits_bytes = n * k * 4
    ours_temp = jax.jit(jax.value_and_grad(ours, (0, 1))).lower(h, kernel).compile().memory_analysis()
    theirs_temp = jax.jit(jax.value_and_grad(materialised, (0, 1))).lower(h, kernel).compile().memory_analysis()
    assert theirs_temp.temp_size_in_bytes >= logits_bytes
    assert ours_temp.temp_size_in_bytes <= logits_bytes // 4, ours_temp.temp_size_in_bytes
