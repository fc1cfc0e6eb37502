"""lsx.tensorflow beyond the shared matrix: parity with torch's and TensorFlow's built-ins, tracing, bad labels."""

from __future__ import annotations

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
import lsx.tensorflow  # noqa: E402
from lsx import spec  # noqa: E402


def _value_and_grad(x, y, **options):
    x = tf.convert_to_tensor(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = lsx.tensorflow.loss(x, y, **options)
        summed = tf.reduce_sum(value)
    return value, tape.gradient(summed, x)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=2.0, size=(16, 7))
    labels = rng.integers(0, 7, size=16)
    labels[[2, 9]] = -100
    return logits, labels, rng.uniform(0.2, 2.0, size=7)


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("weighted", [False, True])
def test_index_targets_match_torch_cross_entropy(data, eps, weighted):
    torch = pytest.importorskip("torch")
    logits, labels, weight = data
    w = weight if weighted else None
    xt = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(
        xt, torch.tensor(labels), weight=None if w is None else torch.tensor(w), label_smoothing=eps
    )
    expected.backward()
    value, grad = _value_and_grad(logits, labels, label_smoothing=eps, weight=w)
    assert value.dtype == tf.float64
    np.testing.assert_allclose(value.numpy(), expected.item(), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), xt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_probability_targets_and_class_axis_1_match_torch(data):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 4))
    probs = rng.dirichlet(np.ones(5), size=(3, 4)).transpose(0, 2, 1)
    xt = torch.tensor(logits, requires_grad=True)
    expected = torch.nn.functional.cross_entropy(xt, torch.tensor(probs), label_smoothing=0.2)
    expected.backward()
    value, grad = _value_and_grad(logits, probs, axis=1, label_smoothing=0.2)
    np.testing.assert_allclose(value.numpy(), expected.item(), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), xt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_float32_matches_tensorflow_builtin_on_smoothed_one_hot(data):
    logits, labels, _ = data
    labels = np.where(labels < 0, 0, labels)
    x = tf.constant(logits, tf.float32)
    q = tf.one_hot(labels, 7) * 0.9 + 0.1 / 7
    with tf.GradientTape() as tape:
        tape.watch(x)
        expected = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(labels=q, logits=x))
    expected_grad = tape.gradient(expected, x)
    value, grad = _value_and_grad(x, labels, label_smoothing=0.1)
    assert value.dtype == grad.dtype == tf.float32
    np.testing.assert_allclose(value.numpy(), expected.numpy(), rtol=2e-6)
    np.testing.assert_allclose(grad.numpy(), expected_grad.numpy(), atol=2e-7)


def test_seed_vector_under_xla_with_dynamic_batch():
    logits = np.array(
        [
            [1.2215, -0.9342, -0.1349, -0.5035, 0.4492],
            [-0.1989, 0.2589, 2.1556, -0.5734, 0.8668],
            [0.1215, 0.5060, 0.5376, -1.7609, -0.6566],
        ],
        np.float32,
    )
    labels = np.array([2, 3, 2], np.int32)
    step = tf.function(
        lambda x, y: lsx.tensorflow.loss(x, y, label_smoothing=0.1),
        jit_compile=True,
        input_signature=[tf.TensorSpec([None, 5], tf.float32), tf.TensorSpec([None], tf.int32)],
    )
    assert abs(float(step(logits, labels)) - 2.1038) < 1e-4
    assert (
        abs(
            float(step(logits[:2], labels[:2]))
            - float(spec.reference_loss(logits[:2], labels[:2], label_smoothing=0.1))
        )
        < 1e-6
    )


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_keeps_dtype_and_accumulates_in_float32(dtype):
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(64, 1000))
    labels = rng.integers(0, 1000, size=64)
    x = tf.cast(tf.constant(logits), dtype)
    value, grad = _value_and_grad(x, labels, label_smoothing=0.1, z_loss=1e-3)
    assert value.dtype == grad.dtype == x.dtype
    rounded = tf.cast(x, tf.float64).numpy()
    expected = spec.reference_loss(rounded, labels, label_smoothing=0.1, z_loss=1e-3)
    # one rounding of the result, not 1000 rounded additions
    assert abs(float(tf.cast(value, tf.float64)) - float(expected)) <= 2**-7 * abs(float(expected))


def test_out_of_range_label_raises_eagerly_naming_it(data):
    logits, labels, _ = data
    bad = labels.copy()
    bad[4] = 7
    with pytest.raises(ValueError, match="label 7"):
        lsx.tensorflow.loss(tf.constant(logits), tf.constant(bad))
    bad[4] = -1
    with pytest.raises(ValueError, match="label -1"):
        lsx.tensorflow.loss(logits, bad)


