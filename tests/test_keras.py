"""lsx.keras against Keras's own losses: parity, reductions, sample weights, model.fit, saving, JAX backend."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
import lsx.keras  # noqa: E402
from lsx import spec  # noqa: E402

K = 6


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=2.0, size=(12, K)).astype(np.float32)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs = exp / exp.sum(axis=1, keepdims=True)
    probs[0] = [1.0, 0, 0, 0, 0, 0]  # exercises the [1e-7, 1 − 1e-7] clip
    labels = rng.integers(0, K, size=12)
    labels[0] = 3
    sample_weight = rng.uniform(0.0, 2.0, size=12).astype(np.float32)
    return logits, probs, labels, sample_weight


def _close(actual, expected, rtol=2e-6):
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(actual), keras.ops.convert_to_numpy(expected), rtol=rtol, atol=1e-7
    )


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "none", "mean_with_sample_weight"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_sparse_smoothing_equals_keras_categorical_on_one_hot(data, eps, from_logits, weighted, reduction):
    logits, probs, labels, sample_weight = data
    y_pred = logits if from_logits else probs
    sw = sample_weight if weighted else None
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=from_logits, label_smoothing=eps, reduction=reduction)
    theirs = keras.losses.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=eps, reduction=reduction)
    _close(ours(labels, y_pred, sample_weight=sw), theirs(np.eye(K)[labels], y_pred, sample_weight=sw))


@pytest.mark.parametrize("from_logits", [True, False])
def test_categorical_equals_keras_categorical(data, from_logits):
    logits, probs, _, sample_weight = data
    y_pred = logits if from_logits else probs
    target = np.random.default_rng(0).dirichlet(np.ones(K), size=12)
    for eps in (0.0, 0.2):
        ours = lsx.keras.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=eps)
        theirs = keras.losses.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=eps)
        _close(ours(target, y_pred, sample_weight=sample_weight), theirs(target, y_pred, sample_weight=sample_weight))


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "none"])
def test_ignore_class_equals_keras_sparse(data, reduction):
    logits, _, labels, sample_weight = data
    labels = labels.copy()
    labels[[1, 5, 6]] = -1
    for sw in (None, sample_weight):
        ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1, reduction=reduction)
        theirs = keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1, reduction=reduction)
        _close(ours(labels, logits, sample_weight=sw), theirs(labels, logits, sample_weight=sw))


def test_ignore_class_with_smoothing_averages_over_the_kept_elements(data):
    logits, _, labels, sample_weight = data
    labels = labels.copy()
    labels[[1, 5, 6]] = 255
    kept = labels != 255
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, ignore_class=255, label_smoothing=0.1)
    summed = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1, reduction="sum")
    one_hot = np.eye(K)[np.where(kept, labels, 0)]
    _close(
        ours(labels, logits, sample_weight=sample_weight),
        summed(one_hot, logits, sample_weight=sample_weight * kept) / kept.sum(),
    )


def test_everything_ignored_gives_zero_like_keras_or_nan_on_request(data):
    logits, _, _, _ = data
    labels = np.full(12, -1)
    assert (
        float(
            lsx.keras.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1, label_smoothing=0.1)(
                labels, logits
            )
        )
        == 0.0
    )
    assert float(keras.losses.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)(labels, logits)) == 0.0
    nan_loss = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1, empty_mean="nan")
    assert np.isnan(float(nan_loss(labels, logits)))


def test_labels_of_shape_n_by_1_and_class_axis_1(data):
    logits, _, labels, _ = data
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    _close(ours(labels[:, None], logits), ours(labels, logits))
    moved = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1, axis=0)
    _close(moved(labels, logits.T), ours(labels, logits))


@pytest.mark.parametrize(
    "options",
    [
        {"label_smoothing": 0.2, "spread": "others", "weight": np.linspace(0.5, 2.0, K)},
        {"label_smoothing": 0.1, "z_loss": 1e-2, "normalize": True},
        {"label_smoothing": 0.1, "class_mask": np.array([True] * (K - 2) + [False] * 2)},
    ],
    ids=["others-weight", "z-normalize", "class-mask"],
)
def test_lsx_options_match_the_reference(data, options):
    logits, _, labels, _ = data
    labels = labels % (K - 2)
    x = logits.astype(np.float64)
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, dtype="float64", reduction="none", **options)
    expected = spec.reference_loss(x, labels, reduction="none", **options)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(labels, x)), expected, rtol=1e-12)
    probs = np.eye(K)[labels]
    dense = lsx.keras.CategoricalCrossentropy(from_logits=True, dtype="float64", reduction="none", **options)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(dense(probs, x)), expected, rtol=1e-12)


def test_functional_loss_gradient_matches_reference(data):
    import tensorflow as tf

    if keras.backend.backend() != "tensorflow":
        pytest.skip("gradient taken with tf.GradientTape")
    logits, _, labels, _ = data
    x = tf.constant(logits.astype(np.float64))
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = lsx.keras.loss(x, labels, label_smoothing=0.1, z_loss=1e-3)
    grad = tape.gradient(value, x)
    np.testing.assert_allclose(
        value.numpy(), spec.reference_loss(logits, labels, label_smoothing=0.1, z_loss=1e-3), rtol=1e-12
    )
    np.testing.assert_allclose(
        grad.numpy(), spec.reference_grad(logits, labels, label_smoothing=0.1, z_loss=1e-3), atol=1e-14
    )


def test_bad_labels(data):
    logits, _, labels, _ = data
    bad = labels.copy()
    bad[3] = K
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    with pytest.raises(ValueError, match=f"label {K}"):
        ours(bad, logits)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        assert np.isnan(float(tf.function(ours)(tf.constant(bad), tf.constant(logits))))
    with pytest.raises(ValueError, match="z_loss needs logits"):
        lsx.keras.SparseCategoricalCrossentropy(z_loss=1e-4)
    with pytest.raises(ValueError, match="label_smoothing"):
        lsx.keras.SparseCategoricalCrossentropy(label_smoothing=-0.1)


def test_config_round_trip():
    loss = lsx.keras.SparseCategoricalCrossentropy(
        from_logits=True,
        ignore_class=-1,
        label_smoothing=0.1,
        spread="others",
        weight=[1.0, 2.0, 1.0],
        class_mask=[True, True, False],
        empty_mean="nan",
        name="smoothed",
    )
    config = loss.get_config()
    again = lsx.keras.SparseCategoricalCrossentropy.from_config(config)
    assert again.get_config() == config
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is lsx.keras.SparseCategoricalCrossentropy and restored.get_config() == config
    dense = lsx.keras.CategoricalCrossentropy(label_smoothing=0.2, axis=1)
    assert lsx.keras.CategoricalCrossentropy.from_config(dense.get_config()).get_config() == dense.get_config()


def _model(seed):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"), keras.layers.Dense(K)])


def test_model_fit_trains_and_saved_model_reloads(tmp_path):
    rng = np.random.default_rng(3)
    features = rng.normal(size=(256, 8)).astype(np.float32)
    labels = (features[:, :K].argmax(axis=1)).astype(np.int32)
    model = _model(0)
    loss = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1, ignore_class=-1)
    model.compile(optimizer=keras.optimizers.Adam(0.02), loss=loss)
    history = model.fit(features, labels, batch_size=64, epochs=8, verbose=0).history["loss"]
    assert history[-1] < 0.6 * history[0]

    path = tmp_path / "model.keras"
    model.save(path)
    reloaded = keras.models.load_model(path)
    assert type(reloaded.loss) is lsx.keras.SparseCategoricalCrossentropy
    assert reloaded.loss.get_config() == loss.get_config()
    np.testing.assert_allclose(
        reloaded.evaluate(features, labels, verbose=0), model.evaluate(features, labels, verbose=0), rtol=1e-6
    )


JAX_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax, keras, lsx.keras
    from lsx import spec
    assert keras.backend.backend() == "jax"
    rng = np.random.default_rng(0)
    x = rng.normal(size=(10, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=10)
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    theirs = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    np.testing.assert_allclose(ours(y, x), theirs(np.eye(5)[y], x), rtol=2e-6)
    p = np.asarray(jax.nn.softmax(x))
    np.testing.assert_allclose(
        lsx.keras.SparseCategoricalCrossentropy(label_smoothing=0.1)(y, p),
        keras.losses.CategoricalCrossentropy(label_smoothing=0.1)(np.eye(5)[y], p), rtol=2e-6)
    grad = jax.grad(lambda v: lsx.keras.loss(v, y, label_smoothing=0.1, z_loss=1e-3))(x)
    np.testing.assert_allclose(grad, spec.reference_grad(x, y, label_smoothing=0.1, z_loss=1e-3), atol=2e-7)
    bad = y.copy(); bad[2] = 5
    try:
        ours(bad, x)
        raise AssertionError("no error")
    except ValueError as error:
        assert "label 5" in str(error)
    assert np.isnan(jax.jit(lambda t: ours(t, x))(bad))
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(5)])
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=ours)
    losses = model.fit(x, y, epochs=10, verbose=0).history["loss"]
    assert losses[-1] < losses[0], losses
    print("jax ok")
    """
)


