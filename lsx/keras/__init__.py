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

from typing import Any

try:
    import keras
    from keras import ops
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("lsx.keras needs Keras 3: pip install 'lsx[keras]'") from error
import numpy as np

from lsx import spec
from lsx.spec import default

__all__ = ["CategoricalCrossentropy", "SparseCategoricalCrossentropy", "loss"]

_MEAN_REDUCTIONS = ("sum_over_batch_size", "mean")


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
    )
    x = ops.convert_to_tensor(logits)
    t = ops.convert_to_tensor(target)
    kind = spec.target_kind(_dtype_name(t))
    per_element, active, w_y = _per_element(x, t, kind, opts, axis, from_logits=True)
    if opts.reduction == "none":
        return ops.cast(per_element, x.dtype)
    total = ops.sum(per_element)
    if opts.reduction == "sum":
        return ops.cast(total, x.dtype)
    if kind == "index":
        denominator = ops.sum(ops.where(active, ops.ones_like(per_element) if w_y is None else w_y, 0))
    else:
        denominator = ops.cast(ops.size(per_element), per_element.dtype)
    empty = np.nan if opts.empty_mean == "nan" else 0.0
    mean = ops.where(denominator != 0, total / ops.where(denominator != 0, denominator, 1), empty)
    return ops.cast(mean, x.dtype)


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
    """Shared machinery: option validation, the per-element loss and Keras's ``ignore_class`` reduction."""

    _kind = "index"

    def __init__(
        self,
        *,
        from_logits,
        ignore_class,
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
    ):
        super().__init__(name=name, reduction=reduction, dtype=dtype)
        weight = None if weight is None else np.asarray(weight, np.float64)
        class_mask = None if class_mask is None else np.asarray(class_mask)
        self._options = spec.resolve_options(
            label_smoothing=label_smoothing,
            spread=spread,
            weight=weight,
            ignore_index=ignore_class,
            z_loss=z_loss,
            normalize=normalize,
            class_mask=class_mask,
            reduction="none",
            empty_mean=empty_mean,
        )
        if z_loss and not from_logits:
            raise ValueError("z_loss needs logits: pass from_logits=True")
        if weight is not None:
            spec.check_weight(weight, weight.shape[0] if weight.ndim == 1 else -1)
        if class_mask is not None:
            spec.check_class_mask(class_mask, class_mask.shape[0] if class_mask.ndim == 1 else -1, self._options)
        self.from_logits = from_logits
        self.ignore_class = ignore_class
        self.axis = axis
        self.label_smoothing = label_smoothing
        self.spread = spread
        self.weight = weight
        self.z_loss = z_loss
        self.normalize = normalize
        self.class_mask = class_mask
        self.empty_mean = empty_mean

    def call(self, y_true, y_pred):
        if self._kind == "index" and len(y_true.shape) == len(y_pred.shape) and y_true.shape[self.axis] == 1:
            y_true = ops.squeeze(y_true, axis=self.axis)  # labels of shape (..., 1), as Keras accepts
        if self._kind == "index" and not _is_integer(y_true):
            y_true = ops.cast(y_true, "int32")  # Keras hands labels over as floats
        per_element, _, _ = _per_element(y_pred, y_true, self._kind, self._options, self.axis, self.from_logits)
        return ops.cast(per_element, y_pred.dtype)

    def __call__(self, y_true, y_pred, sample_weight=None):
        if self._kind != "index" or self.ignore_class is None:
            return super().__call__(y_true, y_pred, sample_weight=sample_weight)
        # Like Keras: ignored elements leave the "sum_over_batch_size"/"mean" denominator (0 if none is left)
        labels = ops.convert_to_tensor(y_true)
        y_pred = ops.convert_to_tensor(y_pred)
        if len(labels.shape) == len(y_pred.shape):
            labels = ops.squeeze(labels, axis=self.axis)
        active = ops.not_equal(labels, ops.cast(self.ignore_class, labels.dtype))
        valid = ops.sum(ops.cast(active, self.dtype))
        if self.reduction in _MEAN_REDUCTIONS:
            total = ops.cast(ops.size(active), self.dtype)
            mask_weight = ops.where(active, ops.divide_no_nan(total, valid), 0)
        else:
            mask_weight = ops.cast(active, self.dtype)
        if sample_weight is not None:
            sample_weight = ops.cast(sample_weight, self.dtype)
            while len(sample_weight.shape) < len(mask_weight.shape):
                sample_weight = ops.expand_dims(sample_weight, -1)
            mask_weight = mask_weight * sample_weight
        result = super().__call__(y_true, y_pred, sample_weight=mask_weight)
        if self.empty_mean == "nan" and self.reduction in _MEAN_REDUCTIONS:
            result = ops.where(valid == 0, ops.cast(np.nan, result.dtype), result)
        return result

    def get_config(self):
        config = super().get_config()
        config.update(
            from_logits=self.from_logits,
            axis=self.axis,
            label_smoothing=self.label_smoothing,
            spread=self.spread,
            weight=None if self.weight is None else self.weight.tolist(),
            z_loss=self.z_loss,
            normalize=self.normalize,
            class_mask=None if self.class_mask is None else self.class_mask.tolist(),
            empty_mean=self.empty_mean,
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
        z_loss: s >= 0, adds s·w_y·LSE² per element (needs ``from_logits=True``).
        normalize: subtract the smoothed target's entropy (KL form, minimum 0).
        class_mask: boolean (K,) of the classes that exist; the others leave softmax and smoothing.
        empty_mean: ``"zero"`` (Keras) or ``"nan"`` for a mean over no element (everything ignored).

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
        reduction="sum_over_batch_size",
        axis=-1,
        name="sparse_categorical_crossentropy",
        dtype=None,
        *,
        label_smoothing=0.0,
        spread="all",
        weight=None,
        z_loss=0.0,
        normalize=False,
        class_mask=None,
        empty_mean="zero",
    ):
        super().__init__(
            from_logits=from_logits,
            ignore_class=ignore_class,
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
        )

    def get_config(self):
        return {**super().get_config(), "ignore_class": self.ignore_class}