@pytest.mark.parametrize("jit", [False, True])
def test_out_of_range_label_inside_a_traced_function_is_nan_not_a_silent_number(data, jit):
    logits, labels, _ = data
    bad = labels.copy()
    bad[4] = 7

    @tf.function(jit_compile=jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = lsx.tensorflow.loss(x, y, label_smoothing=0.1)
        return value, tape.gradient(value, x)

    value, grad = step(tf.constant(logits), tf.constant(bad))
    assert np.isnan(value.numpy())
    assert np.isnan(grad.numpy()[4]).all()
    value, grad = step(tf.constant(logits), tf.constant(labels))
    assert np.isfinite(value.numpy()) and np.isfinite(grad.numpy()).all()


def test_label_on_a_masked_class_inside_tf_function_is_nan(data):
    logits, _, _ = data
    mask = np.array([True] * 5 + [False] * 2)
    step = tf.function(lambda x, y: lsx.tensorflow.loss(x, y, class_mask=mask, reduction="none"))
    out = step(tf.constant(logits), tf.constant(np.array([0, 6] + [1] * 14))).numpy()
    assert np.isnan(out[1]) and np.isfinite(np.delete(out, 1)).all()
    with pytest.raises(ValueError, match="class_mask"):
        lsx.tensorflow.loss(logits, np.array([0, 6] + [1] * 14), class_mask=mask)


def test_all_ignored_mean_and_its_gradient(data):
    logits, _, _ = data
    labels = np.full(16, -100)
    value, grad = _value_and_grad(logits, labels, label_smoothing=0.1)
    assert np.isnan(value.numpy()) and not grad.numpy().any()
    value, _ = _value_and_grad(logits, labels, empty_mean="zero")
    assert value.numpy() == 0.0


def test_errors_for_bad_inputs(data):
    logits, labels, _ = data
    with pytest.raises(TypeError, match="floating"):
        lsx.tensorflow.loss(tf.constant([[1, 2]]), tf.constant([0]))
    with pytest.raises(ValueError, match="label_smoothing"):
        lsx.tensorflow.loss(logits, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="weight"):
        lsx.tensorflow.loss(logits, labels, weight=-np.ones(7))

    @tf.function
    def symbolic_mask(x, y, m):
        return lsx.tensorflow.loss(x, y, class_mask=m)

    with pytest.raises(TypeError, match="class_mask"):
        symbolic_mask(tf.constant(logits), tf.constant(labels), tf.constant(np.ones(7, bool)))


def test_convention_preset_fills_unpassed_options(data):
    logits, labels, _ = data
    labels = np.where(labels < 0, 1, labels)
    value = lsx.tensorflow.loss(logits, labels, convention="fairseq", label_smoothing=0.1)
    expected = spec.reference_loss(logits, labels, convention="fairseq", label_smoothing=0.1)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("jit", [False, True])
def test_minus_inf_logits_with_and_without_smoothing_under_tf_function(jit):
    logits = np.array([[0.5, -np.inf, 1.0, -2.0], [-np.inf, 3.0, -np.inf, 0.0], [1.0, 2.0, 3.0, 4.0]])
    labels = np.array([2, 1, 3])

    @tf.function(jit_compile=jit)
    def step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = lsx.tensorflow.loss(x, y, z_loss=1e-2)
        return value, tape.gradient(value, x)

    value, grad = step(tf.constant(logits), tf.constant(labels))
    np.testing.assert_allclose(value.numpy(), spec.reference_loss(logits, labels, z_loss=1e-2), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), spec.reference_grad(logits, labels, z_loss=1e-2), rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------------------------------------
# Regressions: weights as tensors, unknown class axis, traced masked probabilities, every label dtype,
# NaN/negative probabilities, huge logits, +inf logits
# --------------------------------------------------------------------------------------------------------
def _finite_difference(f, w, step=1e-6):
    w = np.asarray(w, np.float64)
    out = np.empty_like(w)
    for c in range(w.size):
        e = np.zeros_like(w)
        e[c] = step
        out[c] = (float(f(w + e)) - float(f(w - e))) / (2 * step)
    return out


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
def test_variable_weight_gets_its_gradient_eager_and_traced(data, kind, reduction, mode):
    logits, labels, weight = data
    if kind == "probs":
        labels = np.random.default_rng(3).dirichlet(np.ones(7), size=16)
    options = dict(label_smoothing=0.1, z_loss=1e-2, normalize=True, reduction=reduction)
    w = tf.Variable(weight)

    def step(x, y):
        with tf.GradientTape() as tape:
            value = tf.reduce_sum(lsx.tensorflow.loss(x, y, weight=w, **options))
        return value, tape.gradient(value, w)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    value, grad = step(tf.constant(logits), tf.constant(labels))
    assert grad is not None
    np.testing.assert_allclose(float(value), np.sum(spec.reference_loss(logits, labels, weight=weight, **options)))
    expected = _finite_difference(
        lambda v: np.sum(spec.reference_loss(logits, labels, weight=v, **options)), weight, step=1e-6
    )
    np.testing.assert_allclose(grad.numpy(), expected, rtol=1e-6, atol=1e-8)


def test_traced_negative_weight_gives_nan_and_eager_one_raises(data):
    logits, labels, weight = data
    bad = weight.copy()
    bad[2] = -1.0
    step = tf.function(lambda x, y, w: lsx.tensorflow.loss(x, y, weight=w))
    assert np.isnan(step(tf.constant(logits), tf.constant(labels), tf.constant(bad)).numpy())
    assert np.isfinite(step(tf.constant(logits), tf.constant(labels), tf.constant(weight)).numpy())
    with pytest.raises(ValueError, match=r"weight\[2\]"):
        lsx.tensorflow.loss(logits, labels, weight=tf.Variable(bad))


def test_unknown_class_axis_length_is_a_clear_error():
    step = tf.function(
        lambda x, y: lsx.tensorflow.loss(x, y),
        input_signature=[tf.TensorSpec([None, None], tf.float32), tf.TensorSpec([None], tf.int64)],
    )
    with pytest.raises(ValueError, match="static length"):
        step(np.zeros((2, 3), np.float32), np.array([0, 1]))


@pytest.mark.parametrize("jit", [False, True])
def test_probability_mass_on_a_masked_class_under_tf_function(jit):
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(3, 5))
    mask = np.array([True] * 4 + [False])
    probs = np.full((3, 5), 0.25)
    probs[:, 4] = 0.0
    probs[1] = [0.2, 0.2, 0.2, 0.2, 0.2]
    traced = tf.function(lambda x, t: lsx.tensorflow.loss(x, t, class_mask=mask, reduction="none"), jit_compile=jit)
    out = traced(tf.constant(logits), tf.constant(probs)).numpy()
    assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()
    # a constant target captured by the traced function is checked at trace time, as eagerly
    captured = tf.function(lambda x: lsx.tensorflow.loss(x, tf.constant(probs), class_mask=mask), jit_compile=jit)
    with pytest.raises(ValueError, match="class 4"):
        captured(tf.constant(logits))