def test_jax_backend_in_a_subprocess():
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", JAX_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "jax ok" in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------
# Regressions: tf.Variable predictions, empty batches, label dtypes, ignore_index/convention options,
# the same bad-label behaviour on every Keras backend
# --------------------------------------------------------------------------------------------------------
def test_variable_predictions_on_tensorflow(data):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.Variable is a TensorFlow type")
    import tensorflow as tf

    logits, _, labels, _ = data
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    variable = tf.Variable(logits)
    with tf.GradientTape() as tape:
        value = ours(labels, variable)
    grad = tape.gradient(value, variable)
    _close(value, ours(labels, logits))
    np.testing.assert_allclose(grad.numpy(), spec.reference_grad(logits, labels, label_smoothing=0.1), atol=1e-7)
    _close(lsx.keras.loss(variable, labels), lsx.keras.loss(logits, labels))


def test_functional_loss_on_an_empty_batch():
    x = np.zeros((0, K), np.float32)
    y = np.zeros((0,), np.int64)
    assert np.isnan(float(lsx.keras.loss(x, y)))
    assert float(lsx.keras.loss(x, y, empty_mean="zero")) == 0.0
    assert float(lsx.keras.loss(x, y, reduction="sum")) == 0.0
    assert np.isnan(float(lsx.keras.loss(x, np.zeros((0, K), np.float32))))


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"])
def test_every_label_dtype(dtype):
    k = 300 if np.iinfo(dtype).max >= 300 else 200
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(5, k)).astype(np.float32)
    labels = np.array([0, 3, min(k - 1, np.iinfo(dtype).max), 100, 7], dtype)
    expected = spec.reference_loss(logits, labels, label_smoothing=0.1, ignore_index=None)
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1)
    _close(ours(labels, logits), expected, rtol=1e-5)
    _close(lsx.keras.loss(logits, labels, label_smoothing=0.1, ignore_index=None), expected, rtol=1e-5)