@keras.saving.register_keras_serializable(package="lsx")
class CategoricalCrossentropy(_LsxLoss):
    """``keras.losses.CategoricalCrossentropy`` (probability targets) with every lsx option.

    Same arguments and defaults as Keras's (``from_logits=False``, ``label_smoothing=0``, ``axis=-1``,
    ``reduction="sum_over_batch_size"``); the smoothing uses the length of ``axis`` (Keras 3.15 takes the
    last dimension even when ``axis`` is another one). Extra keyword-only options as for
    :class:`SparseCategoricalCrossentropy` (``weight`` scales by Σ_c w_c q_c; no ``ignore_class``).
    """

    _kind = "probs"

    def __init__(
        self,
        from_logits=False,
        label_smoothing=0.0,
        axis=-1,
        reduction="sum_over_batch_size",
        name="categorical_crossentropy",
        dtype=None,
        *,
        spread="all",
        weight=None,
        z_loss=0.0,
        normalize=False,
        class_mask=None,
        empty_mean="zero",
    ):
        super().__init__(
            from_logits=from_logits,
            ignore_class=None,
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
        )


# --------------------------------------------------------------------------------------------------------
def _dtype_name(x: Any) -> str:
    return keras.backend.standardize_dtype(x.dtype)


def _is_integer(x: Any) -> bool:
    return "int" in _dtype_name(x)