LABEL_DTYPES = ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"]


@pytest.mark.parametrize("mode", ["eager", "function", "xla"])
@pytest.mark.parametrize("dtype", LABEL_DTYPES)
def test_every_label_dtype_for_wide_class_axes(dtype, mode):
    info = np.iinfo(dtype)
    k = 70000 if info.max > 70000 else 200 if info.max < 300 else 300
    rng = np.random.default_rng(6)
    logits = rng.normal(size=(6, k)).astype(np.float32)
    labels = np.array([0, 1, min(k - 1, int(info.max)), min(k - 1, int(info.max), 150), 7, 9], dtype)
    ignore = min(int(info.max), 2**63 - 1) if dtype.startswith("u") else -1
    labels[4] = ignore
    options = dict(label_smoothing=0.1, ignore_index=ignore)

    def step(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = lsx.tensorflow.loss(x, y, **options)
        return value, tape.gradient(value, x)

    if mode != "eager":
        step = tf.function(step, jit_compile=mode == "xla")
    y = tf.constant(labels)
    assert y.dtype.name == dtype
    value, grad = step(tf.constant(logits), y)
    np.testing.assert_allclose(value.numpy(), spec.reference_loss(logits, labels, **options), rtol=2e-5)
    np.testing.assert_allclose(grad.numpy(), spec.reference_grad(logits, labels, **options), atol=2e-7)


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize(
    "dtype,value,ignore",
    [
        ("uint64", 2**64 - 1, -1),  # would wrap to −1 = ignore_index in int64
        ("uint64", 2**63 + 3, None),  # would wrap to a negative number
        ("uint32", 2**32 - 100, -100),  # would wrap to −100 in int32
        ("uint8", 255, -1),  # would wrap to −1 in int8
    ],
)
def test_traced_labels_never_wrap_into_ignored_or_valid_ones(dtype, value, ignore, mode):
    logits = np.random.default_rng(7).normal(size=(3, 300))
    labels = np.array([1, value, 2], dtype)
    step = tf.function(
        lambda x, y: lsx.tensorflow.loss(x, y, ignore_index=ignore, reduction="none"), jit_compile=mode == "xla"
    )
    out = step(tf.constant(logits[:, : 5 if dtype != "uint8" else 200]), tf.constant(labels)).numpy()
    assert np.isnan(out[1]) and np.isfinite(out[[0, 2]]).all()
    with pytest.raises(ValueError, match=f"label {value}"):
        lsx.tensorflow.loss(logits[:, :5], labels, ignore_index=ignore)


@pytest.mark.parametrize("jit", [None, False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_nan_and_negative_probabilities_count_linearly(jit, normalize):
    rng = np.random.default_rng(8)
    logits = rng.normal(size=(3, 4))
    logits[2, 3] = -np.inf
    probs = np.array([[np.nan, 0.5, 0.5, 0.0], [-0.5, 1.5, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0]])
    options = dict(reduction="none", normalize=normalize)

    def value_and_grad(x, t):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = lsx.tensorflow.loss(x, t, **options)
        return value, tape.gradient(value, x)

    if jit is not None:
        value_and_grad = tf.function(value_and_grad, jit_compile=jit)
    value, grad = value_and_grad(tf.constant(logits), tf.constant(probs))
    expected = spec.reference_loss(logits, probs, **options)
    assert np.isnan(value.numpy()[0]) and np.isnan(grad.numpy()[0]).all()
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), spec.reference_grad(logits, probs, **options), rtol=1e-10, atol=1e-14)
    if not normalize:  # the loss is linear in the (negative) target: the gradient is its derivative
        eps = 1e-6
        bumped = logits.copy()
        bumped[1, 2] += eps
        lowered = logits.copy()
        lowered[1, 2] -= eps
        numeric = (spec.reference_loss(bumped, probs, **options) - spec.reference_loss(lowered, probs, **options))[1]
        np.testing.assert_allclose(grad.numpy()[1, 2], numeric / (2 * eps), rtol=1e-6)


@pytest.mark.parametrize("jit", [None, True])
def test_huge_float64_logits_and_plus_inf(jit):
    logits = np.array([[1e155, 0.0, -1e155], [2e155, 1e155, 0.0], [np.inf, 0.0, 1.0]])
    labels = np.array([0, 2, 1])

    def value_and_grad(x, y):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = lsx.tensorflow.loss(x, y, label_smoothing=0.1, z_loss=0.0, reduction="none")
        return value, tape.gradient(value, x)

    if jit is not None:
        value_and_grad = tf.function(value_and_grad, jit_compile=jit)
    value, grad = value_and_grad(tf.constant(logits), tf.constant(labels))
    expected = spec.reference_loss(logits, labels, label_smoothing=0.1, reduction="none")
    assert np.isfinite(value.numpy()[:2]).all() and np.isnan(value.numpy()[2]) and np.isnan(grad.numpy()[2]).all()
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-12)
    np.testing.assert_allclose(
        grad.numpy(), spec.reference_grad(logits, labels, label_smoothing=0.1, reduction="none"), atol=1e-12
    )