@pytest.mark.parametrize(
    "dtype,value", [("int64", 2**32 + 1), ("int64", -(2**32) + 2), ("uint32", 2**32 - 1), ("uint64", 2**64 - 1)]
)
def test_labels_beyond_int32_never_wrap_into_valid_ones(data, dtype, value):
    logits, _, labels, _ = data
    bad = labels.astype(dtype)
    bad[2] = value
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-1)
    with pytest.raises(ValueError, match=f"label {value}"):
        ours(bad, logits)
    with pytest.raises(ValueError, match=f"label {value}"):
        lsx.keras.loss(logits, bad, ignore_index=-1)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        traced = tf.function(lambda t, x: lsx.keras.loss(x, t, ignore_index=-1, reduction="none"))
        out = traced(tf.constant(bad), tf.constant(logits)).numpy()
        assert np.isnan(out[2]) and np.isfinite(np.delete(out, 2)).all()


def test_ignore_index_and_convention_keywords():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(8, K))
    labels = rng.integers(0, K, size=8)
    labels[[1, 4]] = -100
    by_index = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, ignore_index=-100, dtype="float64")
    by_class = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, ignore_class=-100, dtype="float64")
    _close(by_index(labels, logits), by_class(labels, logits), rtol=1e-12)
    assert by_index.get_config()["ignore_class"] == -100
    with pytest.raises(ValueError, match="ignore_class=-1 and ignore_index=-100"):
        lsx.keras.SparseCategoricalCrossentropy(ignore_class=-1, ignore_index=-100)
    # presets: torch ignores −100 and gives NaN for an empty mean; explicit options win
    torch_like = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, convention="torch", dtype="float64")
    np.testing.assert_allclose(
        float(torch_like(labels, logits)), float(spec.reference_loss(logits, labels)), rtol=1e-12
    )
    assert np.isnan(float(torch_like(np.full(8, -100), logits)))
    fairseq = lsx.keras.SparseCategoricalCrossentropy(
        from_logits=True, convention="fairseq", label_smoothing=0.1, ignore_index=-100, dtype="float64"
    )
    assert fairseq.reduction == "sum" and fairseq.spread == "others" and fairseq.ignore_class == -100
    expected = spec.reference_loss(logits, labels, convention="fairseq", label_smoothing=0.1, ignore_index=-100)
    np.testing.assert_allclose(float(fairseq(labels, logits)), float(expected), rtol=1e-12)
    hf = lsx.keras.CategoricalCrossentropy(from_logits=True, convention="hf", dtype="float64", reduction="none")
    probs = np.eye(K)[np.where(labels < 0, 0, labels)]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(hf(probs, logits)),
        spec.reference_loss(logits, probs, convention="hf", reduction="none"),
        rtol=1e-12,
    )
    for loss in (torch_like, fairseq, hf, by_index):
        config = loss.get_config()
        again = type(loss).from_config(config)
        assert again.get_config() == config
        restored = keras.losses.deserialize(keras.losses.serialize(loss))
        assert restored.get_config() == config
    explicit_none = lsx.keras.SparseCategoricalCrossentropy(convention="torch", ignore_index=None)
    assert explicit_none.ignore_class is None
    assert type(explicit_none).from_config(explicit_none.get_config()).ignore_class is None


