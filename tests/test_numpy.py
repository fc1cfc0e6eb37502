"""lsx.numpy on both engines (the Numba kernel and the pure-NumPy engine): edge values, dtypes, aliasing."""

from __future__ import annotations

import numpy as np
import pytest

import lsx.numpy
from lsx import spec
from tests.cases import assert_close

ENGINES = ["kernel", "pure"]


@pytest.fixture(params=ENGINES)
def engine(request, monkeypatch):
    """Run lsx.numpy on the Numba kernel (skipped without Numba) or forced onto the pure-NumPy engine."""
    if request.param == "kernel":
        if lsx.numpy._numba_kernel() is None:
            pytest.skip("numba not installed")
    else:
        monkeypatch.setattr(lsx.numpy, "_numba_kernel", lambda: None)
    return request.param


def _check(x, target, dtype="float64", **options):
    value, grad = lsx.numpy.loss_and_grad(x, target, **options)
    x64 = np.asarray(x).astype(np.float64)
    assert_close(value, spec.reference_loss(x64, target, **options), dtype, "loss")
    assert_close(grad, spec.reference_grad(x64, target, **options), dtype, "gradient")
    np.testing.assert_array_equal(lsx.numpy.loss(x, target, **options), value)
    return value, grad


def _probabilities(rng, n, k):
    return rng.dirichlet(np.ones(k), size=n)


# --------------------------------------------------------------------------------------------------------
# A coefficient of 0 contributes exactly 0
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_huge_float64_logits_without_z_loss_are_finite(engine, kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 6)) * 1e155  # L² overflows float64; the z-loss of 0 must not turn it into 0·∞
    target = rng.integers(0, 6, 5) if kind == "index" else _probabilities(rng, 5, 6)
    for options in ({"label_smoothing": 0.1}, {"label_smoothing": 0.1, "reduction": "none", "normalize": True}):
        value, grad = _check(x, target, **options)
        assert np.isfinite(value).all() and np.isfinite(grad).all()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weight_zero_classes_at_minus_infinity_contribute_nothing(engine, dtype):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 6)).astype(dtype)
    weight = np.array([1.0, 0.0, 2.0, 0.0, 1.0, 0.5])
    x[:, [1, 3]] = -np.inf
    y = np.array([0, 1, 2, 3])  # rows 1 and 3 target a weight-0 class whose logit is −inf
    for options in ({"label_smoothing": 0.1}, {"label_smoothing": 0.2, "spread": "others", "reduction": "none"}):
        value, grad = _check(x, y, dtype, weight=weight, **options)
        assert np.isfinite(value).all() and np.isfinite(grad).all()
    probs = _probabilities(rng, 4, 6)  # mass on the weight-0 classes too
    value, grad = _check(x, probs, dtype, weight=weight, label_smoothing=0.1, normalize=True, reduction="none")
    assert np.isfinite(value).all() and np.isfinite(grad).all()


# --------------------------------------------------------------------------------------------------------
# Probability targets off the simplex: contributes wherever w·q ≠ 0, linearly
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nan_probability_makes_its_element_nan(engine, dtype):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 5)).astype(dtype)
    probs = _probabilities(rng, 4, 5)
    probs[1, 3] = np.nan
    for options in ({}, {"label_smoothing": 0.1, "weight": rng.uniform(0.5, 2, 5), "normalize": True}):
        value, grad = _check(x, probs, dtype, reduction="none", **options)
        assert np.isnan(value[1]) and np.isnan(grad[1]).all()
        assert np.isfinite(value[[0, 2, 3]]).all() and np.isfinite(grad[[0, 2, 3]]).all()
    assert np.isnan(lsx.numpy.loss(x, probs))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1, "weight": "random", "z_loss": 0.01},
        {"label_smoothing": 0.2, "spread": "others", "reduction": "sum"},
    ],
)
def test_negative_probabilities_count_linearly_and_the_gradient_is_the_derivative(engine, options):
    rng = np.random.default_rng(3)
    options = dict(options)
    if options.get("weight") == "random":
        options["weight"] = rng.uniform(0.5, 2.0, 5)
    x = rng.normal(size=(6, 5))
    probs = _probabilities(rng, 6, 5)
    probs[::2, 0] -= 0.5
    probs[::2, 1] += 0.5
    _, grad = _check(x, probs, **options)
    # finite differences of the engine's own loss (a sum or mean is a scalar)
    total = (lambda v: float(np.sum(v))) if options.get("reduction") == "none" else float
    step = 1e-6
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        bump = np.zeros_like(x)
        bump[index] = step
        high = total(lsx.numpy.loss(x + bump, probs, **options))
        low = total(lsx.numpy.loss(x - bump, probs, **options))
        numeric[index] = (high - low) / (2 * step)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_negative_probability_in_the_kl_form_is_nan(engine):
    x = np.zeros((2, 3))
    probs = np.array([[1.2, -0.2, 0.0], [0.5, 0.5, 0.0]])
    value, _ = _check(x, probs, normalize=True, reduction="none")
    assert np.isnan(value[0]) and np.isfinite(value[1])