# --------------------------------------------------------------------------------------------------------
# softcap, sample_weight, denominator
# --------------------------------------------------------------------------------------------------------
def _run(mode, fn, *args):
    """``fn(*args)`` eagerly, under ``tf.function`` or under XLA, the arguments as traced tensors."""
    if mode == "eager":
        return fn(*args)
    return tf.function(fn, jit_compile=mode == "xla")(*args)


MODES3 = ("eager", "function", "xla")


@pytest.mark.parametrize("mode", MODES3)
def test_softcap_matches_the_hand_written_formula(data, mode):
    logits, labels, _ = data
    labels = np.where(labels < 0, 0, labels)
    c, eps, k = 1.5, 0.1, logits.shape[1]
    capped = c * np.tanh(logits / c)
    lse = np.log(np.exp(capped).sum(axis=1))
    q = (1 - eps) * np.eye(k)[labels] + eps / k
    expected = np.mean((q * (lse[:, None] - capped)).sum(axis=1))
    p = np.exp(capped - lse[:, None])
    expected_grad = (p - q) * (1 - np.tanh(logits / c) ** 2) / len(labels)

    def f(x, y):
        return _value_and_grad(x, y, label_smoothing=eps, softcap=c)

    value, grad = _run(mode, f, tf.constant(logits), tf.constant(labels))
    np.testing.assert_allclose(float(value), expected, rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), expected_grad, rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("mode", MODES3)
def test_softcap_with_huge_and_minus_inf_logits_and_a_class_mask(mode):
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(5, 6))
    logits[0, 1], logits[1, 2], logits[2, 3] = 1e30, -np.inf, np.inf  # +inf is capped to c: finite
    logits[:, 5] = 1e30  # a padding lane at the cap must not leak mass
    mask = np.array([True] * 5 + [False])
    labels = np.array([0, 1, 2, 3, 4])
    options = dict(label_smoothing=0.1, softcap=30.0, class_mask=mask, z_loss=1e-3)

    def f(x, y):
        return _value_and_grad(x, y, **options)

    value, grad = _run(mode, f, tf.constant(logits), tf.constant(labels))
    np.testing.assert_allclose(float(value), float(spec.reference_loss(logits, labels, **options)), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), spec.reference_grad(logits, labels, **options), rtol=1e-9, atol=1e-15)
    assert np.isfinite(float(value)) and np.all(grad.numpy()[:, 5] == 0)