BAD_LABEL_SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras, lsx.keras
    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 4)).astype(np.float32)
    y = rng.integers(0, 4, size=16)
    y[3] = -100
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1)

    def raises(f):
        try:
            f()
        except ValueError as error:
            assert "label -100" in str(error), error
            return True
        return False

    assert raises(lambda: ours(y, x))  # eager call: known values
    good = np.where(y < 0, 1, y)
    reference = float(ours(good, x))
    for dtype in ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"):
        assert abs(float(ours(good.astype(dtype), x)) - reference) < 1e-6, dtype
    for dtype, value in (("int64", 2**32 + 1), ("uint32", 2**32 - 1), ("uint64", 2**64 - 1)):
        wrapped = good.astype(dtype)
        wrapped[5] = value
        try:
            ours(wrapped, x)
            raise AssertionError(f"{dtype} label {value} accepted")
        except ValueError as error:
            assert f"label {value}" in str(error), error
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])
    if backend != "jax":  # (Keras 3.15 cannot build a model with run_eagerly=True on JAX)
        model.compile(optimizer="sgd", loss=ours, run_eagerly=True)
        assert raises(lambda: model.fit(x, y, epochs=1, verbose=0))  # run eagerly: known values
    if backend == "tensorflow":
        import tensorflow as tf
        assert np.isnan(float(tf.function(ours)(tf.constant(y), tf.constant(x))))
    if backend == "jax":
        import jax
        assert np.isnan(float(jax.jit(lambda t: ours(t, x))(y)))
    if backend != "torch":  # model.fit traces on TensorFlow and JAX: values unknown, so NaN
        model.compile(optimizer="sgd", loss=ours)
        assert np.isnan(model.fit(x, y, epochs=1, verbose=0).history["loss"][-1])
    else:  # the PyTorch backend runs model.fit eagerly: the values are known
        model.compile(optimizer="sgd", loss=ours)
        assert raises(lambda: model.fit(x, y, epochs=1, verbose=0))
    ignoring = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1, ignore_index=-100)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4)])  # the NaN step above spoilt the weights
    model.compile(optimizer="sgd", loss=ignoring)
    assert np.isfinite(model.fit(x, y, epochs=1, verbose=0).history["loss"][-1])
    print(backend, "ok")
    """
)


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_bad_labels_raise_when_known_and_give_nan_when_traced_on_every_backend(backend):
    pytest.importorskip(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", BAD_LABEL_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and f"{backend} ok" in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------
# softcap, sample_weight, denominator: the functional loss (lsx's meaning) and the classes (Keras's
# sample_weight call argument; softcap and denominator as constructor keywords)
# --------------------------------------------------------------------------------------------------------
def _grads(fn, *args):
    """(value, gradients of sum(value) w.r.t. every argument) with the active backend's autodiff."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        args = [tf.constant(a) for a in args]
        with tf.GradientTape() as tape:
            tape.watch(args)
            value = fn(*args)
            total = tf.reduce_sum(value)
        return value, tape.gradient(total, args)
    if backend == "jax":
        import jax

        value = fn(*args)
        return value, jax.grad(lambda *a: fn(*a).sum(), argnums=tuple(range(len(args))))(*args)
    import torch

    args = [torch.tensor(a, requires_grad=True) for a in args]
    value = fn(*args)
    return value, torch.autograd.grad(value.sum(), args)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_functional_sample_weight_softcap_and_gradients_against_formula(data, reduction, kind):
    logits, probs, labels, sample_weight = (np.asarray(a, np.float64) if a.dtype.kind == "f" else a for a in data)
    labels = labels.copy()
    labels[5] = -100
    weight = np.linspace(0.5, 2.0, K)
    target = labels if kind == "index" else probs
    options = dict(label_smoothing=0.1, weight=weight, softcap=2.5, z_loss=1e-2, reduction=reduction)
    plain = spec.reference_loss(logits, target, **{**options, "reduction": "none"})
    counted = np.where(labels == -100, 0.0, weight[np.where(labels < 0, 0, labels)]) if kind == "index" else np.ones(12)
    d = np.sum(sample_weight * counted)
    mean = np.sum(plain * sample_weight) / d
    expected = {"none": plain * sample_weight, "sum": np.sum(plain * sample_weight), "mean": mean}[reduction]
    expected_sw_grad = {"none": plain, "sum": plain, "mean": (plain - mean * counted) / d}[reduction]

    value, (grad, sw_grad) = _grads(
        lambda x, sw: lsx.keras.loss(x, target, sample_weight=sw, **options), logits, sample_weight
    )
    np.testing.assert_allclose(keras.ops.convert_to_numpy(value), expected, rtol=1e-12)
    ref_grad = spec.reference_grad(logits, target, sample_weight=sample_weight, **options)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(grad), ref_grad, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(sw_grad), expected_sw_grad, rtol=1e-9, atol=1e-14)