# --------------------------------------------------------------------------------------------------------
# +inf logits
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_positive_infinite_logit_gives_nan(engine, dtype, kind):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(3, 6)).astype(dtype)
    x[1, 2] = np.inf
    target = np.array([0, 4, 5]) if kind == "index" else _probabilities(rng, 3, 6)
    mask = np.array([True] * 5 + [False])
    if kind == "probs":
        target[:, 5] = 0
    for options in ({}, {"label_smoothing": 0.1, "class_mask": mask, "weight": np.linspace(0.5, 1.5, 6)}):
        options = {**options, "reduction": "none"}
        target_here = np.where(target == 5, 3, target) if kind == "index" and "class_mask" in options else target
        value, grad = _check(x, target_here, dtype, **options)
        assert np.isnan(value[1]) and np.isfinite(value[[0, 2]]).all()
        assert np.isnan(grad[1, :5]).all() and np.isfinite(grad[[0, 2]]).all()
        if "class_mask" in options:
            assert grad[1, 5] == 0


# --------------------------------------------------------------------------------------------------------
# Integer labels of every dtype, any K
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("label_dtype", "k", "ignore_index", "labels"),
    [
        ("int8", 200, -100, [127, 0, -100, 5]),
        ("uint8", 300, -100, [156, 255, 0, 299 % 256]),  # 156 is −100 wrapped: a real label here
        ("uint8", 300, 255, [156, 255, 254, 0]),
        ("int16", 70000, -1, [32767, -1, 0, 12]),
        ("uint16", 70000, -100, [65436, 65535, 0, 1]),
        ("int32", 300, -100, [299, -100, 0, 7]),
        ("uint32", 300, 7, [299, 7, 0, 1]),
        ("int64", 300, 2**40, [299, 2**40, 0, 1]),
        ("uint64", 300, 7, [299, 7, 0, 1]),
    ],
)
def test_labels_of_every_integer_dtype(engine, label_dtype, k, ignore_index, labels):
    rng = np.random.default_rng(5)
    y = np.array(labels).astype(label_dtype)
    x = rng.normal(size=(4, k)).astype(np.float32)
    value, grad = _check(x, y, "float32", label_smoothing=0.1, ignore_index=ignore_index, reduction="none")
    ignored = np.array(labels) == ignore_index
    assert (value[ignored] == 0).all() and (value[~ignored] > 0).all()
    assert (grad[ignored] == 0).all()


@pytest.mark.parametrize(
    ("label_dtype", "k", "bad"),
    [("uint8", 150, 156), ("int8", 100, -1), ("uint16", 1000, 65436), ("uint64", 10, 2**64 - 1), ("int16", 10, 10)],
)
def test_out_of_range_label_names_its_value(engine, label_dtype, k, bad):
    y = np.array([0, bad], dtype=label_dtype)
    with pytest.raises(ValueError, match=f"label {bad}, which is outside"):
        lsx.numpy.loss_and_grad(np.zeros((2, k), np.float32), y)