@pytest.mark.parametrize("mode", MODES3)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_sample_weight_formula_and_its_gradient(data, mode, reduction, kind):
    logits, labels, weight = data
    rng = np.random.default_rng(3)
    sw_value = rng.uniform(0.0, 2.0, size=len(labels))
    sw_value[4] = 0.0
    if kind == "probs":
        target = rng.dirichlet(np.ones(logits.shape[1]), size=len(labels))
        options = dict(label_smoothing=0.1, normalize=True, weight=weight)
    else:
        target = labels
        options = dict(label_smoothing=0.1, weight=weight, z_loss=1e-2)
    plain = spec.reference_loss(logits, target, reduction="none", **options)
    if kind == "index":
        counted = np.where(labels == -100, 0.0, weight[np.where(labels < 0, 0, labels)])
    else:
        counted = np.ones(len(labels))
    d = np.sum(sw_value * counted)
    expected = {"none": plain * sw_value, "sum": np.sum(plain * sw_value), "mean": np.sum(plain * sw_value) / d}
    sw_grad_expected = {"none": plain, "sum": plain, "mean": (plain - expected["mean"] * counted) / d}
    sw = tf.Variable(sw_value)

    def f(x, t):
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = lsx.tensorflow.loss(x, t, sample_weight=sw, reduction=reduction, **options)
            summed = tf.reduce_sum(value)
        return value, tape.gradient(summed, [x, sw])

    value, (grad, sw_grad) = _run(mode, f, tf.constant(logits), tf.constant(target))
    np.testing.assert_allclose(value.numpy(), expected[reduction], rtol=1e-12)
    np.testing.assert_allclose(sw_grad.numpy(), sw_grad_expected[reduction], rtol=1e-10, atol=1e-14)
    ref_grad = spec.reference_grad(logits, target, sample_weight=sw_value, reduction=reduction, **options)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("with_denominator", [False, True])
def test_sample_weight_gradient_matches_finite_differences(data, with_denominator):
    logits, labels, weight = data
    sw_value = np.random.default_rng(4).uniform(0.5, 2.0, size=len(labels))
    options = dict(label_smoothing=0.2, spread="others", weight=weight, softcap=2.0, normalize=True)
    if with_denominator:
        options["denominator"] = 13.0

    def value(sw):
        return float(lsx.tensorflow.loss(logits, labels, sample_weight=sw, **options))

    sw = tf.Variable(sw_value)
    with tf.GradientTape() as tape:
        out = lsx.tensorflow.loss(logits, labels, sample_weight=sw, **options)
    grad = tape.gradient(out, sw).numpy()
    h = 1e-6
    numeric = [(value(sw_value + h * e) - value(sw_value - h * e)) / (2 * h) for e in np.eye(len(labels))]
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", MODES3)
def test_denominator_formula_gradient_and_zero(data, mode):
    logits, labels, _ = data
    plain = spec.reference_loss(logits, labels, label_smoothing=0.1, reduction="none")

    def f(x, y, d):
        with tf.GradientTape() as tape:
            tape.watch([x, d])
            value = lsx.tensorflow.loss(x, y, label_smoothing=0.1, denominator=d)
        return (value, *tape.gradient(value, [x, d]))

    value, grad, d_grad = _run(mode, f, tf.constant(logits), tf.constant(labels), tf.constant(40.0, tf.float64))
    np.testing.assert_allclose(float(value), plain.sum() / 40.0, rtol=1e-12)
    np.testing.assert_allclose(float(d_grad), -plain.sum() / 40.0**2, rtol=1e-12)
    local = spec.reference_grad(logits, labels, label_smoothing=0.1)
    np.testing.assert_allclose(grad.numpy(), local * (len(labels) - 2) / 40.0, rtol=1e-10, atol=1e-15)
    for empty_mean, expected in (("nan", np.nan), ("zero", 0.0)):

        def g(x, y, d, empty_mean=empty_mean):
            return _value_and_grad(x, y, label_smoothing=0.1, denominator=d, empty_mean=empty_mean)

        value, grad = _run(mode, g, tf.constant(logits), tf.constant(labels), tf.constant(0.0, tf.float64))
        np.testing.assert_equal(float(value), expected)
        assert np.all(grad.numpy() == 0)