def test_functional_denominator_zero_and_gradient_accumulation(data):
    logits, _, labels, sample_weight = data
    logits, sample_weight = logits.astype(np.float64), sample_weight.astype(np.float64)
    labels = labels.copy()
    labels[[1, 6]] = -100
    options = dict(label_smoothing=0.1, z_loss=1e-3, softcap=3.0)
    count = float(np.sum(np.where(labels == -100, 0.0, sample_weight)))
    _, (whole, _) = _grads(lambda x, sw: lsx.keras.loss(x, labels, sample_weight=sw, **options), logits, sample_weight)
    parts = []
    for i in range(0, 12, 4):
        sl = slice(i, i + 4)
        _, (part, _) = _grads(
            lambda x, sw, sl=sl: lsx.keras.loss(x, labels[sl], sample_weight=sw, denominator=count, **options),
            logits[sl],
            sample_weight[sl],
        )
        parts.append(keras.ops.convert_to_numpy(part))
    np.testing.assert_allclose(np.concatenate(parts), keras.ops.convert_to_numpy(whole), rtol=1e-12, atol=1e-17)
    for empty_mean, expected in (("nan", np.nan), ("zero", 0.0)):
        value, (grad,) = _grads(
            lambda x, e=empty_mean: lsx.keras.loss(x, labels, denominator=0.0, empty_mean=e), logits
        )
        np.testing.assert_equal(float(keras.ops.convert_to_numpy(value)), expected)
        assert np.all(keras.ops.convert_to_numpy(grad) == 0)
    value = lsx.keras.loss(logits, labels, label_smoothing=0.1, denominator=40.0)
    expected = spec.reference_loss(logits, labels, label_smoothing=0.1, reduction="sum") / 40.0
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(value)), expected, rtol=1e-12)


def test_functional_softcap_with_huge_and_minus_inf_logits_and_a_class_mask():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=(5, 6))
    logits[0, 1], logits[1, 2], logits[2, 3] = 1e30, -np.inf, np.inf
    logits[:, 5] = 1e30  # a padding lane at the cap must not leak mass
    labels = np.arange(5)
    options = dict(label_smoothing=0.1, softcap=30.0, class_mask=np.array([True] * 5 + [False]), z_loss=1e-3)
    value, (grad,) = _grads(lambda x: lsx.keras.loss(x, labels, **options), logits)
    np.testing.assert_allclose(float(keras.ops.convert_to_numpy(value)), spec.reference_loss(logits, labels, **options))
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(grad), spec.reference_grad(logits, labels, **options), rtol=1e-9, atol=1e-15
    )


