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

import math
from typing import Any

from lsx import _compat

try:
    _compat.load_triton_first()  # before TensorFlow: Triton loaded after it aborts the process (see lsx._compat)
    import tensorflow as tf
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("lsx.tensorflow needs TensorFlow: pip install 'lsx[tensorflow]'") from error
import numpy as np

from lsx import spec
from lsx.spec import default
from lsx.tensorflow import _engine

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
    softcap: float | None = None,
    sample_weight: Any = None,
    denominator: Any = None,
    convention: str | None = None,
) -> tf.Tensor:
    opts = spec.resolve_options_cached(
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
        softcap=softcap,
        sample_weight=sample_weight,
        denominator=denominator,
    )
    x = tf.convert_to_tensor(logits)
    t = tf.convert_to_tensor(target)
    if not x.dtype.is_floating:
        raise spec.logits_dtype_error(x.dtype.name, t.dtype.name)
    kind = spec.target_kind(t.dtype.name)
    if x.shape.rank is None or t.shape.rank is None:
        raise ValueError("lsx.tensorflow.loss needs logits and target of known rank")
    rank = x.shape.rank
    if not isinstance(axis, bool) and isinstance(axis, int) and -rank <= axis < rank and x.shape[axis] is None:
        raise ValueError(f"the class axis {axis % rank} of logits must have a static length, got shape {x.shape}")
    weight_is_tensor = isinstance(opts.weight, (tf.Tensor, tf.Variable))
    layout = spec.check_layout(
        tuple(x.shape),
        tuple(t.shape),
        kind,
        opts,
        axis=axis,
        weight_shape=None if opts.weight is None else tuple(_shape(opts.weight)),
        class_mask_shape=None if opts.class_mask is None else tuple(np.shape(_static(opts.class_mask, "class_mask"))),
        sample_weight_shape=None if opts.sample_weight is None else tuple(_shape(opts.sample_weight)),
    )
    k = layout.num_classes
    spec.check_softcap(opts.softcap, x.dtype.name)
    compute = tf.float64 if x.dtype == tf.float64 else tf.float32

    mask = None
    if opts.class_mask is not None:
        mask = spec.check_class_mask(_static(opts.class_mask, "class_mask"), k, opts)
    # A tensor weight (a tf.Variable, an eager or a traced tensor) is an input of the gradient; a NumPy
    # weight is a constant. Known values are checked here; unknown ones (traced) give NaN when invalid.
    weight_value = None if opts.weight is None else tf.get_static_value(tf.convert_to_tensor(opts.weight))
    if weight_value is not None:
        spec.check_weight(weight_value, k)
    # per-element weights and a caller's denominator: known values are checked, traced ones trusted; tensors
    # (and tf.Variables) get their gradients. The weights' range is checked before any cast to the compute dtype.
    sw_value = None
    if opts.sample_weight is not None:
        sw_value = tf.get_static_value(tf.convert_to_tensor(opts.sample_weight))
        if sw_value is not None:
            spec.check_sample_weight(sw_value, spec.element_shape(tuple(x.shape), layout.axis))
    spec.check_weight_range(
        x.dtype.name,
        weight=None if weight_value is None else np.asarray(weight_value, np.float64),
        sample_weight=None if opts.sample_weight is None or sw_value is None else np.asarray(sw_value, np.float64),
        num_elements=math.prod(n for n in spec.element_shape(tuple(x.shape), layout.axis) if n is not None),
    )
    if opts.weight is None:
        w = None
    elif weight_is_tensor:
        w = tf.cast(opts.weight, compute)
    else:
        w = tf.constant(spec.check_weight(weight_value, k), compute)
    sw = None if opts.sample_weight is None else _as_compute(opts.sample_weight, compute)
    d = None
    if opts.denominator is not None:
        d_value = tf.get_static_value(tf.convert_to_tensor(opts.denominator))
        if d_value is not None:
            spec.check_denominator(d_value)
        d = _as_compute(opts.denominator, compute)

    target_value = tf.get_static_value(t)
    if target_value is not None:
        if kind == "index":
            spec.check_labels(target_value, k, opts, mask)
        elif mask is not None:
            spec.check_probability_target_mask(target_value, layout.axis, mask)

    # classes last, rows flattened: (N, K)
    if layout.axis != rank - 1:
        perm = [i for i in range(rank) if i != layout.axis] + [layout.axis]
        x = tf.transpose(x, perm)
        if kind == "probs":
            t = tf.transpose(t, perm)
    lead_shape = tf.shape(x)[:-1]
    x2 = tf.reshape(x, [-1, k])
    t2 = tf.reshape(t, [-1]) if kind == "index" else tf.reshape(t, [-1, k])

    plan = _engine.Plan(
        kind=kind,
        options=opts,
        num_classes=k,
        mask=mask,
        compute=compute,
        check_weight=w is not None and weight_value is None,
        check_target_mask=kind == "probs" and mask is not None and target_value is None,
        softcap=opts.softcap,
    )
    value = _engine.reduced_loss(
        x2,
        t2,
        plan,
        w,
        weight_is_input=weight_is_tensor,
        sample_weight=None if sw is None else tf.reshape(sw, [-1]),
        denominator=d,
    )
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
known; inside a traced function they make that element's loss and gradient NaN (labels of every integer
dtype are compared in int64; a uint64 label above 2**63 − 1 is out of range, never ignored). Probability mass
on a class that ``class_mask`` removes raises when the target is known and is NaN for that element when it is
traced. ``class_mask`` must be a concrete array (it decides the number of classes K used by the smoothing).
A ``weight`` given as a tensor or ``tf.Variable`` gets its gradient (``tape.gradient(loss, weight)``), eagerly
and traced; a traced weight with a negative or non-finite entry makes the loss NaN. ``sample_weight`` and
``denominator`` are checked when their values are known and trusted when traced; as tensors or ``tf.Variable``
they get their gradients too. ``softcap`` adds one tanh per element (the un-capped path is unchanged). The
class axis needs a static length.
"""
)


# --------------------------------------------------------------------------------------------------------
def _static(value: Any, name: str) -> np.ndarray:
    concrete = tf.get_static_value(tf.convert_to_tensor(value))
    if concrete is None:
        raise TypeError(f"{name} must be a concrete array (NumPy or an eager tensor), not a symbolic tensor")
    return np.asarray(concrete)


def _as_compute(value: Any, compute: tf.DType) -> tf.Tensor:
    """A tensor (or tf.Variable, read so that the tape sees it) cast to ``compute``; NumPy arrays and Python
    numbers are converted at full precision (a Python float would otherwise pass through float32)."""
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tf.cast(value, compute)
    return tf.constant(np.asarray(value, np.float64), compute)


def _shape(value: Any) -> tuple[int | None, ...]:
    if isinstance(value, (tf.Tensor, tf.Variable)):
        return tuple(value.shape)
    return np.shape(value)