@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_gradient_accumulation_with_the_global_denominator_equals_one_big_batch(mode):
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(24, 9))
    labels = rng.integers(0, 9, size=24)
    labels[[1, 7, 8, 20]] = -100
    sw = rng.uniform(0.0, 2.0, size=24)
    weight = rng.uniform(0.5, 2.0, size=9)
    options = dict(label_smoothing=0.1, weight=weight, z_loss=1e-3)
    count = float(np.sum(np.where(labels == -100, 0.0, sw * weight[np.where(labels < 0, 0, labels)])))

    def grad_of(x, y, s, d=None):
        _, grad = _value_and_grad(x, y, sample_weight=s, denominator=d, **options)
        return grad

    if mode == "xla":
        grad_of = tf.function(grad_of, jit_compile=True)
    whole = grad_of(tf.constant(logits), tf.constant(labels), tf.constant(sw)).numpy()
    parts = [
        grad_of(tf.constant(logits[i : i + 8]), tf.constant(labels[i : i + 8]), tf.constant(sw[i : i + 8]), count)
        for i in range(0, 24, 8)
    ]
    np.testing.assert_allclose(np.concatenate([p.numpy() for p in parts]), whole, rtol=1e-12, atol=1e-17)


def _bound(fn, **options):
    return lambda x, t: fn(x, t, **options)


def test_spec2_options_compose_with_everything_against_the_reference():
    rng = np.random.default_rng(12)
    logits = rng.normal(scale=3.0, size=(3, 7, 4))  # class axis 1
    labels = rng.integers(0, 5, size=(3, 4)).astype(np.uint8)
    labels[0, 0] = 255
    probs = rng.dirichlet(np.ones(7), size=(3, 4)).transpose(0, 2, 1)
    probs[:, 5:] = 0
    mask = np.array([True] * 5 + [False] * 2)
    sw = rng.uniform(0.0, 2.0, size=(3, 4))
    for target, extra in ((labels, dict(ignore_index=255)), (probs, dict(normalize=True))):
        for reduction in ("none", "sum", "mean"):
            for spread in ("all", "others"):
                options = dict(
                    label_smoothing=0.15,
                    spread=spread,
                    weight=rng.uniform(0.5, 2.0, size=7),
                    z_loss=1e-2,
                    class_mask=mask,
                    softcap=4.0,
                    sample_weight=sw,
                    reduction=reduction,
                    **extra,
                )
                if reduction == "mean":
                    options["denominator"] = 5.5 if spread == "all" else None
                for jit in (False, True):
                    f = _bound(_value_and_grad, axis=1, **options)
                    value, grad = (tf.function(f, jit_compile=True) if jit else f)(
                        tf.constant(logits), tf.constant(target)
                    )
                    expected = spec.reference_loss(logits, target, axis=1, **options)
                    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-11)
                    ref_grad = spec.reference_grad(logits, target, axis=1, **options)
                    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-9, atol=1e-14)


def test_spec2_bad_values_raise_naming_the_option(data):
    logits, labels, _ = data
    n = len(labels)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="softcap"):
            lsx.tensorflow.loss(logits, labels, softcap=bad)
    for sw in (np.full(n, -1.0), np.full(n, np.nan), np.ones(n + 1), tf.constant(np.full(n, np.inf))):
        with pytest.raises(ValueError, match="sample_weight"):
            lsx.tensorflow.loss(logits, labels, sample_weight=sw)
    for d in (-1.0, float("inf"), tf.constant(-2.0)):
        with pytest.raises(ValueError, match="denominator"):
            lsx.tensorflow.loss(logits, labels, denominator=d)
    with pytest.raises(ValueError, match="denominator"):
        lsx.tensorflow.loss(logits, labels, denominator=3.0, reduction="sum")
    with pytest.raises(ValueError, match="denominator"):
        lsx.tensorflow.loss(logits, labels, denominator=np.ones(2))
    with pytest.raises(TypeError):
        lsx.tensorflow.loss(logits, labels, 0.1)  # keyword-only options


# --------------------------------------------------------------------------------------------------------
# Reliability, round 3: traced bad sample weights and denominators, tf.Variable denominators, softcap and
# weight ranges, non-real denominators, a massless target at −inf, gradients w.r.t. probability targets
# --------------------------------------------------------------------------------------------------------
def _traced_value_and_grads(mode, logits, labels, reduction="mean", **tensors):
    """The loss and its gradients w.r.t. the logits and every tensor option, under ``mode``."""
    names = list(tensors)

    def f(x, *values):
        with tf.GradientTape() as tape:
            tape.watch([x, *values])
            value = lsx.tensorflow.loss(x, labels, reduction=reduction, **dict(zip(names, values)))
        return (value, *tape.gradient(value, [x, *values]))

    return _run(mode, f, tf.constant(logits), *[tf.constant(v) for v in tensors.values()])


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad", [-1.0, np.inf, np.nan])
def test_a_traced_bad_sample_weight_gives_nan_loss_and_gradient(data, mode, reduction, bad):
    logits, labels, _ = data
    sw = np.ones(len(labels))
    sw[4] = bad
    value, grad, sw_grad = _traced_value_and_grads(mode, logits, labels, sample_weight=sw, reduction=reduction)
    value, grad = np.asarray(value), grad.numpy()
    assert np.isnan(sw_grad.numpy()[4])
    if reduction == "none":
        assert np.isnan(value[4]) and np.all(np.isnan(grad[4]))
        ok = np.arange(len(labels)) != 4
        np.testing.assert_allclose(value[ok], spec.reference_loss(logits, labels, reduction="none")[ok], rtol=1e-12)
    else:
        assert np.isnan(value) and np.any(np.isnan(grad))