def _concrete(value: Any) -> np.ndarray | None:
    """The value as NumPy when it is known now (not a traced symbol), else None."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.get_static_value(value)
    if backend == "jax":
        import jax

        return None if isinstance(value, jax.core.Tracer) else np.asarray(value)
    if backend == "torch":
        return value.detach().cpu().numpy()
    return ops.convert_to_numpy(value)


def _xlogx(q: float) -> float:
    return q * float(np.log(q)) if q > 0 else 0.0


def _per_element(y_pred, target, kind, opts, axis, from_logits):
    """Per-element loss in the compute dtype, shaped like ``target`` without the class axis.

    Returns ``(loss, active, w_y)``: ``active`` (bool, index targets) marks the non-ignored elements and
    ``w_y`` their class weight (None without ``weight``).
    """
    x = ops.convert_to_tensor(y_pred)
    t = ops.convert_to_tensor(target)
    if "float" not in _dtype_name(x):
        raise TypeError(f"logits must be floating point, got dtype {_dtype_name(x)}")
    layout = spec.check_layout(
        tuple(x.shape),
        tuple(t.shape),
        kind,
        opts,
        axis=axis,
        weight_shape=None if opts.weight is None else np.shape(opts.weight),
        class_mask_shape=None if opts.class_mask is None else np.shape(opts.class_mask),
    )
    k = layout.num_classes
    mask = None if opts.class_mask is None else spec.check_class_mask(_numpy(opts.class_mask), k, opts)
    weight = None if opts.weight is None else spec.check_weight(_numpy(opts.weight), k)
    concrete = _concrete(t)
    if concrete is not None:
        if kind == "index":
            spec.check_labels(concrete, k, opts, mask)
        elif mask is not None:
            spec.check_probability_target_mask(concrete, layout.axis, mask)

    compute = "float64" if _dtype_name(x) == "float64" else "float32"
    x = ops.moveaxis(ops.cast(x, compute), layout.axis, -1)
    valid_count = k if mask is None else int(mask.sum())
    a, b = spec.smoothing_coefficients(opts, valid_count)
    if mask is not None:
        weight = np.where(mask, 1.0 if weight is None else weight, 0.0)
    w = None if weight is None else ops.convert_to_tensor(weight, compute)
    total_weight = float(valid_count if weight is None else weight.sum())
    mask_t = None if mask is None else ops.convert_to_tensor(mask)

    if from_logits:
        x_soft = x if mask is None else ops.where(mask_t, x, -np.inf)
        row_max = ops.stop_gradient(ops.max(x_soft, axis=-1, keepdims=True))
        row_max = ops.where(ops.isfinite(row_max), row_max, 0)
        lse = ops.log(ops.sum(ops.exp(x_soft - row_max), axis=-1)) + row_max[..., 0]
    else:  # Keras's recipe for probabilities: renormalise, clip, log; then "LSE" of log-probabilities is 0
        p = x if mask is None else ops.where(mask_t, x, 0)
        p = p / ops.sum(p, axis=-1, keepdims=True)
        epsilon = keras.config.epsilon()
        x = ops.log(ops.clip(p, epsilon, 1.0 - epsilon))
        lse = ops.zeros_like(x[..., 0])

    if kind == "index":
        labels = ops.cast(t, "int32")
        active = ops.ones(labels.shape, "bool") if opts.ignore_index is None else labels != opts.ignore_index
        bad = ops.logical_and(active, ops.logical_or(labels < 0, labels >= k))
        if mask is not None:
            on_masked = ops.logical_not(ops.take(mask_t, ops.clip(labels, 0, k - 1)))
            bad = ops.logical_or(bad, ops.logical_and(active, on_masked))
        y = ops.where(ops.logical_and(active, ops.logical_not(bad)), labels, 0)
        w_y = None if w is None else ops.take(w, y)
        w_target = 1.0 if w_y is None else w_y
        value = opts.z_loss * w_target * lse * lse
        if a != 0:
            x_y = ops.take_along_axis(x, ops.expand_dims(y, -1), axis=-1)[..., 0]
            value = value + a * w_target * (lse - x_y)
        if b != 0:
            x_lin = x if mask is None else ops.where(mask_t, x, 0)
            weighted_sum = ops.sum(x_lin, axis=-1) if w is None else ops.matmul(x_lin, w)
            value = value + b * (total_weight * lse - weighted_sum)
        if opts.normalize:
            value = value + w_target * _xlogx(a + b) + _xlogx(b) * (total_weight - w_target)
        value = ops.where(active, value, 0)
        # an unknown bad label (traced): NaN loss and, through the product, NaN gradient
        value = value * ops.cast(ops.where(bad, np.nan, 1.0), compute)
        return value, active, w_y

    q = a * ops.moveaxis(ops.cast(t, compute), layout.axis, -1) + b
    if mask is not None:
        q = ops.where(mask_t, q, 0)
    wq = q if w is None else q * w
    value = ops.sum(ops.where(wq > 0, wq * (ops.expand_dims(lse, -1) - x), 0), axis=-1)
    value = value + opts.z_loss * lse * lse
    if opts.normalize:
        xlogx = ops.where(q > 0, q * ops.log(ops.where(q > 0, q, 1)), 0)
        value = value + ops.sum(xlogx if w is None else xlogx * w, axis=-1)
    return value, None, None


def _numpy(value: Any) -> np.ndarray:
    concrete = value if isinstance(value, np.ndarray) else _concrete(ops.convert_to_tensor(value))
    if concrete is None:
        raise TypeError("weight and class_mask must be concrete arrays, not traced tensors")
    return np.asarray(concrete)
