"""The float64 reference against hand-derived values, the seed vectors, finite differences and the rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lsx import spec
from lsx.spec import reference_grad, reference_loss

# Seed vectors: printed by posts that check a hand-written loss against torch.
SEED_X = np.array(
    [[1.2215, -0.9342, -0.1349, -0.5035, 0.4492],
     [-0.1989, 0.2589, 2.1556, -0.5734, 0.8668],
     [0.1215, 0.5060, 0.5376, -1.7609, -0.6566]]
)
SEED_Y = np.array([2, 3, 2])
SEED2_X = np.array([[0, 0.2, 0.7, 0.1, 0], [0, 0.9, 0.2, 0.2, 1], [1, 0.2, 0.7, 0.9, 1]], dtype=float)
SEED2_Y = np.array([2, 1, 0])


def test_seed_vectors():
    assert round(float(reference_loss(SEED_X, SEED_Y)), 4) == 2.1185
    assert round(float(reference_loss(SEED_X, SEED_Y, label_smoothing=0.1)), 4) == 2.1038
    assert round(float(reference_loss(SEED2_X, SEED2_Y, label_smoothing=0.3)), 4) == 1.3883
    assert round(float(reference_loss(SEED2_X, SEED2_Y, label_smoothing=0.3, spread="others")), 4) == 1.4178
    assert round(float(reference_loss(SEED2_X, SEED2_Y, label_smoothing=0.5, spread="others")), 4) == 1.5161
    x3 = np.array([[[1.1741, -0.4859], [-3.718, 1.5257], [0.0222, 0.5898]]])
    assert round(float(reference_loss(x3, np.array([[1, 2]]), axis=1)), 4) == 3.2655


def test_hand_derived_two_classes():
    # K=2, logits (0, log 3): p = (1/4, 3/4), LSE = log 4.
    x = np.array([[0.0, math.log(3.0)]])
    y = np.array([0])
    eps = 0.2
    # spread="all": q = (0.9, 0.1)
    expected = 0.9 * math.log(4.0) + 0.1 * (math.log(4.0) - math.log(3.0))
    assert reference_loss(x, y, label_smoothing=eps) == pytest.approx(expected, rel=1e-14)
    # spread="others": q = (0.8, 0.2)
    expected_others = 0.8 * math.log(4.0) + 0.2 * (math.log(4.0) - math.log(3.0))
    assert reference_loss(x, y, label_smoothing=eps, spread="others") == pytest.approx(expected_others, rel=1e-14)
    # gradient p − q
    np.testing.assert_allclose(reference_grad(x, y, label_smoothing=eps), [[0.25 - 0.9, 0.75 - 0.1]], rtol=1e-14)
    # z-loss s·LSE² and its gradient 2·s·LSE·p
    s = 0.5
    assert reference_loss(x, y, z_loss=s) == pytest.approx(math.log(4.0) + s * math.log(4.0) ** 2, rel=1e-14)
    z_grad = np.array([[0.25 - 1.0, 0.75]]) + 2 * s * math.log(4.0) * np.array([[0.25, 0.75]])
    np.testing.assert_allclose(reference_grad(x, y, z_loss=s), z_grad, rtol=1e-14)


def test_hand_derived_weights_and_ignore():
    x = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 1.0]])
    y = np.array([0, 1, -100])
    w = np.array([1.0, 3.0])
    # each non-ignored row has LSE − x_c = log 2 for both classes
    eps = 0.5
    per_row = [w[0] * 0.75 * math.log(2) + w[1] * 0.25 * math.log(2), w[0] * 0.25 * math.log(2) + w[1] * 0.75 * math.log(2)]
    np.testing.assert_allclose(
        reference_loss(x, y, weight=w, label_smoothing=eps, reduction="none"), per_row + [0.0], rtol=1e-14
    )
    assert reference_loss(x, y, weight=w, label_smoothing=eps) == pytest.approx(sum(per_row) / (1.0 + 3.0), rel=1e-14)
    assert np.all(reference_grad(x, y, weight=w, label_smoothing=eps)[2] == 0)


def test_all_ignored_mean_is_nan_or_zero_and_gradient_zero():
    x = np.ones((3, 4))
    y = np.full(3, -100)
    assert math.isnan(reference_loss(x, y, label_smoothing=0.1))
    assert reference_loss(x, y, label_smoothing=0.1, empty_mean="zero") == 0.0
    assert reference_loss(x, y, reduction="sum") == 0.0
    assert np.all(reference_grad(x, y, label_smoothing=0.1) == 0)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"label_smoothing": 0.3, "spread": "others", "weight": "w"},
        {"label_smoothing": 0.1, "z_loss": 0.05, "weight": "w", "reduction": "sum"},
        {"label_smoothing": 0.2, "normalize": True, "reduction": "none"},
        {"label_smoothing": 0.1, "class_mask": "m", "spread": "others"},
        {"label_smoothing": 1.0, "weight": "w"},
    ],
)
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_gradient_matches_finite_differences(options, kind):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 3, 6))  # class axis 2
    options = dict(options)
    if options.get("weight") == "w":
        options["weight"] = rng.uniform(0.5, 2.0, size=6)
    valid = np.ones(6, bool)
    if options.get("class_mask") == "m":
        valid[[1, 4]] = False
        options["class_mask"] = valid
    if kind == "index":
        t = rng.choice(np.flatnonzero(valid), size=(4, 3))
        t[0, 1] = -100
    else:
        t = rng.dirichlet(np.ones(int(valid.sum())), size=(4, 3))
        full = np.zeros((4, 3, 6))
        full[..., valid] = t
        t = full
    cot = rng.normal(size=(4, 3)) if options.get("reduction") == "none" else None

    def scalar(z):
        value = reference_loss(z, t, axis=2, **options)
        return float(np.sum(value * cot)) if cot is not None else float(value)

    grad = reference_grad(x, t, axis=2, cotangent=cot, **options)
    numeric = np.zeros_like(x)
    h = 1e-6
    for index in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[index] += h
        down[index] -= h
        numeric[index] = (scalar(up) - scalar(down)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


def test_kl_form_is_zero_at_p_equals_q():
    k, eps = 6, 0.3
    for spread, (a, b) in (("all", (1 - eps, eps / k)), ("others", (1 - eps - eps / (k - 1), eps / (k - 1)))):
        y = np.array([0, 3, 5])
        q = a * np.eye(k)[y] + b
        x = np.log(q) + 7.0  # softmax(x) = q
        loss = reference_loss(x, y, label_smoothing=eps, spread=spread, normalize=True, reduction="none")
        np.testing.assert_allclose(loss, 0.0, atol=1e-13)
        np.testing.assert_allclose(reference_grad(x, y, label_smoothing=eps, spread=spread, normalize=True), 0.0, atol=1e-13)
        # and it is positive elsewhere
        assert np.all(reference_loss(x[:, ::-1], y, label_smoothing=eps, spread=spread, normalize=True, reduction="none") > 0)


def test_zero_smoothing_equals_plain_cross_entropy():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(5, 7))
    y = rng.integers(0, 7, size=5)
    log_p = x - np.log(np.exp(x).sum(1, keepdims=True))
    plain = -log_p[np.arange(5), y]
    np.testing.assert_allclose(reference_loss(x, y, reduction="none"), plain, rtol=1e-14)
    np.testing.assert_allclose(reference_loss(x, y, reduction="none", spread="others"), plain, rtol=1e-14)


def test_negative_infinity_logits_stay_finite_without_smoothing():
    x = np.array([[0.0, -np.inf, 2.0, -np.inf]])
    y = np.array([2])
    value = reference_loss(x, y)
    assert np.isfinite(value) and value == pytest.approx(math.log(1 + math.exp(-2.0)), rel=1e-14)
    grad = reference_grad(x, y)
    assert np.all(np.isfinite(grad)) and grad[0, 1] == 0 and grad[0, 3] == 0
    assert math.isinf(reference_loss(x, y, label_smoothing=0.1))  # smoothing puts mass on a −inf class


def test_class_mask_equals_dropping_the_classes():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(4, 7))
    y = np.array([0, 2, 4, 1])
    mask = np.array([1, 1, 1, 0, 1, 0, 0], bool)
    for spread in ("all", "others"):
        masked = reference_loss(x, y, label_smoothing=0.2, spread=spread, class_mask=mask, reduction="none")
        dropped = reference_loss(x[:, mask], np.array([0, 2, 3, 1]), label_smoothing=0.2, spread=spread, reduction="none")
        np.testing.assert_allclose(masked, dropped, rtol=1e-14)
        grad = reference_grad(x, y, label_smoothing=0.2, spread=spread, class_mask=mask)
        assert np.all(grad[:, ~mask] == 0)
        np.testing.assert_allclose(
            grad[:, mask], reference_grad(x[:, mask], np.array([0, 2, 3, 1]), label_smoothing=0.2, spread=spread)
        )


def test_others_spread_with_probability_targets():
    k, eps = 4, 0.4
    t = np.array([[0.5, 0.5, 0.0, 0.0]])
    x = np.array([[0.1, -0.3, 0.7, 0.2]])
    q = (1 - eps) * t + eps * (1 - t) / (k - 1)
    log_p = x - np.log(np.exp(x).sum())
    assert reference_loss(x, t, label_smoothing=eps, spread="others") == pytest.approx(-(q * log_p).sum(), rel=1e-14)


def test_probability_targets_mean_divides_by_element_count_not_weights():
    x = np.zeros((2, 3))
    t = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    w = np.array([2.0, 4.0, 1.0])
    expected = (2.0 * math.log(3) + 4.0 * math.log(3)) / 2
    assert reference_loss(x, t, weight=w) == pytest.approx(expected, rel=1e-14)


def test_conventions_fill_unpassed_options_and_explicit_wins():
    fairseq = spec.resolve_options("fairseq")
    assert (fairseq.spread, fairseq.ignore_index, fairseq.reduction) == ("others", 1, "sum")
    explicit = spec.resolve_options("fairseq", ignore_index=-100, reduction=spec.default("mean"))
    assert explicit.ignore_index == -100 and explicit.reduction == "sum"
    t5x = spec.resolve_options("t5x", label_smoothing=0.1)
    assert t5x.normalize and t5x.z_loss == 1e-4 and t5x.label_smoothing == 0.1
    assert spec.resolve_options("hf").label_smoothing == 0.1
    assert spec.resolve_options("keras").empty_mean == "zero"
    for name in spec.CONVENTIONS:
        spec.resolve_options(name)


def test_marked_defaults_behave_like_plain_values():
    for value in (-100, 0.0, "mean", False, None):
        marked = spec.default(value)
        assert marked == value and repr(marked) == repr(value) and spec.is_default(marked)
        assert not spec.is_default(value)
    assert not spec.default(False) and spec.default(None) is not None


@pytest.mark.parametrize(
    ("options", "error", "fragment"),
    [
        ({"label_smoothing": -0.1}, ValueError, "label_smoothing"),
        ({"label_smoothing": 1.5}, ValueError, "label_smoothing"),
        ({"label_smoothing": float("nan")}, ValueError, "label_smoothing"),
        ({"label_smoothing": "0.1"}, TypeError, "label_smoothing"),
        ({"spread": "some"}, ValueError, "spread"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"z_loss": -1.0}, ValueError, "z_loss"),
        ({"z_loss": float("inf")}, ValueError, "z_loss"),
        ({"empty_mean": "inf"}, ValueError, "empty_mean"),
        ({"ignore_index": 1.5}, TypeError, "ignore_index"),
        ({"normalize": "yes"}, TypeError, "normalize"),
        ({"convention": "pytorch"}, ValueError, "convention"),
        ({"smoothing": 0.1}, TypeError, "smoothing"),
    ],
)
def test_option_errors_name_the_option_and_value(options, error, fragment):
    with pytest.raises(error, match=fragment):
        reference_loss(SEED_X, SEED_Y, **options)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: reference_loss(SEED_X, np.array([2, 5, 0])), "label 5"),
        (lambda: reference_loss(SEED_X, np.array([2, -1, 0])), "label -1"),
        (lambda: reference_loss(SEED_X, np.array([2, -100, 0]), ignore_index=None), "label -100"),
        (lambda: reference_loss(SEED_X, np.array([2, 1])), r"shape \(3,\)"),
        (lambda: reference_loss(SEED_X, SEED_Y, axis=2), "axis"),
        (lambda: reference_loss(SEED_X, SEED_Y, weight=np.ones(4)), "weight"),
        (lambda: reference_loss(SEED_X, SEED_Y, weight=np.array([1, 1, -1, 1, 1.0])), r"weight\[2\] = -1"),
        (lambda: reference_loss(SEED_X, SEED_Y, weight=np.array([1, 1, np.nan, 1, 1.0])), "weight"),
        (lambda: reference_loss(SEED_X, SEED_Y, class_mask=np.ones(5)), "class_mask"),
        (lambda: reference_loss(SEED_X, SEED_Y, class_mask=np.array([1, 1, 0, 1, 1], bool)), "label 2"),
        (lambda: reference_loss(SEED_X, SEED_Y, class_mask=np.zeros(5, bool)), "class_mask"),
        (lambda: reference_loss(SEED_X[:, :1], np.zeros(3, int), label_smoothing=0.1, spread="others"), "others"),
        (lambda: reference_loss(SEED_X, SEED_X[:, :4]), "shape"),
        (lambda: reference_loss(SEED_X.astype(int), SEED_Y), "floating"),
        (lambda: reference_loss(SEED_X, SEED_Y.astype(bool)), "dtype bool"),
        (
            lambda: reference_loss(SEED_X, np.eye(5)[[0, 1, 2]], class_mask=np.array([1, 1, 0, 1, 1], bool)),
            "class 2",
        ),
    ],
)
def test_input_errors_name_the_value(call, fragment):
    with pytest.raises((ValueError, TypeError), match=fragment):
        call()


def test_others_with_one_class_is_fine_without_smoothing():
    assert reference_loss(SEED_X[:, :1], np.zeros(3, int), spread="others") == 0.0


def test_import_lsx_loads_no_framework():
    import subprocess
    import sys

    code = (
        "import sys, lsx, lsx.spec\n"
        "loaded = [m for m in ('torch', 'jax', 'tensorflow', 'keras', 'numba', 'optax') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------------
# Spec 2: soft-capping, per-element weights, a caller's denominator
# --------------------------------------------------------------------------------------------------------
def _hand_loss(x, y, eps, k, sample_weight=None, denominator=None, softcap=None):
    """Plain label-smoothed CE (spread all, no class weights) written out by hand, for comparison."""
    x = np.asarray(x, np.float64)
    if softcap is not None:
        x = softcap * np.tanh(x / softcap)
    log_p = x - np.log(np.sum(np.exp(x - x.max(-1, keepdims=True)), -1, keepdims=True)) - x.max(-1, keepdims=True)
    losses = np.array([-(1 - eps) * log_p[i, yi] - eps / k * log_p[i].sum() for i, yi in enumerate(y)])
    sw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, np.float64)
    total = np.sum(losses * sw)
    return total / (np.sum(sw) if denominator is None else denominator)


def test_softcap_sample_weight_denominator_against_hand_formula():
    rng = np.random.default_rng(3)
    x = rng.normal(scale=20.0, size=(5, 6))
    y = np.array([0, 5, 2, 3, 1])
    sw = np.array([1.0, 0.0, 2.5, 0.5, 1.0])
    for kwargs in ({"softcap": 30.0}, {"sample_weight": sw}, {"denominator": 17.0}, {"softcap": 5.0, "sample_weight": sw}):
        expected = _hand_loss(x, y, 0.1, 6, **kwargs)
        np.testing.assert_allclose(spec.reference_loss(x, y, label_smoothing=0.1, **kwargs), expected, rtol=1e-13)


def test_softcap_maps_infinities_to_the_cap_and_masked_classes_stay_out():
    x = np.array([[np.inf, 0.0, -np.inf, 1.0, 50.0]])
    mask = np.array([True, True, True, True, False])
    capped = 3.0 * np.tanh(np.array([[np.inf, 0.0, -np.inf, 1.0]]) / 3.0)
    expected = spec.reference_loss(capped, np.array([1]), label_smoothing=0.2)
    value = spec.reference_loss(x, np.array([1]), label_smoothing=0.2, softcap=3.0, class_mask=mask)
    assert np.isfinite(value)
    np.testing.assert_allclose(value, expected, rtol=1e-14)
    grad = spec.reference_grad(x, np.array([1]), label_smoothing=0.2, softcap=3.0, class_mask=mask)
    assert grad[0, 4] == 0 and grad[0, 0] == 0 and grad[0, 2] == 0  # masked; tanh' = 0 at ±inf


def test_reference_gradient_with_new_options_is_the_derivative():
    rng = np.random.default_rng(4)
    x = rng.normal(scale=3.0, size=(4, 5))
    y = np.array([0, 4, -100, 2])
    options = dict(label_smoothing=0.1, softcap=2.0, sample_weight=np.array([1.0, 2.0, 3.0, 0.5]), z_loss=0.01)
    grad = spec.reference_grad(x, y, **options)
    step = 1e-6
    numeric = np.zeros_like(x)
    for index in np.ndindex(x.shape):
        bump = np.zeros_like(x)
        bump[index] = step
        numeric[index] = (spec.reference_loss(x + bump, y, **options) - spec.reference_loss(x - bump, y, **options)) / (
            2 * step
        )
    np.testing.assert_allclose(grad, numeric, atol=1e-8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"softcap": 0.0}, "softcap must be > 0"),
        ({"softcap": -1.0}, "softcap must be > 0"),
        ({"softcap": float("nan")}, "softcap must be > 0 and finite"),
        ({"softcap": float("inf")}, "softcap must be > 0 and finite"),
        ({"denominator": 4.0, "reduction": "sum"}, 'denominator is only for reduction="mean"'),
        ({"denominator": 4.0, "reduction": "none"}, 'denominator is only for reduction="mean"'),
        ({"denominator": -1.0}, "denominator must be finite and >= 0"),
        ({"denominator": float("nan")}, "denominator must be finite and >= 0"),
        ({"denominator": np.ones(2)}, "denominator must be a number or a 0-d array"),
    ],
)
def test_new_option_validation(options, message):
    with pytest.raises(ValueError, match=message):
        spec.resolve_options(**options)


def test_sample_weight_validation():
    x = np.zeros((3, 4))
    y = np.array([0, 1, 2])
    with pytest.raises(ValueError, match=r"sample_weight must have the per-element loss's shape \(3,\)"):
        spec.reference_loss(x, y, sample_weight=np.ones(4))
    with pytest.raises(ValueError, match=r"sample_weight must be finite and >= 0, got sample_weight\[\(1,\)\] = -1.0"):
        spec.reference_loss(x, y, sample_weight=np.array([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        spec.reference_loss(x, y, sample_weight=np.array([1.0, np.nan, 1.0]))


def test_zero_denominator_follows_empty_mean():
    x = np.zeros((2, 3))
    y = np.array([0, 1])
    assert np.isnan(spec.reference_loss(x, y, denominator=0))
    assert spec.reference_loss(x, y, denominator=0, empty_mean="zero") == 0
    assert not spec.reference_grad(x, y, denominator=0).any()


def test_gradient_accumulation_with_a_global_denominator_equals_one_big_batch():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(12, 7))
    y = rng.integers(0, 7, size=12)
    y[[1, 5, 6]] = -100
    weight = rng.uniform(0.5, 2.0, size=7)
    options = dict(label_smoothing=0.1, weight=weight)
    whole = spec.reference_grad(x, y, **options)
    total = float(np.sum(weight[y[y != -100]]))
    parts = [spec.reference_grad(x[i : i + 4], y[i : i + 4], denominator=total, **options) for i in (0, 4, 8)]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-14, atol=1e-16)
    losses = [spec.reference_loss(x[i : i + 4], y[i : i + 4], denominator=total, **options) for i in (0, 4, 8)]
    np.testing.assert_allclose(sum(losses), spec.reference_loss(x, y, **options), rtol=1e-14)


# --------------------------------------------------------------------------------------------------------
# Reliability, round 3: softcap and weights against the compute dtype's range, non-real denominators,
# a target class without mass at −inf
# --------------------------------------------------------------------------------------------------------
_X3 = np.array([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
_Y3 = np.array([2, 1, 0])


@pytest.mark.parametrize(
    "dtype, cap",
    [("float32", 1e-39), ("float32", 1e39), ("float32", 1e32), ("bfloat16", 1e39), ("float16", 1e39),
     ("float64", 1e-320), ("float64", 1e308), ("torch.float32", 1e39)],
)
def test_softcap_outside_the_compute_dtypes_range_is_a_value_error_naming_it(dtype, cap):
    with pytest.raises(ValueError, match=r"softcap=.*" + dtype.replace("torch.", "")):
        spec.check_softcap(cap, dtype)


@pytest.mark.parametrize(
    "dtype, cap", [("float32", 1.2e-38), ("float32", 1e31), ("float16", 30.0), ("bfloat16", 1e30), ("float64", 1e291)]
)
def test_softcap_inside_the_range_passes_and_matches_the_formula(dtype, cap):
    spec.check_softcap(cap, dtype)
    spec.check_softcap(None, dtype)
    if dtype in ("float32", "float64"):
        x = _X3.astype(dtype)
        capped = np.float64(cap) * np.tanh(_X3 / np.float64(cap))
        np.testing.assert_allclose(spec.reference_loss(x, _Y3, softcap=cap), spec.reference_loss(capped, _Y3))


def test_the_reference_rejects_a_softcap_its_logits_dtype_cannot_hold():
    with pytest.raises(ValueError, match="softcap"):
        spec.reference_loss(_X3.astype(np.float32), _Y3, softcap=1e39)
    spec.reference_loss(_X3, _Y3, softcap=1e39)  # float64 logits: inside the range


@pytest.mark.parametrize("bad", ["4", b"4", 4 + 0j, np.complex64(4), np.array(4 + 0j), np.array(True), np.array("4")])
def test_a_denominator_that_is_not_a_real_number_is_a_value_error_naming_it(bad):
    with pytest.raises(ValueError, match="denominator"):
        spec.resolve_options(denominator=bad)
    with pytest.raises(ValueError, match="denominator"):
        spec.check_denominator(bad)
    with pytest.raises(ValueError, match="denominator"):
        spec.reference_loss(_X3, _Y3, denominator=bad)


@pytest.mark.parametrize("good", [4, 4.0, np.float32(4), np.array(4.0), np.int64(4), np.array(4, np.uint8)])
def test_real_denominators_pass(good):
    assert spec.check_denominator(good) == 4.0
    np.testing.assert_allclose(spec.reference_loss(_X3, _Y3, denominator=good), spec.reference_loss(_X3, _Y3) * 3 / 4)


@pytest.mark.parametrize(
    "options, culprit",
    [
        ({"sample_weight": np.array([1e39, 1.0, 2.0])}, "sample_weight"),
        ({"sample_weight": np.array([2e31, 2e31, 2e31])}, "sample_weight"),  # each fits, the sum may not
        ({"weight": np.array([1e39, 1, 1, 1, 1.0])}, "weight"),
        ({"weight": np.array([1e20, 1, 1, 1, 1.0]), "sample_weight": np.array([1e20, 1.0, 1.0])}, "weight"),
    ],
)
def test_weights_whose_sums_could_overflow_float32_are_a_value_error_naming_them(options, culprit):
    with pytest.raises(ValueError, match=culprit):
        spec.reference_loss(_X3.astype(np.float32), _Y3, **options)
    spec.reference_loss(_X3, _Y3, **options)  # float64 has room for them


def test_weight_range_allows_large_but_safe_weights():
    spec.check_weight_range("float32", weight=np.full(5, 1e15), sample_weight=np.full(3, 1e15))
    spec.check_weight_range("float64", weight=np.full(5, 1e100), sample_weight=np.full(3, 1e100))
    with pytest.raises(ValueError, match=r"weight \(max 1e\+200\) with sample_weight"):
        spec.check_weight_range("float64", weight=np.full(5, 1e200), sample_weight=np.full(3, 1e200))


@pytest.mark.parametrize("weighted", [False, True])
def test_label_row_leaves_a_massless_target_out_even_at_minus_infinity(weighted):
    """ε = 1 with spread="others": q_y = 0, so x_y = −inf contributes nothing (the reference is finite)."""
    x = _X3.copy()
    x[0, 2] = -np.inf
    w = np.array([0.5, 2.0, 1.0, 0.0, 3.0]) if weighted else None
    options = dict(label_smoothing=1.0, spread="others", reduction="none", weight=w)
    expected = spec.reference_loss(x, _Y3, **options)
    assert np.all(np.isfinite(expected))
    opts = spec.resolve_options(label_smoothing=1.0, spread="others")
    wf = np.ones(5) if w is None else w
    k = spec.RowCoefficients.of(opts, 5, float(wf.sum()))
    assert k.empty_target
    for i in range(3):
        m = x[i].max()
        lse = np.log(np.sum(np.exp(x[i] - m)))
        others = [c for c in range(5) if c != _Y3[i] and wf[c] != 0]
        loss, coef = spec.label_row(
            k,
            log_sum_exp=lse,
            row_max=m,
            w_y=float(wf[_Y3[i]]),
            x_y=x[i, _Y3[i]] - m,
            weighted_sum=float(sum(wf[c] * (x[i, c] - m) for c in others)),
            target_excluded=True,
        )
        np.testing.assert_allclose(loss, expected[i], rtol=1e-12)
        assert coef == pytest.approx(k.b * (wf.sum() - wf[_Y3[i]]))
    with pytest.raises(ValueError, match="target_excluded"):
        spec.label_row(
            spec.RowCoefficients.of(spec.resolve_options(label_smoothing=0.5), 5),
            log_sum_exp=0.0, row_max=0.0, w_y=1.0, x_y=0.0, weighted_sum=0.0, target_excluded=True,
        )


def test_cached_resolution_keeps_defaults_apart_and_raises_every_time():
    given = dict(label_smoothing=0.1, weight=None, class_mask=None, sample_weight=None, denominator=None)
    for convention in (None, "fairseq", "t5x"):
        for ignore_index in (spec.default(-100), -100, 1, None):
            for _ in range(2):  # a miss, then a hit
                got = spec.resolve_options_cached(convention, ignore_index=ignore_index, **given)
                assert got == spec.resolve_options(convention, ignore_index=ignore_index, **given)
    # a marked default and the same value passed explicitly compare equal but resolve differently
    assert spec.resolve_options_cached("fairseq", ignore_index=spec.default(-100)).ignore_index == 1
    assert spec.resolve_options_cached("fairseq", ignore_index=-100).ignore_index == -100
    assert spec.resolve_options_cached(None, normalize=True).normalize is True
    with pytest.raises(TypeError, match="normalize"):
        spec.resolve_options_cached(None, normalize=1)
    for _ in range(2):
        with pytest.raises(ValueError, match="label_smoothing"):
            spec.resolve_options_cached(None, label_smoothing=1.5)
    weight = np.ones(3)
    assert spec.resolve_options_cached(None, weight=weight).weight is weight  # arrays are never cached
    with pytest.raises(ValueError, match="denominator"):
        spec.resolve_options_cached(None, reduction="sum", denominator=2.0)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.int64, np.uint8, np.uint16, np.uint32, np.uint64])
def test_check_labels_reports_the_first_bad_label_in_every_dtype(dtype):
    opts = spec.resolve_options(None, ignore_index=None)
    spec.check_labels(np.array([0, 4, 2], dtype), 5, opts)
    with pytest.raises(ValueError, match="label 5"):
        spec.check_labels(np.array([0, 5, 2], dtype), 5, opts)
    if np.dtype(dtype).kind == "i":
        for ignore_index in (None, -100, 7):
            with pytest.raises(ValueError, match="label -1"):
                spec.check_labels(np.array([0, -1, 2], dtype), 5, spec.resolve_options(None, ignore_index=ignore_index))
        spec.check_labels(np.array([0, -100, 2], dtype), 5, spec.resolve_options(None, ignore_index=-100))
        with pytest.raises(ValueError, match="label -100"):
            spec.check_labels(np.array([0, -100, 2], dtype), 5, spec.resolve_options(None, ignore_index=-1))
    spec.check_labels(np.array([[0, 7], [7, 1]], dtype)[:, ::-1], 5, spec.resolve_options(None, ignore_index=7))
    with pytest.raises(ValueError, match="label 7"):
        spec.check_labels(np.array([[0, 7], [7, 1]], dtype)[:, ::-1], 5, opts)