# --------------------------------------------------------------------------------------------------------
# out= aliasing an input
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_out_aliasing_the_probability_target(engine, dtype):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(7, 2100)).astype(dtype)
    probs = _probabilities(rng, 7, 2100).astype(dtype)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3, "normalize": True}
    expected_value, expected_grad = lsx.numpy.loss_and_grad(x, probs.copy(), **options)
    target = probs.copy()
    value, grad = lsx.numpy.loss_and_grad(x, target, out=target, **options)
    assert grad is target
    np.testing.assert_array_equal(value, expected_value)
    np.testing.assert_array_equal(grad, expected_grad)
    # overlapping by a row: out starts one row into the target's memory
    buffer = np.concatenate([probs, np.zeros((1, 2100), dtype)])
    value, grad = lsx.numpy.loss_and_grad(x, buffer[:-1], out=buffer[1:], **options)
    np.testing.assert_array_equal(value, expected_value)
    np.testing.assert_array_equal(grad, expected_grad)


def test_out_overlapping_the_labels_and_the_class_mask(engine):
    rng = np.random.default_rng(7)
    n, k = 6, 40
    x = rng.normal(size=(n, k))
    memory = np.zeros(n * k)
    out = memory.reshape(n, k)
    labels = memory.view(np.int64)[k : k + n]  # the labels live in row 1 of out
    labels[:] = rng.integers(0, k, n)
    expected_value, expected_grad = lsx.numpy.loss_and_grad(x, labels.copy(), label_smoothing=0.1)
    value, grad = lsx.numpy.loss_and_grad(x, labels, label_smoothing=0.1, out=out)
    assert grad is out
    np.testing.assert_array_equal(value, expected_value)
    np.testing.assert_array_equal(grad, expected_grad)

    memory = np.zeros(n * k)
    out = memory.reshape(n, k)
    mask = memory.view(np.bool_)[8 * k : 9 * k]  # the class mask lives in row 1 of out
    mask[:] = True
    mask[3] = False
    y = np.where(rng.integers(0, k, n) == 3, 0, rng.integers(0, k, n))
    weight = rng.uniform(0.5, 2.0, k)
    expected_value, expected_grad = lsx.numpy.loss_and_grad(x, y, label_smoothing=0.1, class_mask=mask.copy())
    value, grad = lsx.numpy.loss_and_grad(x, y, label_smoothing=0.1, class_mask=mask, out=out)
    np.testing.assert_array_equal(value, expected_value)
    np.testing.assert_array_equal(grad, expected_grad)
    weighted = weight.copy()
    expected = lsx.numpy.loss_and_grad(x, y, weight=weight, label_smoothing=0.1)
    out = weighted.reshape(1, k).repeat(n, 0)
    value, grad = lsx.numpy.loss_and_grad(x, y, weight=out[0], label_smoothing=0.1, out=out)
    np.testing.assert_array_equal(value, expected[0])
    np.testing.assert_array_equal(grad, expected[1])


# --------------------------------------------------------------------------------------------------------
# Read-only inputs
# --------------------------------------------------------------------------------------------------------
def _read_only(array, how, path):
    array = np.ascontiguousarray(array)
    if how == "flag":
        copy = array.copy()
        copy.flags.writeable = False
        return copy
    if how == "frombuffer":
        return np.frombuffer(array.tobytes(), dtype=array.dtype).reshape(array.shape)
    if how == "memmap":
        array.tofile(path)
        return np.memmap(path, dtype=array.dtype, mode="r", shape=array.shape)
    if how == "jax":
        jax = pytest.importorskip("jax")
        jax.config.update("jax_enable_x64", True)
        return np.asarray(jax.numpy.asarray(array))
    raise ValueError(how)


@pytest.mark.parametrize("how", ["flag", "frombuffer", "memmap", "jax"])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_read_only_inputs(engine, how, kind, dtype, tmp_path):
    rng = np.random.default_rng(8)
    n, k = 9, 2500  # more than one block of the kernel
    x = rng.normal(size=(n, k)).astype(dtype)
    mask = rng.random(k) < 0.9
    weight = rng.uniform(0.5, 2.0, k)
    if kind == "index":
        target = rng.choice(np.flatnonzero(mask), n)
        target[::4] = -100
    else:
        target = np.zeros((n, k))
        target[:, mask] = _probabilities(rng, n, int(mask.sum()))
        target = target.astype(dtype)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3}
    arrays = [_read_only(a, how, tmp_path / f"input{i}.bin") for i, a in enumerate((x, target, weight, mask))]
    assert not any(a.flags.writeable for a in arrays)
    for extra in ({}, {"weight": arrays[2], "class_mask": arrays[3]}):
        value, grad = lsx.numpy.loss_and_grad(arrays[0], arrays[1], **options, **extra)
        expected_value, expected_grad = lsx.numpy.loss_and_grad(
            x, target, **options, **({} if not extra else {"weight": weight, "class_mask": mask})
        )
        np.testing.assert_array_equal(value, expected_value)
        np.testing.assert_array_equal(grad, expected_grad)
        np.testing.assert_array_equal(lsx.numpy.loss(arrays[0], arrays[1], **options, **extra), value)
        assert_close(grad, spec.reference_grad(x.astype(np.float64), target, **options, **extra), dtype, "grad")
    np.testing.assert_array_equal(arrays[0], x)  # never written