@pytest.mark.parametrize("mode", ["function", "xla"])
@pytest.mark.parametrize("bad", [-3.0, np.inf, -np.inf, np.nan])
def test_a_traced_bad_denominator_gives_nan_loss_and_gradient(data, mode, bad):
    logits, labels, _ = data
    value, grad, _ = _traced_value_and_grads(mode, logits, labels, denominator=np.float64(bad))
    counted = labels != -100  # ignored elements keep their exact 0 gradient
    assert np.isnan(float(value)) and np.all(np.isnan(grad.numpy()[counted]))


@pytest.mark.parametrize("mode", ["function", "xla"])
def test_tf_variable_denominator_and_sample_weight_inside_tf_function(data, mode):
    logits, labels, _ = data
    n = len(labels)
    good_d, good_sw = tf.Variable(40.0, dtype=tf.float64), tf.Variable(np.linspace(0.5, 2.0, n))
    x = tf.Variable(logits)

    def step():
        with tf.GradientTape() as tape:
            value = lsx.tensorflow.loss(x, labels, denominator=good_d, sample_weight=good_sw)
        return value, tape.gradient(value, [x, good_d, good_sw])

    value, (grad, d_grad, _) = tf.function(step, jit_compile=mode == "xla")()
    sw = np.linspace(0.5, 2.0, n)
    np.testing.assert_allclose(float(d_grad), -float(value) / 40.0, rtol=1e-12)
    np.testing.assert_allclose(float(value), spec.reference_loss(logits, labels, sample_weight=sw, denominator=40.0),
                               rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), spec.reference_grad(logits, labels, sample_weight=sw, denominator=40.0),
                               rtol=1e-10, atol=1e-15)
    for bad_d, bad_sw in ((-2.0, sw), (np.inf, sw), (40.0, np.where(np.arange(n) == 3, -1.0, sw))):
        good_d.assign(bad_d)
        good_sw.assign(bad_sw)
        value, (grad, _, _) = tf.function(step, jit_compile=mode == "xla")()
        assert np.isnan(float(value)) and np.any(np.isnan(grad.numpy()))
    # eager: the variables' values are known, so they are checked
    with pytest.raises(ValueError, match="sample_weight"):
        lsx.tensorflow.loss(logits, labels, sample_weight=good_sw)
    good_sw.assign(sw)
    with pytest.raises(ValueError, match="denominator"):
        lsx.tensorflow.loss(logits, labels, denominator=tf.Variable(-1.0))


@pytest.mark.parametrize("dtype, cap", [("float32", 1e-39), ("float32", 1e39), ("bfloat16", 1e39), ("float16", 1e39),
                                        ("float64", 1e-320), ("float64", 1e308)])
@pytest.mark.parametrize("mode", MODES3)
def test_softcap_outside_the_dtypes_range_raises(data, dtype, cap, mode):
    logits, labels, _ = data
    with pytest.raises(ValueError, match="softcap"):
        _run(mode, lambda x: lsx.tensorflow.loss(x, labels, softcap=cap), tf.cast(tf.constant(logits), dtype))


@pytest.mark.parametrize("dtype, cap", [("float32", 1.2e-38), ("float32", 1e31), ("float64", 1e291)])
@pytest.mark.parametrize("mode", MODES3)
def test_softcap_at_the_ends_of_the_range_matches_the_reference(data, dtype, cap, mode):
    logits, labels, _ = data
    x = logits.astype(dtype)
    value, grad = _run(mode, lambda x: _value_and_grad(x, labels, softcap=cap, label_smoothing=0.1), tf.constant(x))
    rtol = 1e-5 if dtype == "float32" else 1e-10
    np.testing.assert_allclose(float(value), spec.reference_loss(x, labels, softcap=cap, label_smoothing=0.1),
                               rtol=rtol)
    np.testing.assert_allclose(grad.numpy(), spec.reference_grad(x, labels, softcap=cap, label_smoothing=0.1),
                               rtol=rtol, atol=rtol * 1e-2)


