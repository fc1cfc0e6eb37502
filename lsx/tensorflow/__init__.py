"""TensorFlow backend: ``loss`` for ``tf.Tensor`` logits, eager, inside ``tf.function`` and under XLA.

The gradient is the closed form of :mod:`lsx.spec`, written as a ``tf.custom_gradient``: no one-hot tensor
is built for integer labels. The forward pass keeps exp(x - max) (one logits-sized buffer) and the backward
pass scales it into the gradient, so exp is evaluated once per element; under XLA the gradient is written over
that buffer in place. float16/bfloat16 logits are computed in float32; float64 stays float64.

Labels outside ``[0, K)`` raise ``ValueError`` whenever their values are known (eager tensors, NumPy arrays,
constants captured by a ``tf.function``). Inside a traced function (``tf.function``, with or without
``jit_compile=True``) their values are not known: such an element's loss and gradient are NaN, so a bad
label can never produce a silent finite number (XLA drops ``tf.debugging`` assertions, NaN survives it).
"""

from __future__ import annotations

from typing import Any

try:
    import tensorflow as tf
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("lsx.tensorflow needs TensorFlow: pip install 'lsx[tensorflow]'") from error
import numpy as np

from lsx import spec
from lsx.spec import default

__all__ = ["loss"]


def loss(
    logits: Any,
    target: Any,
    *,
    axis: int = -1,
    label_smoothing: float = default(0.0),
    spread: spec.Spread = default("all"),
    weight: Any = None,
    ignore_index: int | None = default(-100),
    z_loss: float = default(0.0),
    normalize: bool = default(False),
    class_mask: Any = None,
    reduction: spec.Reduction = default("mean"),
    empty_mean: spec.EmptyMean = default("nan"),
    convention: str | None = None,
) -> tf.Tensor:
    opts = spec.resolve_options(
        convention,
        label_smoothing=label_smoothing,
        spread=spread,
        weight=weight,
        ignore_index=ignore_index,
        z_loss=z_loss,
        normalize=normalize,
        class_mask=class_mask,
        reduction=reduction,
        empty_mean=empty_mean,
    )
    x = tf.convert_to_tensor(logits)
    t = tf.convert_to_tensor(target)
    if not x.dtype.is_floating:
        raise TypeError(f"logits must be floating point, got dtype {x.dtype.name}")
    kind = spec.target_kind(t.dtype.name)
    if x.shape.rank is None or t.shape.rank is None:
        raise ValueError("lsx.tensorflow.loss needs logits and target of known rank")
    layout = spec.check_layout(
        tuple(x.shape),
        tuple(t.shape),
        kind,
        opts,
        axis=axis,
        weight_shape=None if opts.weight is None else tuple(tf.convert_to_tensor(opts.weight).shape),
        class_mask_shape=None if opts.class_mask is None else tuple(np.shape(_static(opts.class_mask, "class_mask"))),
    )
    k = layout.num_classes
    if k is None:
        raise ValueError(f"the class axis {layout.axis} of logits must have a static length")
    compute = tf.float64 if x.dtype == tf.float64 else tf.float32

    mask = None
    if opts.class_mask is not None:
        mask = spec.check_class_mask(_static(opts.class_mask, "class_mask"), k, opts)
    weight_value = None if opts.weight is None else tf.get_static_value(tf.convert_to_tensor(opts.weight))
    if weight_value is not None:
        w = tf.constant(spec.check_weight(weight_value, k), compute)
    elif opts.weight is not None:  # a symbolic weight: its values are checked by whoever made it
        w = tf.cast(opts.weight, compute)
    else:
        w = None
    if mask is not None:
        w = tf.where(tf.constant(mask), tf.ones([k], compute) if w is None else w, tf.zeros([k], compute))

    labels = tf.get_static_value(t)
    if labels is not None:
        if kind == "index":
            spec.check_labels(labels, k, opts, mask)
        elif mask is not None:
            spec.check_probability_target_mask(labels, layout.axis, mask)

    # classes last, rows flattened: (N, K)
    perm = None
    if layout.axis != x.shape.rank - 1:
        perm = [i for i in range(x.shape.rank) if i != layout.axis] + [layout.axis]
        x = tf.transpose(x, perm)
        if kind == "probs":
            t = tf.transpose(t, perm)
    lead_shape = tf.shape(x)[:-1]
    x2 = tf.reshape(x, [-1, k])
    t2 = tf.reshape(t, [-1]) if kind == "index" else tf.reshape(t, [-1, k])

    per_element, denominator = _forward(x2, t2, kind, opts, w, mask, compute)
    value = _reduce(opts, per_element, denominator)
    if opts.reduction == "none":
        value = tf.reshape(value, lead_shape)
    return tf.cast(value, x.dtype)


loss.__doc__ = (
    spec.LOSS_DOC
    + """Example:
    >>> import tensorflow as tf, lsx.tensorflow
    >>> x = tf.constant([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
    >>> y = tf.constant([2, 1, 0])
    >>> round(float(lsx.tensorflow.loss(x, y, label_smoothing=0.3)), 4)
    1.3883
    >>> step = tf.function(lambda x, y: lsx.tensorflow.loss(x, y, label_smoothing=0.3), jit_compile=True)
    >>> round(float(step(x, y)), 4)
    1.3883

TensorFlow notes: works eagerly, inside ``tf.function`` and with ``jit_compile=True``; the gradient is a
``tf.custom_gradient`` in closed form. Labels outside [0, K) raise ``ValueError`` when their values are
known; inside a traced function they make that element's loss and gradient NaN. ``class_mask`` must be a
concrete array (it decides the number of classes K used by the smoothing).
"""
)