# --------------------------------------------------------------------------------------------------------
# Half precision: float16 and ml_dtypes bfloat16
# --------------------------------------------------------------------------------------------------------
def _half(name):
    if name == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.float16


@pytest.mark.parametrize("name", ["float16", "bfloat16"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_half_precision_logits(engine, name, kind):
    half = _half(name)
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, 33)).astype(half)
    target = rng.integers(0, 33, 6) if kind == "index" else _probabilities(rng, 6, 33).astype(half)
    options = {"label_smoothing": 0.1, "z_loss": 1e-3, "weight": rng.uniform(0.5, 2.0, 33)}
    value, grad = lsx.numpy.loss_and_grad(x, target, **options)
    assert value.dtype == x.dtype and grad.dtype == x.dtype and grad.shape == x.shape
    x64, t64 = x.astype(np.float64), np.asarray(target).astype(np.float64 if kind == "probs" else np.int64)
    tolerance = "bfloat16" if name == "bfloat16" else "float16"
    assert_close(value.astype(np.float64), spec.reference_loss(x64, t64, **options), tolerance, "loss")
    assert_close(grad.astype(np.float64), spec.reference_grad(x64, t64, **options), tolerance, "gradient")
    # accumulated in float32: the float32 computation rounded once to the half dtype
    value32, grad32 = lsx.numpy.loss_and_grad(x.astype(np.float32), t64, **options)
    np.testing.assert_array_equal(value, value32.astype(half))
    np.testing.assert_array_equal(grad, grad32.astype(half))
    np.testing.assert_array_equal(lsx.numpy.loss(x, target, **options), value)
    out = np.zeros_like(x)
    _, given = lsx.numpy.loss_and_grad(x, target, out=out, **options)
    assert given is out
    np.testing.assert_array_equal(out, grad)
    logits = x.copy()
    _, in_place = lsx.numpy.loss_and_grad(logits, target, out=logits, **options)
    assert in_place is logits
    np.testing.assert_array_equal(logits, grad)


@pytest.mark.parametrize("dtype", ["int32", "int64", "bool", "complex64", "float8_e4m3fn"])
def test_unsupported_logits_dtype_says_what_is_supported(dtype):
    if dtype.startswith("float8"):
        dtype = getattr(pytest.importorskip("ml_dtypes"), dtype)
    x = np.zeros((2, 3)).astype(dtype)
    with pytest.raises(TypeError, match=r"logits must be float16, bfloat16 \(ml_dtypes\), float32 or float64, got"):
        lsx.numpy.loss(x, np.array([0, 1]))