def test_functional_spec2_bad_values_raise_naming_the_option(data):
    logits, _, labels, _ = data
    with pytest.raises(ValueError, match="softcap"):
        lsx.keras.loss(logits, labels, softcap=0.0)
    for sw in (np.full(12, -1.0), np.full(12, np.nan), np.ones(13)):
        with pytest.raises(ValueError, match="sample_weight"):
            lsx.keras.loss(logits, labels, sample_weight=sw)
    for d in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="denominator"):
            lsx.keras.loss(logits, labels, denominator=d)
    with pytest.raises(ValueError, match="denominator"):
        lsx.keras.loss(logits, labels, denominator=2.0, reduction="sum")


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "mean_with_sample_weight", "sum", "none"])
def test_classes_softcap_and_denominator_keep_keras_sample_weight(data, reduction):
    logits, probs, labels, sample_weight = (a.astype(np.float64) if a.dtype.kind == "f" else a for a in data)
    labels = labels.copy()
    labels[3] = -1
    mask = labels != -1
    plain = spec.reference_loss(logits, labels, label_smoothing=0.1, softcap=2.0, ignore_index=-1, reduction="none")
    weighted = plain * sample_weight * mask
    expected = {
        "sum_over_batch_size": weighted.sum() / mask.sum(),  # Keras: the count of non-masked elements
        "mean_with_sample_weight": weighted.sum() / np.sum(sample_weight * mask),
        "sum": weighted.sum(),
        "none": weighted,
    }[reduction]
    common = dict(from_logits=True, label_smoothing=0.1, softcap=2.0, ignore_class=-1, dtype="float64")
    ours = lsx.keras.SparseCategoricalCrossentropy(reduction=reduction, **common)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ours(labels, logits, sample_weight)), expected, rtol=1e-12)
    if reduction in ("sum", "none"):
        with pytest.raises(ValueError, match="denominator"):
            lsx.keras.SparseCategoricalCrossentropy(reduction=reduction, denominator=7.0, **common)
        return
    with_d = lsx.keras.SparseCategoricalCrossentropy(reduction=reduction, denominator=7.0, **common)
    np.testing.assert_allclose(float(with_d(labels, logits, sample_weight)), weighted.sum() / 7.0, rtol=1e-12)
    zero = lsx.keras.SparseCategoricalCrossentropy(reduction=reduction, denominator=0.0, **common)
    assert float(zero(labels, logits, sample_weight)) == 0.0  # Keras's empty_mean="zero"
    dense = lsx.keras.CategoricalCrossentropy(
        from_logits=True, softcap=2.0, denominator=5.0, reduction=reduction, dtype="float64"
    )
    expected_dense = np.sum(spec.reference_loss(logits, probs, softcap=2.0, reduction="none") * sample_weight) / 5.0
    np.testing.assert_allclose(float(dense(probs, logits, sample_weight)), expected_dense, rtol=1e-12)
    for loss in (with_d, dense):
        config = loss.get_config()
        assert config["softcap"] == 2.0 and config["denominator"] in (7.0, 5.0)
        restored = keras.losses.deserialize(keras.losses.serialize(loss))
        assert restored.get_config() == config and restored.denominator == loss.denominator


def test_classes_spec2_bad_values():
    with pytest.raises(ValueError, match="softcap needs logits"):
        lsx.keras.SparseCategoricalCrossentropy(softcap=30.0)
    with pytest.raises(ValueError, match="softcap"):
        lsx.keras.SparseCategoricalCrossentropy(from_logits=True, softcap=-1.0)
    for d in (-1.0, float("inf"), "3", np.ones(2)):
        with pytest.raises(ValueError, match="denominator"):
            lsx.keras.CategoricalCrossentropy(from_logits=True, denominator=d)


