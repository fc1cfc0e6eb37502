"""Keras 3 losses built on ``keras.ops``: they run on every Keras backend (TensorFlow, JAX, PyTorch).

- :class:`SparseCategoricalCrossentropy` and :class:`CategoricalCrossentropy` are drop-ins for Keras's own
  (same arguments, defaults and reductions) that add every lsx option; the sparse one gains
  ``label_smoothing`` without building a one-hot tensor.
- :func:`loss` is the functional form with the lsx signature and reductions, like ``lsx.numpy.loss``.

The gradient is the framework's autodiff of a loss written as ``Σ_c w_c q_c (LSE − x_c)`` expanded into
``a·w_y·(LSE − x_y) + b·(Σw·LSE − Σ_c w_c x_c)``: its derivative is the closed form of :mod:`lsx.spec`.
With ``from_logits=False`` the predictions are handled exactly as Keras does (divided by their sum, clipped to
``[ε, 1−ε]`` with ``keras.config.epsilon()``, logged) and the smoothed target is applied to those
log-probabilities. Labels outside ``[0, K)`` raise ``ValueError`` when their values are known; in a traced
function (``model.fit``, ``jax.jit``) they make that element's loss and gradient NaN.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from lsx import _compat

try:
    _compat.load_triton_first()  # Keras imports TensorFlow on its default backend: Triton first (see lsx._compat)
    import keras
    from keras import ops
    from keras.src.losses.loss import reduce_weighted_values, standardize_reduction
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("lsx.keras needs Keras 3: pip install 'lsx[keras]'") from error
import numpy as np

from lsx import spec
from lsx.spec import default

__all__ = ["CategoricalCrossentropy", "SparseCategoricalCrossentropy", "loss"]

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")
#: the Keras reductions that divide the sum (a caller's ``denominator`` replaces their divisor)
_DENOMINATOR_REDUCTIONS = ("sum_over_batch_size", "mean", "mean_with_sample_weight")
#: a convention's reduction as Keras names it
_KERAS_REDUCTIONS = {"mean": "sum_over_batch_size", "sum": "sum", "none": "none"}
class _Unset:
    """``ignore_index`` not passed (``None`` is a value: no ignored label)."""

    def __repr__(self) -> str:
        return "None"  # what it amounts to without ``ignore_class``: signatures and help() show that default


_UNSET = _Unset()


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
) -> Any:
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
        softcap=softcap,
        sample_weight=sample_weight,
        denominator=denominator,
    )
    x = _tensor(logits)
    kind = spec.target_kind(_target_dtype(target))
    per_element, active, w_y = _per_element(x, target, opts, axis, True, kind)
    compute = _dtype_name(per_element)
    sw = None
    if opts.sample_weight is not None:
        sw_value = _concrete(opts.sample_weight)
        if sw_value is not None:  # known values are checked; traced ones give NaN where invalid
            checked = spec.check_sample_weight(sw_value, tuple(per_element.shape))
            weight = None if opts.weight is None else spec.check_weight(_numpy(opts.weight), int(np.size(opts.weight)))
            spec.check_weight_range(_dtype_name(x), weight=weight, sample_weight=checked)
        sw = _checked(_as_compute(opts.sample_weight, compute))
        per_element = per_element * sw
    if opts.reduction == "none":
        return ops.cast(per_element, x.dtype)
    total = ops.sum(per_element)
    if opts.denominator is not None:
        d_value = _concrete(opts.denominator)
        if d_value is not None:
            spec.check_denominator(d_value)
        denominator = _checked(_as_compute(opts.denominator, compute))
    elif active is not None:
        counted = ops.where(active, ops.ones_like(per_element) if w_y is None else w_y, 0)
        denominator = ops.sum(counted if sw is None else counted * sw)
    else:
        denominator = ops.cast(ops.size(per_element), compute) if sw is None else ops.sum(sw)
    value = spec.reduce_total(opts.reduction, total, denominator, opts.empty_mean, where=_where(compute))
    return ops.cast(value, x.dtype)


loss.__doc__ = (
    spec.LOSS_DOC
    + """Example:
    >>> import numpy as np, lsx.keras
    >>> x = np.array([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
    >>> round(float(lsx.keras.loss(x, np.array([2, 1, 0]), label_smoothing=0.3)), 4)
    1.3883
"""
)


class _LsxLoss(keras.losses.Loss):
    """Shared machinery: options (with conventions), the per-element loss and Keras's reductions."""

    _kind = "index"

    def __init__(
        self,
        *,
        from_logits,
        ignore_class,
        ignore_index,
        axis,
        reduction,
        name,
        dtype,
        label_smoothing,
        spread,
        weight,
        z_loss,
        normalize,
        class_mask,
        empty_mean,
        convention,
        softcap=None,
        denominator=None,
    ):
        if ignore_index is _UNSET:
            ignore = default(None) if ignore_class is None else ignore_class
        else:
            if ignore_class is not None and ignore_class != ignore_index:
                raise ValueError(
                    f"ignore_class={ignore_class!r} and ignore_index={ignore_index!r} name the same option with "
                    "different values: pass one of them"
                )
            ignore = ignore_index
        weight = None if weight is None else np.asarray(weight, np.float64)
        class_mask = None if class_mask is None else np.asarray(class_mask)
        options = spec.resolve_options(
            convention,
            label_smoothing=label_smoothing,
            spread=spread,
            weight=weight,
            ignore_index=ignore,
            z_loss=z_loss,
            normalize=normalize,
            class_mask=class_mask,
            reduction=default("mean") if spec.is_default(reduction) else "mean",
            empty_mean=empty_mean,
            softcap=softcap,
        )
        if denominator is not None:
            if isinstance(denominator, bool) or not isinstance(denominator, numbers.Real):
                raise ValueError(f"denominator must be a number (it is part of the loss's config), got {denominator!r}")
            denominator = spec.check_denominator(denominator)
        if spec.is_default(reduction) and convention is not None and "reduction" in spec.CONVENTIONS[convention]:
            reduction = _KERAS_REDUCTIONS[spec.CONVENTIONS[convention]["reduction"]]
        reduction = str(reduction) if isinstance(reduction, str) else reduction
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        self._options = options
        if options.z_loss and not from_logits:
            raise ValueError("z_loss needs logits: pass from_logits=True")
        if options.softcap is not None and not from_logits:
            raise ValueError(f"softcap needs logits: pass from_logits=True (got softcap={options.softcap!r})")
        if denominator is not None and standardize_reduction(reduction) not in _DENOMINATOR_REDUCTIONS:
            raise ValueError(
                f"denominator is only for the mean reductions {', '.join(map(repr, _DENOMINATOR_REDUCTIONS))}, "
                f"got reduction={reduction!r}"
            )
        if weight is not None:
            spec.check_weight(weight, weight.shape[0] if weight.ndim == 1 else -1)
        if class_mask is not None:
            spec.check_class_mask(class_mask, class_mask.shape[0] if class_mask.ndim == 1 else -1, options)
        self.from_logits = from_logits
        self.ignore_class = options.ignore_index
        self.axis = axis
        self.label_smoothing = options.label_smoothing
        self.spread = options.spread
        self.weight = weight
        self.z_loss = options.z_loss
        self.normalize = options.normalize
        self.class_mask = class_mask
        self.empty_mean = options.empty_mean
        self.convention = convention
        self.softcap = options.softcap
        self.denominator = denominator

    def call(self, y_true, y_pred):
        return self._losses(y_true, y_pred)[0]

    def _losses(self, y_true, y_pred):
        """(per-element loss in ``y_pred``'s dtype, the non-ignored elements or None)."""
        if self._kind == "index":
            y_true = _squeeze_labels(y_true, y_pred, self.axis)
        per_element, active, _ = _per_element(y_pred, y_true, self._options, self.axis, self.from_logits, self._kind)
        return ops.cast(per_element, y_pred.dtype), active

    def __call__(self, y_true, y_pred, sample_weight=None):
        # Keras's Loss.__call__ casts the labels to the loss's float dtype, which rounds and wraps large integer
        # labels; here labels keep their integer dtype and are checked before any conversion.
        in_mask = getattr(y_pred, "_keras_mask", None)
        with keras.name_scope(self.name):
            y_pred = _tensor(y_pred, self.dtype)
            if self._kind != "index":
                y_true = _tensor(y_true, self.dtype)
            losses, active = self._losses(y_true, y_pred)
            if sample_weight is not None:  # Keras's sample_weight: known values must leave the sums room
                sw_value = _concrete(sample_weight)
                if sw_value is not None:
                    spec.check_weight_range(
                        _dtype_name(y_pred),
                        weight=self.weight,
                        sample_weight=np.asarray(sw_value, np.float64),
                        num_elements=max(int(np.prod(np.shape(sw_value))), math.prod(n or 1 for n in losses.shape)),
                    )
            mask = None
            if self._kind == "index" and self.ignore_class is not None:
                # like Keras: ignored elements leave the "sum_over_batch_size"/"mean" denominator
                mask = active
            if in_mask is not None:
                mask = ops.cast(in_mask, "bool") if mask is None else ops.logical_and(mask, ops.cast(in_mask, "bool"))
            if self.denominator is not None:
                # Keras's weighting and masking, then the sum divided by the caller's denominator
                weighted = reduce_weighted_values(
                    losses, sample_weight=sample_weight, mask=mask, reduction="none", dtype=self.dtype
                )
                total = ops.sum(weighted)
                return spec.reduce_total(
                    "mean", total, self.denominator, self.empty_mean, where=_where(_dtype_name(total))
                )
            result = reduce_weighted_values(
                losses, sample_weight=sample_weight, mask=mask, reduction=self.reduction, dtype=self.dtype
            )
            if mask is not None and self.empty_mean == "nan" and self.reduction in _MEAN_REDUCTIONS:
                result = ops.where(ops.any(mask), result, ops.cast(np.nan, result.dtype))
            return result

    def get_config(self):
        config = super().get_config()
        config.update(
            from_logits=self.from_logits,
            axis=self.axis,
            label_smoothing=self.label_smoothing,
            spread=self.spread,
            weight=None if self.weight is None else self.weight.tolist(),
            ignore_index=self.ignore_class,
            z_loss=self.z_loss,
            normalize=self.normalize,
            class_mask=None if self.class_mask is None else self.class_mask.tolist(),
            empty_mean=self.empty_mean,
            convention=self.convention,
            softcap=self.softcap,
            denominator=self.denominator,
            dtype=self._dtype_policy.name,
        )
        return config


@keras.saving.register_keras_serializable(package="lsx")
class SparseCategoricalCrossentropy(_LsxLoss):
    """``keras.losses.SparseCategoricalCrossentropy`` with label smoothing and every lsx option.

    Same arguments and defaults as Keras's (``from_logits=False``, ``ignore_class=None``,
    ``reduction="sum_over_batch_size"``, ``axis=-1``); the extra options are keyword-only:

    Args:
        label_smoothing: ε in [0, 1], spread without a one-hot tensor.
        spread: ``"all"`` (ε/K on every class, as Keras's ``CategoricalCrossentropy``) or ``"others"``
            (ε/(K−1) on the non-target classes).
        weight: per-class weights, shape (K,); each element's loss is scaled, Keras's reduction is kept
            (``"sum_over_batch_size"`` divides by the number of non-ignored elements, not by Σ w_y).
        ignore_index: the lsx name of ``ignore_class`` (pass either; both with different values is an error).
        z_loss: s >= 0, adds s·w_y·LSE² per element (needs ``from_logits=True``).
        normalize: subtract the smoothed target's entropy (KL form, minimum 0).
        class_mask: boolean (K,) of the classes that exist; the others leave softmax and smoothing.
        empty_mean: ``"zero"`` (Keras) or ``"nan"`` for a mean over no element (everything ignored).
        softcap: c > 0 or None: the logits become c·tanh(x/c) before anything else (Gemma 2's final-logit
            soft-capping; needs ``from_logits=True``).
        denominator: a number >= 0 or None, with the mean reductions (``"sum_over_batch_size"``, ``"mean"``,
            ``"mean_with_sample_weight"``) only: the (sample-weighted, masked) sum is divided by it instead of
            Keras's divisor, e.g. the global token count over gradient-accumulation steps; 0 follows
            ``empty_mean``.
        convention: a preset from ``lsx.spec.CONVENTIONS``; options passed explicitly win. Its reduction maps
            onto Keras's: ``"mean"`` → ``"sum_over_batch_size"``, ``"sum"``, ``"none"``.

    ``sample_weight`` stays the call argument of Keras's losses, with Keras's meaning (``loss(y_true, y_pred,
    sample_weight)``, ``model.fit(..., sample_weight=...)``): each element's loss is multiplied by it and the
    reduction follows Keras's rules (``"sum_over_batch_size"`` divides by the number of non-masked elements,
    ``"mean_with_sample_weight"`` by Σ sample_weight), not lsx's Σ sample_weight·w_y. The functional
    :func:`loss` takes lsx's ``sample_weight=`` keyword instead.

    Labels keep their integer dtype (Keras's own loss casts them to float). A label outside [0, K) other
    than ``ignore_class`` raises ``ValueError`` naming it when its value is known (eager calls,
    ``run_eagerly=True``, the PyTorch backend); in a traced function (``model.fit`` on TensorFlow and JAX,
    ``tf.function``, ``jax.jit``) that element's loss and gradient are NaN.

    Example:
        >>> import numpy as np, keras, lsx.keras
        >>> x = np.array([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
        >>> smoothed = lsx.keras.SparseCategoricalCrossentropy(from_logits=True, label_smoothing=0.3)
        >>> round(float(smoothed(np.array([2, 1, 0]), x)), 4)
        1.3883
        >>> onehot = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=0.3)
        >>> round(float(onehot(np.eye(5)[[2, 1, 0]], x)), 4)
        1.3883
    """

    _kind = "index"

    def __init__(
        self,
        from_logits=False,
        ignore_class=None,
        reduction=default("sum_over_batch_size"),
        axis=-1,
        name="sparse_categorical_crossentropy",
        dtype=None,
        *,
        label_smoothing=default(0.0),
        spread=default("all"),
        weight=None,
        ignore_index=_UNSET,
        z_loss=default(0.0),
        normalize=default(False),
        class_mask=None,
        empty_mean=default("zero"),
        softcap=None,
        denominator=None,
        convention=None,
    ):
        super().__init__(
            from_logits=from_logits,
            ignore_class=ignore_class,
            ignore_index=ignore_index,
            axis=axis,
            reduction=reduction,
            name=name,
            dtype=dtype,
            label_smoothing=label_smoothing,
            spread=spread,
            weight=weight,
            z_loss=z_loss,
            normalize=normalize,
            class_mask=class_mask,
            empty_mean=empty_mean,
            convention=convention,
            softcap=softcap,
            denominator=denominator,
        )

    def get_config(self):
        return {**super().get_config(), "ignore_class": self.ignore_class}


@keras.saving.register_keras_serializable(package="lsx")
class CategoricalCrossentropy(_LsxLoss):
    """``keras.losses.CategoricalCrossentropy`` (probability targets) with every lsx option.

    Same arguments and defaults as Keras's (``from_logits=False``, ``label_smoothing=0``, ``axis=-1``,
    ``reduction="sum_over_batch_size"``); the smoothing uses the length of ``axis`` (Keras 3.15 takes the
    last dimension even when ``axis`` is another one). Extra keyword-only options as for
    :class:`SparseCategoricalCrossentropy` (``weight`` scales by Σ_c w_c q_c; ``ignore_index`` is accepted
    and, as for every probability target, has no effect; ``softcap`` and ``denominator`` are constructor
    keywords). ``sample_weight`` is Keras's call argument with Keras's reduction rules, as there.
    """

    _kind = "probs"

    def __init__(
        self,
        from_logits=False,
        label_smoothing=default(0.0),
        axis=-1,
        reduction=default("sum_over_batch_size"),
        name="categorical_crossentropy",
        dtype=None,
        *,
        spread=default("all"),
        weight=None,
        ignore_index=_UNSET,
        z_loss=default(0.0),
        normalize=default(False),
        class_mask=None,
        empty_mean=default("zero"),
        softcap=None,
        denominator=None,
        convention=None,
    ):
        super().__init__(
            from_logits=from_logits,
            ignore_class=None,
            ignore_index=ignore_index,
            axis=axis,
            reduction=reduction,
            name=name,
            dtype=dtype,
            label_smoothing=label_smoothing,
            spread=spread,
            weight=weight,
            z_loss=z_loss,
            normalize=normalize,
            class_mask=class_mask,
            empty_mean=empty_mean,
            convention=convention,
            softcap=softcap,
            denominator=denominator,
        )


# --------------------------------------------------------------------------------------------------------
def _dtype_name(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _shape(value: Any) -> tuple:
    return tuple(value.shape) if hasattr(value, "shape") and hasattr(value, "dtype") else np.shape(value)


def _target_dtype(value: Any) -> str:
    return (
        _dtype_name(value)
        if hasattr(value, "dtype") and not isinstance(value, np.ndarray)
        else str(np.asarray(value).dtype)
    )


def _tensor(value: Any, dtype: Any = None) -> Any:
    """A backend tensor (a ``tf.Variable`` or ``keras.Variable`` is read), optionally cast to ``dtype``."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        if isinstance(value, tf.Variable):
            value = tf.convert_to_tensor(value)
    return ops.convert_to_tensor(value, dtype=dtype)


def _as_compute(value: Any, compute: str) -> Any:
    """A backend tensor cast to ``compute`` (so that autodiff reaches it); NumPy arrays and Python numbers are
    converted at full precision (a Python float would otherwise pass through float32)."""
    if hasattr(value, "dtype") and not isinstance(value, (np.ndarray, np.generic)):
        return ops.cast(_tensor(value), compute)
    return ops.convert_to_tensor(np.asarray(value, np.float64), dtype=compute)


def _checked(value: Any) -> Any:
    """A traced ``sample_weight`` or ``denominator`` cannot be checked: a negative or non-finite value becomes
    NaN (its element's loss for sample_weight, the whole mean for the denominator), loss and gradient alike."""
    return ops.where(ops.logical_and(ops.isfinite(value), value >= 0), value, np.nan)


def _where(dtype: Any):
    """``where`` for the spec's row algebra: Python numbers become tensors of ``dtype``."""

    def where(condition, x, y):
        return ops.where(condition, ops.cast(x, dtype), ops.cast(y, dtype))

    return where


def _squeeze_labels(y_true: Any, y_pred: Any, axis: int) -> Any:
    """Labels of shape (..., 1) with the class axis kept, as Keras accepts them, lose that axis."""
    rank, shape = len(y_pred.shape), _shape(y_true)
    if len(shape) == rank and -rank <= axis < rank and shape[axis] == 1:
        if isinstance(y_true, np.ndarray) or not hasattr(y_true, "dtype"):
            return np.squeeze(np.asarray(y_true), axis=axis)
        return ops.squeeze(y_true, axis=axis)
    return y_true


def _concrete(value: Any) -> np.ndarray | None:
    """The value as NumPy when it is known now (not a traced symbol), else None."""
    if isinstance(value, np.ndarray) or not hasattr(value, "dtype"):
        return np.asarray(value)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.get_static_value(tf.convert_to_tensor(value))
    if backend == "jax":
        import jax

        return None if isinstance(value, jax.core.Tracer) else np.asarray(value)
    if backend == "torch":
        import torch

        if isinstance(value, torch.Tensor):
            return value.detach().cpu().numpy()
    return ops.convert_to_numpy(value)


def _widest_int() -> str:
    """The widest signed integer dtype of the backend (int32 on JAX without x64)."""
    return _dtype_name(ops.convert_to_tensor(np.zeros(1, np.int64)))


def _labels(target: Any, num_classes: int, opts: spec.Options, mask: np.ndarray | None):
    """(active, label in [0, K) as int32, bad) for integer labels of any dtype (or float labels, as Keras
    hands them over); comparisons never happen in a dtype where the caller's values or ignore_index wrap.

    Known values are checked here (``ValueError`` naming the label) and converted in NumPy; unknown ones
    (traced) give ``bad`` where they are out of range or on a masked class.
    """
    concrete = _concrete(target)
    if concrete is not None:
        raw = concrete
        if raw.dtype.kind == "f":  # float labels: integral and finite, else an error naming the value
            wrong = ~np.isfinite(raw) | (raw != np.round(raw))
            if wrong.any():
                raise ValueError(f"target has label {raw[wrong][0]!r}, which is not an integer class index")
            raw = raw.astype(np.int64)
        spec.check_labels(raw, num_classes, opts, mask)
        y, _ = spec.labels_as_int64(raw)
        active = np.ones(y.shape, bool) if opts.ignore_index is None else y != opts.ignore_index
        label = np.where(active, y, 0).astype(np.int32)
        return ops.convert_to_tensor(active), ops.convert_to_tensor(label), None

    t = target
    name = _dtype_name(t)
    wide = _widest_int()
    bad = None
    if "float" in name:
        bad = ops.logical_not(ops.isfinite(t))
        t = ops.where(bad, ops.zeros_like(t), t)
    else:
        # values that the widest integer cannot hold are out of range (never ignored), compared in their dtype
        info, wide_info = np.iinfo(name), np.iinfo(wide)
        out = None
        if info.max > wide_info.max:
            out = ops.greater(t, ops.convert_to_tensor(np.array(wide_info.max, name)))
        if info.min < wide_info.min:
            below = ops.less(t, ops.convert_to_tensor(np.array(wide_info.min, name)))
            out = below if out is None else ops.logical_or(out, below)
        if out is not None:
            bad = out
            t = ops.where(out, ops.zeros_like(t), t)
    y = ops.cast(t, wide)
    ignore = opts.ignore_index
    if ignore is None or not np.iinfo(wide).min <= ignore <= np.iinfo(wide).max:
        active = ops.ones(ops.shape(y), "bool")  # no label of this dtype can equal ignore_index
    else:
        active = ops.not_equal(y, ops.convert_to_tensor(np.array(ignore, wide)))
    if bad is not None:
        active = ops.logical_or(active, bad)
    out_of_range = ops.logical_or(ops.less(y, 0), ops.greater_equal(y, num_classes))
    bad = out_of_range if bad is None else ops.logical_or(bad, out_of_range)
    bad = ops.logical_and(active, bad)
    label = ops.cast(ops.where(ops.logical_and(active, ops.logical_not(bad)), y, 0), "int32")
    if mask is not None:
        on_masked = ops.logical_not(ops.take(ops.convert_to_tensor(mask), label))
        bad = ops.logical_or(bad, ops.logical_and(active, on_masked))
    return active, label, bad


def _row_max(x_soft: Any) -> Any:
    """max over the classes (0 where it is not finite), no gradient; an empty batch has no rows to reduce."""
    if 0 in tuple(x_soft.shape[:-1]):
        row_max = ops.zeros(tuple(x_soft.shape[:-1]), x_soft.dtype)
    else:
        row_max = ops.stop_gradient(ops.max(x_soft, axis=-1))
    return row_max


def _per_element(y_pred, target, opts, axis, from_logits, kind):
    """Per-element loss in the compute dtype, shaped like the target without the class axis.

    Returns ``(loss, active, w_y)``: ``active`` (bool, index targets) marks the non-ignored elements and
    ``w_y`` their class weight (None without ``weight``). The gradient is the framework's autodiff of the
    spec's row algebra (row statistics relative to the row maximum, which is held constant).
    """
    x = _tensor(y_pred)
    if "float" not in _dtype_name(x):
        raise spec.logits_dtype_error(_dtype_name(x), _target_dtype(target))
    target_shape = _shape(target)
    layout = spec.check_layout(
        tuple(x.shape),
        target_shape,
        kind,
        opts,
        axis=axis,
        weight_shape=None if opts.weight is None else np.shape(opts.weight),
        class_mask_shape=None if opts.class_mask is None else np.shape(opts.class_mask),
        sample_weight_shape=None if opts.sample_weight is None else _shape(opts.sample_weight),
    )
    k = layout.num_classes
    spec.check_softcap(opts.softcap, _dtype_name(x))
    mask = None if opts.class_mask is None else spec.check_class_mask(_numpy(opts.class_mask), k, opts)
    weight = None if opts.weight is None else spec.check_weight(_numpy(opts.weight), k)
    spec.check_weight_range(
        _dtype_name(x), weight=weight, num_elements=math.prod(n for n in spec.element_shape(tuple(x.shape), layout.axis) if n is not None)
    )
    compute = "float64" if _dtype_name(x) == "float64" else "float32"
    where = _where(compute)
    x = ops.moveaxis(ops.cast(x, compute), layout.axis, -1)
    if opts.softcap is not None:  # c·tanh(x/c) before anything else (±inf become ±c); autodiff does the chain rule
        x = opts.softcap * ops.tanh(x / opts.softcap)
    valid_count = k if mask is None else int(mask.sum())
    if mask is not None:
        weight = np.where(mask, 1.0 if weight is None else weight, 0.0)
    w = None if weight is None else ops.convert_to_tensor(weight, compute)
    rows = spec.RowCoefficients.of(opts, valid_count, None if weight is None else float(weight.sum()))
    mask_t = None if mask is None else ops.convert_to_tensor(mask)

    if from_logits:
        x_soft = x if mask is None else ops.where(mask_t, x, -np.inf)
        row_max = _row_max(x_soft)
        # a +inf logit: the row's L, loss and gradient are NaN (a NaN shift reaches every class's gradient)
        row_max = ops.where(ops.isfinite(row_max), row_max, ops.where(ops.equal(row_max, np.inf), np.nan, 0))
        log_sum_exp = ops.log(ops.sum(ops.exp(x_soft - ops.expand_dims(row_max, -1)), axis=-1))
    else:  # Keras's recipe for probabilities: renormalise, clip, log; then "LSE" of log-probabilities is 0
        p = x if mask is None else ops.where(mask_t, x, 0)
        p = p / ops.sum(p, axis=-1, keepdims=True)
        epsilon = keras.config.epsilon()
        x = ops.log(ops.clip(p, epsilon, 1.0 - epsilon))
        row_max = log_sum_exp = ops.zeros_like(x[..., 0])
    shifted = x - ops.expand_dims(row_max, -1)

    if kind == "index":
        active, y, bad = _labels(target, k, opts, mask)
        w_y = None if w is None else ops.take(w, y)
        x_y = ops.take_along_axis(shifted, ops.expand_dims(y, -1), axis=-1)[..., 0]
        if w_y is not None:  # a class with weight 0 contributes nothing, even against x_y = −inf
            x_y = ops.where(w_y != 0, x_y, 0)
        weighted_sum = 0.0
        if rows.b != 0:
            terms = shifted if w is None else ops.where(w != 0, shifted, 0) * w
            if rows.empty_target:  # q_y = 0: the target's logit stays out, even at −inf
                on_target = ops.equal(ops.expand_dims(ops.arange(k, dtype="int32"), 0), ops.expand_dims(y, -1))
                terms = ops.where(on_target, 0, terms)
            weighted_sum = ops.sum(terms, axis=-1)
        value, _ = spec.label_row(
            rows,
            log_sum_exp=log_sum_exp,
            row_max=row_max,
            w_y=1.0 if w_y is None else w_y,
            x_y=x_y,
            weighted_sum=weighted_sum,
            where=where,
            log=ops.log,
            target_excluded=rows.empty_target,
        )
        value = ops.where(active, value, 0)
        if bad is not None:
            # an unknown bad label (traced): NaN loss and, through the product, NaN gradient
            value = value * ops.cast(ops.where(bad, np.nan, 1.0), compute)
        return value, active, w_y

    t = ops.moveaxis(ops.cast(_tensor(target), compute), layout.axis, -1)
    q = rows.a * t + rows.b
    if mask is not None:
        q = ops.where(mask_t, q, 0)
    wq = q if w is None else q * w
    contributes = wq != 0  # NaN counts (NaN loss), a negative q counts linearly
    weighted_xlogx = None
    if opts.normalize:
        xlogx = spec.xlogx(q, where=where, log=ops.log)
        weighted_xlogx = ops.sum(ops.where(contributes, xlogx if w is None else w * xlogx, 0), axis=-1)
    value, _ = spec.probability_row(
        rows,
        log_sum_exp=log_sum_exp,
        row_max=row_max,
        target_mass=ops.sum(wq, axis=-1),
        weighted_sum=ops.sum(ops.where(contributes, wq * shifted, 0), axis=-1),
        weighted_xlogx=weighted_xlogx,
    )
    if mask is not None:
        concrete = _concrete(target)
        if concrete is not None:
            spec.check_probability_target_mask(concrete, layout.axis, mask)
        else:  # traced probabilities: mass on a masked class is NaN for that element
            on_masked = ops.any(ops.logical_and(ops.logical_not(mask_t), t != 0), axis=-1)
            value = value * ops.cast(ops.where(on_masked, np.nan, 1.0), compute)
    return value, None, None


def _numpy(value: Any) -> np.ndarray:
    concrete = value if isinstance(value, np.ndarray) else _concrete(ops.convert_to_tensor(value))
    if concrete is None:
        raise TypeError("weight and class_mask must be concrete arrays, not traced tensors")
    return np.asarray(concrete)