@pytest.mark.parametrize("options", [{"sample_weight": np.full(16, 1e39)}, {"weight": np.full(7, 1e39)},
                                     {"weight": np.full(7, 1e20), "sample_weight": np.full(16, 1e20)},
                                     {"weight": tf.constant(np.full(7, 1e30), tf.float32),
                                      "sample_weight": tf.constant(np.full(16, 1e30), tf.float32)}])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weights_that_could_overflow_float32_raise_naming_them(data, options, reduction):
    logits, labels, _ = data
    with pytest.raises(ValueError, match="weight"):
        lsx.tensorflow.loss(logits.astype(np.float32), labels, reduction=reduction, **options)


@pytest.mark.parametrize("bad", ["4", 4 + 0j, np.complex64(4), tf.constant(4 + 0j), tf.constant("4"),
                                 tf.constant(True)])
def test_a_denominator_that_is_not_a_real_number_raises_naming_it(data, bad):
    logits, labels, _ = data
    with pytest.raises(ValueError, match="denominator"):
        lsx.tensorflow.loss(logits, labels, denominator=bad)


@pytest.mark.parametrize("mode", MODES3)
@pytest.mark.parametrize("options", [{}, {"weight": np.array([0.5, 2.0, 1.0, 0.0, 3.0])},
                                     {"class_mask": np.array([True, True, True, True, False])},
                                     {"softcap": 3.0, "z_loss": 0.01, "normalize": True}])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_massless_target_at_minus_infinity_contributes_nothing(mode, options, reduction):
    x = np.array([[0.0, 0.2, -np.inf, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [-np.inf, 0.2, 0.7, 0.9, 1.0]])
    y = np.array([2, 1, 0])
    opts = dict(label_smoothing=1.0, spread="others", reduction=reduction, **options)
    value, grad = _run(mode, lambda x: _value_and_grad(x, y, **opts), tf.constant(x))
    np.testing.assert_allclose(np.asarray(value), spec.reference_loss(x, y, **opts), rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), spec.reference_grad(x, y, **opts), rtol=1e-10, atol=1e-15)


@pytest.mark.parametrize("mode", MODES3)
@pytest.mark.parametrize(
    "options",
    [{"label_smoothing": 0.1}, {"reduction": "none"}, {"reduction": "sum", "softcap": 2.0},
     {"label_smoothing": 0.2, "normalize": True, "z_loss": 0.01, "weight": np.linspace(0.2, 2.0, 5)},
     {"sample_weight": np.linspace(0.5, 1.5, 4), "class_mask": np.array([True, True, True, True, False])}],
)
def test_gradient_with_respect_to_probability_targets(mode, options):
    """∂loss/∂t_c = a·w_c·[(L − x_c) + normalize·(log q_c + 1)], checked against central differences."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 5))
    t = rng.dirichlet(np.ones(5), size=4)
    if "class_mask" in options:
        t[:, 4] = 0
        t /= t.sum(axis=1, keepdims=True)

    def f(x, t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            value = tf.reduce_sum(lsx.tensorflow.loss(x, t, **options))
        return tape.gradient(value, t)

    grad = _run(mode, f, tf.constant(x), tf.constant(t)).numpy()
    total = lambda t: float(np.sum(spec.reference_loss(x, t, **options)))
    h = 1e-6
    numeric = np.zeros_like(t)
    classes = 4 if "class_mask" in options else 5  # mass on a masked class is an error: no derivative there
    for i in range(4):
        for c in range(classes):
            e = np.zeros_like(t)
            e[i, c] = h
            numeric[i, c] = (total(t + e) - total(t - e)) / (2 * h)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-8)
    assert grad.dtype == np.float64


@pytest.mark.parametrize("mode", MODES3)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_massless_target_at_minus_infinity_weight_gradient(mode, reduction):
    x = np.array([[0.0, 0.2, -np.inf, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [-np.inf, 0.2, 0.7, 0.9, 1.0]])
    y = np.array([2, 1, 0])
    w = np.array([0.5, 2.0, 1.0, 0.7, 3.0])
    opts = dict(label_smoothing=1.0, spread="others", reduction=reduction, z_loss=0.01)

    def f(x, w):
        with tf.GradientTape() as tape:
            tape.watch(w)
            value = lsx.tensorflow.loss(x, y, weight=w, **opts)
        return tape.gradient(value, w)

    grad = _run(mode, f, tf.constant(x), tf.constant(w)).numpy()
    total = lambda w: float(spec.reference_loss(x, y, weight=w, **opts))
    numeric = np.array([(total(w + 1e-6 * e) - total(w - 1e-6 * e)) / 2e-6 for e in np.eye(5)])
    np.testing.assert_allclose(grad, numeric, rtol=1e-6)
