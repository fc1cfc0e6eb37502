"""The mistakes a first hour makes get messages that say what to change, on every backend (lsx.spec words them)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from lsx import spec

BACKENDS = ("numpy", "torch", "jax", "tensorflow", "keras")


def _loss(backend: str):
    """``loss(logits, target, **options)`` of a backend taking NumPy inputs, in its own array type."""
    if backend == "numpy":
        import lsx.numpy

        return lsx.numpy.loss
    if backend == "torch":
        torch = pytest.importorskip("torch")
        import lsx.torch

        return lambda x, t, **kw: lsx.torch.loss(torch.from_numpy(x), torch.from_numpy(t), **kw)
    if backend == "jax":
        jnp = pytest.importorskip("jax.numpy")
        import lsx.jax

        return lambda x, t, **kw: lsx.jax.loss(jnp.asarray(x), jnp.asarray(t), **kw)
    if backend == "tensorflow":
        tf = pytest.importorskip("tensorflow")
        import lsx.tensorflow

        return lambda x, t, **kw: lsx.tensorflow.loss(tf.constant(x), tf.constant(t), **kw)
    pytest.importorskip("keras")
    import lsx.keras

    return lsx.keras.loss


@pytest.mark.parametrize("backend", BACKENDS)
def test_float_labels_are_read_as_probabilities_and_the_message_says_so(backend):
    loss = _loss(backend)
    logits = np.zeros((8, 5), np.float32)
    labels = (np.arange(8) % 5).astype(np.float32)  # y.float(): class labels in a floating dtype
    with pytest.raises(ValueError) as caught:
        loss(logits, labels)
    message = str(caught.value)
    assert "target of probabilities must have the logits' shape (8, 5), got (8,)" in message
    assert spec.FLOAT_TARGET in message and "target.long()" in message
    assert float(loss(logits, labels.astype(np.int64))) == pytest.approx(np.log(5), rel=1e-6)  # the fix works


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_sequence_labels_with_classes_not_last_suggest_axis_minus_one(backend):
    """(B, T, V) logits and (B, T) labels: torch's rule puts the classes on dim 1 (lsx.torch's default); the
    message suggests axis=-1, which then works."""
    loss = _loss(backend)
    logits, labels = np.zeros((2, 3, 7), np.float32), np.zeros((2, 3), np.int64)
    given = {} if backend == "torch" else {"axis": 1}
    with pytest.raises(ValueError, match=re.escape("got (2, 3); labels of shape (2, 3) fit logits with the classes")):
        loss(logits, labels, **given)
    with pytest.raises(ValueError, match="pass axis=-1"):
        loss(logits, labels, **given)
    assert float(loss(logits, labels, axis=-1)) == pytest.approx(np.log(7), rel=1e-6)


def test_axis_hint_only_where_it_fits():
    with pytest.raises(ValueError) as caught:
        spec.check_layout((2, 3, 7), (2, 4), "index", spec.Options(), axis=1)
    assert "axis=-1" not in str(caught.value)


@pytest.mark.parametrize("backend", ["numpy", "jax", "tensorflow", "keras"])
def test_arguments_in_keras_order_get_a_hint(backend):
    """``loss(y_true, y_pred)`` as Keras losses take them: integer "logits", floating "target"."""
    loss = _loss(backend)
    y_true, y_pred = np.arange(4) % 3, np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError) as caught:
        (spec.reference_loss if backend == "numpy" else loss)(y_true, y_pred)
    message = str(caught.value)
    assert message.startswith("logits must be floating point, got dtype int")
    assert "Keras's (y_true, y_pred) order? loss takes (logits, target), logits first" in message


def test_no_keras_order_hint_when_the_target_is_integer():
    error = spec.logits_dtype_error(np.dtype("int32"), np.dtype("int64"))
    assert str(error) == "logits must be floating point, got dtype int32"