# --------------------------------------------------------------------------------------------------------
# softcap, sample_weight, denominator
def _log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("in_place", [False, True])
def test_softcap_against_the_formula(engine, dtype, in_place):
    rng = np.random.default_rng(0)
    n, k, c = 7, 300, 3.0
    x64 = rng.standard_normal((n, k)) * 6
    y = rng.integers(0, k, n)
    tanh = np.tanh(x64 / c)
    capped = c * tanh
    logp = _log_softmax(capped)
    expected_loss = -logp[np.arange(n), y].mean()
    onehot = np.eye(k)[y]
    expected_grad = (np.exp(logp) - onehot) * (1 - tanh**2) / n
    x = x64.astype(dtype)
    value, grad = lsx.numpy.loss_and_grad(x, y, softcap=c, out=x if in_place else None)
    assert_close(value, expected_loss, dtype, "loss")
    assert_close(grad, expected_grad, dtype, "gradient")
    if in_place:
        assert grad is x
    assert_close(lsx.numpy.loss(x64.astype(dtype), y, softcap=c), expected_loss, dtype, "loss alone")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_softcap_with_huge_and_infinite_logits_and_a_class_mask(engine, dtype, kind):
    rng = np.random.default_rng(1)
    n, k = 6, 9
    x = rng.standard_normal((n, k)) * 3
    x[0, 2] = 1e30
    x[1, 3] = -1e30
    x[2, 4] = np.inf  # capped to c: finite, unlike without softcap
    x[3, :] = -np.inf  # a whole row at −inf becomes −c everywhere
    x[4, 6] = np.nan  # a NaN on a masked class stays out
    mask = np.ones(k, bool)
    mask[[6, 8]] = False
    if kind == "index":
        target = np.array([0, 1, 2, 3, 4, 5])
    else:
        target = np.where(mask, _probabilities(rng, n, k), 0)
        target /= target.sum(axis=1, keepdims=True)
    options = {"label_smoothing": 0.1, "softcap": 30.0, "class_mask": mask, "z_loss": 1e-3}
    value, grad = _check(x.astype(dtype), target, dtype, **options)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert np.all(grad[:, ~mask] == 0)
    assert grad[2, 4] == 0 and grad[0, 2] == 0  # 1 − tanh² = 0 up there


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sample_weight_against_the_formula(engine, dtype):
    rng = np.random.default_rng(2)
    n, k = 9, 6
    x64 = rng.standard_normal((n, k))
    y = rng.integers(0, k, n)
    y[3] = -100
    w = rng.uniform(0.5, 2, k)
    sw = rng.uniform(0, 3, n)
    sw[1] = 0.0
    logp = _log_softmax(x64)
    active = y != -100
    yy = np.where(active, y, 0)
    per = np.where(active, -w[yy] * logp[np.arange(n), yy], 0)
    d = np.sum(np.where(active, sw * w[yy], 0))
    rows = np.where(active, sw * w[yy], 0)[:, None] * (np.exp(logp) - np.eye(k)[yy]) / d
    value, grad = lsx.numpy.loss_and_grad(x64.astype(dtype), y, weight=w, sample_weight=sw)
    assert_close(value, np.sum(sw * per) / d, dtype, "loss")
    assert_close(grad, rows, dtype, "gradient")
    none = lsx.numpy.loss(x64.astype(dtype), y, weight=w, sample_weight=sw, reduction="none")
    assert_close(none, sw * per, dtype, "per-element loss")
    value, grad = lsx.numpy.loss_and_grad(x64.astype(dtype), y, weight=w, sample_weight=sw, denominator=4.0)
    assert_close(value, np.sum(sw * per) / 4.0, dtype, "loss over the caller's denominator")
    assert_close(grad, rows * d / 4.0, dtype, "gradient over the caller's denominator")