SPEC2_SCRIPT = textwrap.dedent(
    """
    import numpy as np, keras, lsx.keras
    from lsx import spec
    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3.0, size=(10, 5)).astype(np.float32)
    y = rng.integers(0, 5, size=10)
    sw = rng.uniform(0.0, 2.0, size=10).astype(np.float32)
    opts = dict(label_smoothing=0.1, softcap=2.0, sample_weight=sw, denominator=6.0)
    value = lsx.keras.loss(x, y, **opts)
    np.testing.assert_allclose(float(value), float(spec.reference_loss(x, y, **opts)), rtol=2e-6)
    if backend == "jax":
        import jax
        grad = jax.grad(lambda v: lsx.keras.loss(v, y, **opts))(x)
        jitted = jax.jit(lambda v, s: lsx.keras.loss(v, y, label_smoothing=0.1, softcap=2.0, sample_weight=s))(x, sw)
        expected = spec.reference_loss(x, y, label_smoothing=0.1, softcap=2.0, sample_weight=sw)
        np.testing.assert_allclose(float(jitted), float(expected), rtol=2e-6)
    else:
        import torch
        v = torch.tensor(x, requires_grad=True)
        lsx.keras.loss(v, y, **opts).backward()
        grad = v.grad
    np.testing.assert_allclose(np.asarray(grad), spec.reference_grad(x, y, **opts), atol=2e-7)
    ours = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.1, softcap=2.0, denominator=6.0)
    expected = np.sum(spec.reference_loss(x, y, label_smoothing=0.1, softcap=2.0, reduction="none") * sw) / 6.0
    np.testing.assert_allclose(float(ours(y, x, sw)), expected, rtol=2e-6)
    print(backend, "ok")
    """
)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_spec2_options_on_the_other_keras_backends(backend):
    pytest.importorskip(backend)
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run([sys.executable, "-c", SPEC2_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and f"{backend} ok" in result.stdout, result.stderr[-3000:]


# --------------------------------------------------------------------------------------------------------
# Reliability, round 3: traced bad sample weights and denominators give NaN (tf.function here, jax.jit in a
# subprocess), softcap and weight ranges, non-real denominators, a massless target at −inf
# --------------------------------------------------------------------------------------------------------
_X3 = np.array([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
_Y3 = np.array([2, 1, 0])


def _tensorflow_backend():
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.function and tf.Variable are TensorFlow's")
    import tensorflow as tf

    return tf


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bad", [-1.0, np.inf, np.nan])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_traced_bad_sample_weight_gives_nan_under_tf_function(data, reduction, bad, jit_compile):
    tf = _tensorflow_backend()
    logits, _, labels, sample_weight = data
    sw = sample_weight.copy()
    sw[5] = bad
    x = tf.Variable(logits)

    @tf.function(jit_compile=jit_compile)
    def step(s):
        with tf.GradientTape() as tape:
            value = lsx.keras.loss(x, labels, sample_weight=s, reduction=reduction)
            total = tf.reduce_sum(value)
        return value, tape.gradient(total, x)

    value, grad = step(tf.constant(sw))
    value, grad = np.asarray(value), grad.numpy()
    if reduction == "none":
        assert np.isnan(value[5]) and np.all(np.isnan(grad[5]))
        ok = np.arange(len(labels)) != 5
        expected = spec.reference_loss(logits, labels, reduction="none") * sample_weight
        np.testing.assert_allclose(value[ok], expected[ok], rtol=2e-6)
    else:
        assert np.isnan(value) and np.any(np.isnan(grad))


@pytest.mark.parametrize("bad", [-3.0, np.inf, np.nan])
@pytest.mark.parametrize("variable", [False, True])
def test_traced_bad_denominator_gives_nan_under_tf_function(data, bad, variable):
    tf = _tensorflow_backend()
    logits, _, labels, _ = data
    x = tf.Variable(logits)
    d = tf.Variable(bad, dtype=tf.float32) if variable else None

    @tf.function
    def step(value_of_d):
        with tf.GradientTape() as tape:
            value = lsx.keras.loss(x, labels, denominator=d if variable else value_of_d)
        return value, tape.gradient(value, x)

    value, grad = step(tf.constant(bad, tf.float32))
    assert np.isnan(float(value)) and np.all(np.isnan(grad.numpy()))
    if variable:  # a valid value in the same variable works, and eagerly the variable is checked
        d.assign(6.0)
        value, _ = step(tf.constant(0.0))
        np.testing.assert_allclose(float(value), spec.reference_loss(logits, labels, denominator=6.0), rtol=2e-6)
        with pytest.raises(ValueError, match="denominator"):
            lsx.keras.loss(logits, labels, denominator=tf.Variable(-1.0))


@pytest.mark.parametrize("dtype, cap", [("float32", 1e-39), ("float32", 1e39), ("float64", 1e-320), ("float64", 1e308)])
def test_softcap_outside_the_dtypes_range_raises(dtype, cap):
    if dtype == "float64" and keras.backend.backend() == "jax":
        pytest.skip("JAX without x64 has no float64 logits")
    x = _X3.astype(dtype)
    with pytest.raises(ValueError, match="softcap"):
        lsx.keras.loss(x, _Y3, softcap=cap)
    with pytest.raises(ValueError, match="softcap"):
        lsx.keras.SparseCategoricalCrossentropy(from_logits=True, softcap=cap, dtype=dtype)(_Y3, x)
    with pytest.raises(ValueError, match="softcap"):
        lsx.keras.CategoricalCrossentropy(from_logits=True, softcap=cap, dtype=dtype)(np.eye(5)[_Y3], x)


@pytest.mark.parametrize("dtype, cap", [("float32", 1.2e-38), ("float32", 1e31), ("float64", 1e291)])
def test_softcap_at_the_ends_of_the_range_matches_the_reference(dtype, cap):
    x = _X3.astype(dtype)
    value = float(lsx.keras.loss(x, _Y3, softcap=cap, label_smoothing=0.1))
    expected = float(spec.reference_loss(x, _Y3, softcap=cap, label_smoothing=0.1))
    np.testing.assert_allclose(value, expected, rtol=2e-6 if dtype == "float32" else 1e-12)


@pytest.mark.parametrize("options", [{"sample_weight": np.array([1e39, 1.0, 2.0])},
                                     {"weight": np.array([1e39, 1, 1, 1, 1.0])},
                                     {"weight": np.full(5, 1e20), "sample_weight": np.full(3, 1e20)}])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_that_could_overflow_float32_raise_naming_them(options, reduction):
    with pytest.raises(ValueError, match="weight"):
        lsx.keras.loss(_X3.astype(np.float32), _Y3, reduction=reduction, **options)
    loss = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, weight=options.get("weight"))
    with pytest.raises(ValueError, match="weight"):  # Keras's own sample_weight argument alike
        loss(_Y3, _X3.astype("float32"), options.get("sample_weight"))


@pytest.mark.parametrize("bad", ["4", 4 + 0j, np.complex64(4), np.array(4 + 0j), np.array(True)])
def test_a_denominator_that_is_not_a_real_number_raises_naming_it(bad):
    with pytest.raises(ValueError, match="denominator"):
        lsx.keras.loss(_X3, _Y3, denominator=bad)
    with pytest.raises(ValueError, match="denominator"):
        lsx.keras.SparseCategoricalCrossentropy(from_logits=True, denominator=bad)


@pytest.mark.parametrize("options", [{}, {"weight": np.array([0.5, 2.0, 1.0, 0.0, 3.0])},
                                     {"class_mask": np.array([True, True, True, True, False])},
                                     {"softcap": 3.0, "z_loss": 0.01, "normalize": True}])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_massless_target_at_minus_infinity_contributes_nothing(options, reduction):
    x = _X3.astype(np.float32)
    x[0, 2] = x[2, 0] = -np.inf
    opts = dict(label_smoothing=1.0, spread="others", reduction=reduction, **options)
    value = keras.ops.convert_to_numpy(lsx.keras.loss(x, _Y3, **opts))
    np.testing.assert_allclose(value, spec.reference_loss(x, _Y3, **opts), rtol=2e-6)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        v = tf.Variable(x)
        with tf.GradientTape() as tape:
            total = tf.reduce_sum(lsx.keras.loss(v, _Y3, **opts))
        np.testing.assert_allclose(tape.gradient(total, v).numpy(), spec.reference_grad(x, _Y3, **opts), atol=2e-7)


JAX_TRACED_SCRIPT = textwrap.dedent(
    """
    import numpy as np, jax, jax.numpy as jnp, keras, lsx.keras
    from lsx import spec
    assert keras.backend.backend() == "jax"
    x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)
    y = np.array([0, 1, 2, 3, 4, 0])
    for reduction in ("mean", "sum", "none"):
        for bad in (-1.0, np.inf, np.nan):
            sw = np.ones(6, np.float32); sw[2] = bad
            f = lambda v, s: jnp.sum(lsx.keras.loss(v, y, sample_weight=s, reduction=reduction))
            value, grad = jax.jit(jax.value_and_grad(f))(x, sw)
            assert np.isnan(float(value)) and np.all(np.isnan(grad[2])), (reduction, bad, value, grad)
            if reduction == "none":
                per = jax.jit(lambda v, s: lsx.keras.loss(v, y, sample_weight=s, reduction="none"))(x, sw)
                ok = np.arange(6) != 2
                np.testing.assert_allclose(np.asarray(per)[ok], spec.reference_loss(x, y, reduction="none")[ok], rtol=2e-6)
    for bad in (-3.0, np.inf, -np.inf, np.nan):
        f = lambda v, d: lsx.keras.loss(v, y, denominator=d)
        value, grad = jax.jit(jax.value_and_grad(f))(x, jnp.float32(bad))
        assert np.isnan(float(value)) and np.all(np.isnan(grad)), (bad, value, grad)
    print("jax traced ok")
    """
)


def test_traced_bad_sample_weight_and_denominator_give_nan_under_jax_jit():
    pytest.importorskip("jax")
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    result = subprocess.run(
        [sys.executable, "-c", JAX_TRACED_SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "jax traced ok" in result.stdout, result.stderr[-3000:]