# --------------------------------------------------------------------------------------------------------
def _static(value: Any, name: str) -> np.ndarray:
    concrete = tf.get_static_value(tf.convert_to_tensor(value))
    if concrete is None:
        raise TypeError(f"{name} must be a concrete array (NumPy or an eager tensor), not a symbolic tensor")
    return np.asarray(concrete)


def _xlogx(q: float) -> float:
    return q * float(np.log(q)) if q > 0 else 0.0


def _forward(x2, t2, kind, opts, w, mask, compute):
    """Per-element loss on (N, K) logits (compute dtype, closed-form gradient) and the mean's denominator."""
    k = int(x2.shape[-1])
    valid_count = k if mask is None else int(mask.sum())
    a, b = spec.smoothing_coefficients(opts, valid_count)
    s = opts.z_loss
    total_weight = float(valid_count) if w is None else None
    mask_t = None if mask is None else tf.constant(mask)

    if kind == "index":
        labels = tf.cast(t2, tf.int64)
        active = tf.ones_like(labels, tf.bool) if opts.ignore_index is None else labels != opts.ignore_index
        bad = active & ((labels < 0) | (labels >= k))
        if mask is not None:
            bad |= active & ~tf.gather(mask_t, tf.clip_by_value(labels, 0, k - 1))
        y = tf.where(active & ~bad, labels, tf.zeros_like(labels))
        w_y = None if w is None else tf.gather(w, y)
        denominator = tf.reduce_sum(tf.where(active, tf.ones_like(y, compute) if w_y is None else w_y, 0))
    else:
        active = bad = y = w_y = None
        q = a * tf.cast(t2, compute) + b
        if mask is not None:
            q = tf.where(mask_t, q, 0)
        wq = q if w is None else q * w
        denominator = tf.cast(tf.shape(t2)[0], compute)

    @tf.custom_gradient
    def per_element_loss(logits):
        x = tf.cast(logits, compute)
        x_soft = x if mask is None else tf.where(mask_t, x, tf.constant(-np.inf, compute))
        row_max = tf.reduce_max(x_soft, axis=-1)
        row_max = tf.where(tf.math.is_finite(row_max), row_max, 0)
        # exp is the costly op on CPU: taken once here and kept for the backward pass, where XLA writes the
        # gradient over this buffer in place (one logits-sized buffer in all)
        shifted_exp = tf.exp(x_soft - row_max[:, None])
        sum_exp = tf.reduce_sum(shifted_exp, axis=-1)
        lse = row_max + tf.math.log(sum_exp)

        if kind == "index":
            w_target = tf.ones_like(lse) if w_y is None else w_y
            value = s * w_target * lse * lse
            if a != 0:
                value += a * w_target * (lse - tf.gather(x, y, batch_dims=1))
            if b != 0:
                x_lin = x if mask is None else tf.where(mask_t, x, 0)
                weighted_sum = tf.reduce_sum(x_lin, axis=-1) if w is None else tf.linalg.matvec(x_lin, w)
                total = total_weight if w is None else tf.reduce_sum(w)
                value += b * (total * lse - weighted_sum)
            if opts.normalize:
                total = total_weight if w is None else tf.reduce_sum(w)
                value += w_target * _xlogx(a + b) + _xlogx(b) * (total - w_target)
            value = tf.where(active, value, 0)
            value = tf.where(bad, tf.constant(np.nan, compute), value)
            target_mass = a * w_target + b * (total_weight if w is None else tf.reduce_sum(w))
        else:
            w_target = 1.0
            terms = tf.where(wq > 0, wq * (lse[:, None] - x), 0)
            value = tf.reduce_sum(terms, axis=-1) + s * lse * lse
            if opts.normalize:
                xlogx = tf.where(q > 0, q * tf.math.log(tf.where(q > 0, q, 1)), 0)
                value += tf.reduce_sum(xlogx if w is None else w * xlogx, axis=-1)
            target_mass = tf.reduce_sum(wq, axis=-1)

        def grad(upstream):
            scale = tf.cast(upstream, compute)
            # softmax = shifted_exp / sum_exp, folded into the per-row factor
            g = shifted_exp * ((target_mass + 2 * s * w_target * lse) * scale / sum_exp)[:, None]
            if kind == "index":
                if b != 0:
                    g -= (b * scale)[:, None] if w is None else (b * scale)[:, None] * w
                if a != 0:
                    hit = tf.range(k, dtype=tf.int32)[None, :] == tf.cast(y, tf.int32)[:, None]
                    g -= tf.where(hit, (a * scale * w_target)[:, None], 0)
                g = tf.where(active[:, None], g, 0)
                g = tf.where(bad[:, None], tf.constant(np.nan, compute), g)
            else:
                g -= wq * scale[:, None]
            if mask is not None:
                g = tf.where(mask_t, g, 0)
            return tf.cast(g, logits.dtype)

        return value, grad

    return per_element_loss(x2), denominator


def _reduce(opts: spec.Options, per_element: tf.Tensor, denominator: tf.Tensor) -> tf.Tensor:
    """Reduce the per-element loss (in the compute dtype) and cast to the logits' dtype."""
    out_dtype = per_element.dtype
    if opts.reduction == "none":
        return per_element
    total = tf.reduce_sum(per_element)
    if opts.reduction == "sum":
        return total
    empty = tf.constant(np.nan if opts.empty_mean == "nan" else 0.0, out_dtype)
    safe = tf.where(denominator != 0, denominator, tf.ones_like(denominator))
    return tf.where(denominator != 0, total / safe, empty)