SPEC2_OPTIONS = [
    {"softcap": 2.0},
    {"softcap": 5.0, "label_smoothing": 0.2, "spread": "others", "weight": "random", "z_loss": 1e-2},
    {"softcap": 3.0, "label_smoothing": 0.1, "class_mask": "random", "normalize": True},
    {"sample_weight": "random", "label_smoothing": 0.1, "weight": "random", "ignore_index": 1},
    {"sample_weight": "random", "label_smoothing": 0.3, "spread": "others", "normalize": True, "reduction": "sum"},
    {"sample_weight": "random", "softcap": 4.0, "class_mask": "random", "reduction": "none", "z_loss": 1e-3},
    {"denominator": 13.0, "label_smoothing": 0.1, "weight": "random"},
    {"denominator": 7.0, "sample_weight": "random", "softcap": 1.5, "class_mask": "random", "normalize": True},
    {"denominator": 0.0, "label_smoothing": 0.1},
    {"denominator": 0.0, "empty_mean": "zero", "sample_weight": "random"},
]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("options", SPEC2_OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_new_options_composed_against_the_reference(engine, dtype, kind, options):
    rng = np.random.default_rng(3)
    shape, axis = (3, 5, 4), 1  # class axis in the middle: sample_weight is shaped (3, 4)
    k = shape[axis]
    options = dict(options)
    mask = None
    if options.get("class_mask") == "random":
        mask = np.array([True, False, True, True, False])
        options["class_mask"] = mask
    if options.get("weight") == "random":
        options["weight"] = rng.uniform(0.2, 2, k)
    if options.get("sample_weight") == "random":
        sw = rng.uniform(0, 2, (3, 4))
        sw[0, 1] = 0.0
        sw.flags.writeable = False
        options["sample_weight"] = sw
    x = rng.standard_normal(shape) * 4
    if kind == "index":
        labels = np.array([0, 2, 3])[rng.integers(0, 3, (3, 4))]
        if options.get("ignore_index") == 1:
            labels[0, 0] = 1
        target = labels
    else:
        if options.get("ignore_index") is not None:
            pytest.skip("ignore_index is for labels")
        p = rng.dirichlet(np.ones(k), size=(3, 4))
        if mask is not None:
            p = np.where(mask, p, 0)
            p /= p.sum(-1, keepdims=True)
        target = np.moveaxis(p, -1, axis)
    value, grad = _check(x.astype(dtype), target, dtype, axis=axis, **options)
    if options.get("denominator") == 0.0:
        assert np.all(grad == 0)
        assert np.isnan(value) if options.get("empty_mean", "nan") == "nan" else value == 0


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_softcap_gradient_is_the_derivative(engine, kind):
    rng = np.random.default_rng(4)
    n, k = 3, 5
    x = rng.standard_normal((n, k)) * 4
    target = rng.integers(0, k, n) if kind == "index" else _probabilities(rng, n, k)
    options = {"softcap": 2.5, "label_smoothing": 0.2, "z_loss": 1e-2, "sample_weight": rng.uniform(0.5, 2, n)}
    _, grad = lsx.numpy.loss_and_grad(x, target, **options)
    step = 1e-6
    numeric = np.zeros_like(x)
    for i in range(n):
        for c in range(k):
            up, down = x.copy(), x.copy()
            up[i, c] += step
            down[i, c] -= step
            numeric[i, c] = (lsx.numpy.loss(up, target, **options) - lsx.numpy.loss(down, target, **options)) / (
                2 * step
            )
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("softcap", [None, 10.0])
def test_gradient_accumulation_with_the_global_denominator(engine, softcap):
    rng = np.random.default_rng(5)
    n, k, parts = 24, 11, 4
    x = rng.standard_normal((n, k)) * 3
    y = rng.integers(0, k, n)
    y[[2, 9, 17]] = -100
    w = rng.uniform(0.5, 2, k)
    options = {"label_smoothing": 0.1, "weight": w, "softcap": softcap}
    value, grad = lsx.numpy.loss_and_grad(x, y, **options)
    total = float(np.sum(np.where(y != -100, w[np.where(y != -100, y, 0)], 0)))
    accumulated_value = 0.0
    accumulated = np.zeros_like(x)
    for rows in np.array_split(np.arange(n), parts):
        v, g = lsx.numpy.loss_and_grad(x[rows], y[rows], denominator=total, **options)
        accumulated_value += float(v)
        accumulated[rows] += g
    np.testing.assert_allclose(accumulated_value, value, rtol=1e-13)
    np.testing.assert_allclose(accumulated, grad, rtol=1e-13, atol=1e-17)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"softcap": -1.0}, "softcap"),
        ({"softcap": 0.0}, "softcap"),
        ({"softcap": float("inf")}, "softcap"),
        ({"sample_weight": np.array([1.0, -1.0, 1.0])}, "sample_weight"),
        ({"sample_weight": np.array([1.0, np.nan, 1.0])}, "sample_weight"),
        ({"sample_weight": np.ones(4)}, "sample_weight"),
        ({"denominator": -2.0}, "denominator"),
        ({"denominator": float("nan")}, "denominator"),
        ({"denominator": 3.0, "reduction": "sum"}, "denominator"),
        ({"denominator": np.ones(2)}, "denominator"),
    ],
)
def test_bad_new_option_values_name_the_option(engine, options, name):
    x = np.zeros((3, 4))
    y = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=name):
        lsx.numpy.loss_and_grad(x, y, **options)
    with pytest.raises(ValueError, match=name):
        lsx.numpy.loss(x, y, **options)


def test_new_options_are_keyword_only():
    with pytest.raises(TypeError):
        lsx.numpy.loss(
            np.zeros((2, 3)), np.array([0, 1]), -1, 0.0, "all", None, -100, 0.0, False, None, "mean", "nan", 3.0
        )


# --------------------------------------------------------------------------------------------------------
# Reliability, round 3: softcap and weights against the compute dtype's range, non-real denominators,
# a target class without mass at −inf — both engines alike
# --------------------------------------------------------------------------------------------------------
_X3 = np.array([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
_Y3 = np.array([2, 1, 0])


@pytest.mark.parametrize("dtype, cap", [("float32", 1e-39), ("float32", 1e39), ("float16", 1e39), ("float64", 1e-320),
                                        ("float64", 1e308)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_softcap_outside_the_dtypes_range_raises_on_both_engines(engine, dtype, cap, reduction):
    x = _X3.astype(dtype)
    with pytest.raises(ValueError, match="softcap"):
        lsx.numpy.loss(x, _Y3, softcap=cap, reduction=reduction)
    with pytest.raises(ValueError, match="softcap"):
        lsx.numpy.loss_and_grad(x, _Y3, softcap=cap, reduction=reduction)


@pytest.mark.parametrize("dtype, cap", [("float32", 1.2e-38), ("float32", 1e31), ("float64", 2.3e-308), ("float64", 1e291)])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_softcap_at_the_ends_of_the_range_matches_the_reference(engine, dtype, cap, kind):
    target = _Y3 if kind == "index" else np.eye(5)[_Y3] * 0.7 + 0.06
    _check(_X3.astype(dtype), target, dtype, softcap=cap, label_smoothing=0.1)


@pytest.mark.parametrize("options", [{"sample_weight": np.array([1e39, 1.0, 2.0])},
                                     {"weight": np.array([1e39, 1, 1, 1, 1.0])},
                                     {"weight": np.full(5, 1e20), "sample_weight": np.full(3, 1e20)}])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_that_could_overflow_float32_raise_naming_them(engine, options, reduction):
    with pytest.raises(ValueError, match="weight"):
        lsx.numpy.loss(_X3.astype(np.float32), _Y3, reduction=reduction, **options)
    with pytest.raises(ValueError, match="weight"):
        lsx.numpy.loss_and_grad(_X3.astype(np.float32), _Y3, reduction=reduction, **options)
    _check(_X3, _Y3, "float64", reduction=reduction, **options)  # float64 holds them: the reference's numbers


@pytest.mark.parametrize("bad", ["4", 4 + 0j, np.complex64(4), np.array(4 + 0j), np.array("4")])
def test_a_denominator_that_is_not_a_real_number_raises_naming_it(engine, bad):
    with pytest.raises(ValueError, match="denominator"):
        lsx.numpy.loss(_X3, _Y3, denominator=bad)
    with pytest.raises(ValueError, match="denominator"):
        lsx.numpy.loss_and_grad(_X3, _Y3, denominator=bad)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("options", [{}, {"weight": "w"}, {"class_mask": "m"}, {"softcap": 3.0, "z_loss": 0.01},
                                     {"normalize": True, "sample_weight": np.array([0.5, 1.0, 2.0])}])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_massless_target_at_minus_infinity_contributes_nothing(engine, dtype, options, reduction):
    """ε = 1 with spread="others" gives q_y = 0: x_y = −inf must not turn the loss into NaN."""
    x = _X3.copy()
    x[0, 2] = -np.inf
    x[2, 0] = -np.inf
    options = dict(options)
    if options.get("weight") == "w":
        options["weight"] = np.array([0.5, 2.0, 1.0, 0.0, 3.0])
    if options.get("class_mask") == "m":
        options["class_mask"] = np.array([True, True, True, True, False])
    _check(x.astype(dtype), _Y3, dtype, label_smoothing=1.0, spread="others", reduction=reduction, **options)
    value = lsx.numpy.loss(x.astype(dtype), _Y3, label_smoothing=1.0, spread="others", reduction=reduction, **options)
    assert np.all(np.isfinite(value))
