"""JAX backend: ``loss`` for JAX arrays, pure and jit-first, class axis ``-1`` by default.

The loss and its closed-form gradient (a ``jax.custom_vjp``) live in :mod:`lsx.jax._engine`; this module
validates options, shapes and, when they are concrete, values, then calls the compiled engine.
"""

from __future__ import annotations

import math
from typing import Any

try:
    import jax
    import jax.numpy as jnp
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("lsx.jax needs JAX: pip install 'lsx[jax]'") from error

import numpy as np

from lsx import spec
from lsx.jax import _engine as _jax_engine
from lsx.jax import _parallel
from lsx.jax._linear import linear_loss
from lsx.spec import default

__all__ = ["linear_loss", "loss"]

_STATIC_OPTIONS = (
    "label_smoothing",
    "spread",
    "ignore_index",
    "z_loss",
    "normalize",
    "reduction",
    "empty_mean",
    "softcap",
)


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
    softcap: float | None = default(None),
    sample_weight: Any = None,
    denominator: Any = None,
    convention: str | None = None,
    axis_name: Any = None,
) -> jax.Array:
    given = dict(
        label_smoothing=label_smoothing,
        spread=spread,
        ignore_index=ignore_index,
        z_loss=z_loss,
        normalize=normalize,
        reduction=reduction,
        empty_mean=empty_mean,
        softcap=softcap,
    )
    for name in _STATIC_OPTIONS:
        if _traced(given[name]):
            raise TypeError(
                f"{name} is a static option but was traced; use jax.jit(functools.partial(loss, {name}=...)) "
                f"or jax.jit(..., static_argnames=({name!r},))"
            )
    opts = spec.resolve_options_cached(
        convention, weight=weight, class_mask=class_mask, sample_weight=sample_weight, denominator=denominator, **given
    )

    x = jnp.asarray(logits)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise spec.logits_dtype_error(x.dtype, getattr(target, "dtype", None))
    # whatever is concrete (not a tracer) is checked on the host with the caller's own values, before any
    # conversion: a NumPy array closed over by a jitted function included, and before JAX's 32-bit mode
    # narrows int64 labels
    raw_target = target if _traced(target) else np.asarray(target)
    kind = spec.target_kind(raw_target.dtype)
    layout = spec.check_layout(
        x.shape,
        raw_target.shape,
        kind,
        opts,
        axis=axis,
        weight_shape=None if opts.weight is None else np.shape(opts.weight),
        class_mask_shape=None if opts.class_mask is None else np.shape(opts.class_mask),
        sample_weight_shape=None if opts.sample_weight is None else np.shape(opts.sample_weight),
    )
    k = layout.num_classes
    spec.check_softcap(opts.softcap, x.dtype)
    if axis_name is not None:  # the class axis split over a shard_map mesh axis
        return _parallel.sharded_loss(x, target, raw_target, kind, layout, opts, axis_name)
    # concrete per-element weights and denominators are checked with the caller's values; traced ones are
    # trusted (a negative or non-finite one gives NaN)
    if opts.sample_weight is not None and not _traced(opts.sample_weight):
        spec.check_sample_weight(np.asarray(opts.sample_weight), spec.element_shape(x.shape, layout.axis))
    if opts.denominator is not None and not _traced(opts.denominator):
        spec.check_denominator(opts.denominator)
    sw = _real_array("sample_weight", opts.sample_weight)
    d = _real_array("denominator", opts.denominator)

    w = None
    if opts.weight is not None:
        if _traced(opts.weight):
            w = opts.weight
            if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)):
                raise TypeError(f"weight must be a real array, got dtype {w.dtype}")
        else:
            spec.check_weight(np.asarray(opts.weight), k)
            w = jnp.asarray(opts.weight)
    _check_weight_range(x.dtype, opts.weight, opts.sample_weight, spec.element_shape(x.shape, layout.axis))
    concrete_mask = None
    valid_count: int | None = k
    mask = None
    if opts.class_mask is not None:
        if _traced(opts.class_mask):
            mask = opts.class_mask
            if mask.dtype != jnp.bool_:
                raise TypeError(f"class_mask must be a boolean array, got dtype {mask.dtype}")
            valid_count = None
        else:
            concrete_mask = spec.check_class_mask(np.asarray(opts.class_mask), k, opts)
            valid_count = int(concrete_mask.sum())
            mask = jnp.asarray(concrete_mask)

    ignore_index = opts.ignore_index
    if _traced(target):
        t = target
    else:
        if kind == "index":
            spec.check_labels(raw_target, k, opts, concrete_mask)
        elif concrete_mask is not None:
            spec.check_probability_target_mask(raw_target, layout.axis, concrete_mask)
        if isinstance(target, jax.Array) or kind == "probs":
            t = jnp.asarray(target)  # a JAX array's dtype already is what JAX holds
        else:
            t, ignore_index = _labels_for_jax(raw_target, ignore_index)

    cfg = _jax_engine.Config(
        kind=kind,
        label_smoothing=opts.label_smoothing,
        spread=opts.spread,
        z_loss=opts.z_loss,
        normalize=opts.normalize,
        ignore_index=ignore_index,
        reduction=opts.reduction,
        empty_mean=opts.empty_mean,
        valid_count=valid_count,
        compute="float64" if x.dtype == jnp.float64 else "float32",
        softcap=opts.softcap,
    )
    return _jax_engine.loss(
        cfg,
        jnp.moveaxis(x, layout.axis, -1),
        t if kind == "index" else jnp.moveaxis(t, layout.axis, -1),
        w,
        mask,
        sw,  # the per-element shape: the logits' without the class axis, as after moveaxis
        d,
    )


def _check_weight_range(dtype: Any, weight: Any, sample_weight: Any, elements: tuple[int, ...]) -> None:
    """:func:`lsx.spec.check_weight_range` on whichever of the weights are concrete (traced ones are trusted)."""
    concrete_weight = None if weight is None or _traced(weight) else np.asarray(weight, np.float64)
    concrete_sw = None if sample_weight is None or _traced(sample_weight) else np.asarray(sample_weight, np.float64)
    if concrete_weight is not None or concrete_sw is not None:
        spec.check_weight_range(
            dtype, weight=concrete_weight, sample_weight=concrete_sw, num_elements=math.prod(elements)
        )


def _real_array(name: str, value: Any) -> Any:
    """``value`` (a per-element ``sample_weight`` or a 0-d ``denominator``) as a real JAX array, or None."""
    if value is None:
        return None
    array = value if _traced(value) else jnp.asarray(value)
    if array.dtype == jnp.bool_ or not (
        jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)
    ):
        raise TypeError(f"{name} must be a real array, got dtype {array.dtype}")
    return array


def _labels_for_jax(labels: np.ndarray, ignore_index: int | None) -> tuple[jax.Array, int | None]:
    """Checked concrete labels as a JAX array, and the ignore_index the engine should compare with.

    Every label is in [0, K) or equal to ignore_index, so a conversion that narrows them (int64 → int32 in
    JAX's default 32-bit mode) keeps their values, unless ignore_index itself does not fit the narrower
    dtype: then the ignored elements become -1 in int32 labels, and -1 is the engine's ignore_index.
    """
    narrowed = jax.dtypes.canonicalize_dtype(labels.dtype)
    if narrowed == labels.dtype or ignore_index is None or _fits(ignore_index, narrowed):
        return jnp.asarray(labels, narrowed), ignore_index
    y, _ = spec.labels_as_int64(labels)
    return jnp.asarray(np.where(y == ignore_index, -1, y).astype(np.int32)), -1


def _fits(value: int, dtype: Any) -> bool:
    info = np.iinfo(dtype)
    return int(info.min) <= value <= int(info.max)


def _traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


_JAX_NOTES = """JAX:
    ``loss`` is pure and works under ``jax.jit``, ``jax.vmap``, ``jax.grad`` and ``jax.value_and_grad``.
    Options are static (Python values): jit it as ``jax.jit(functools.partial(loss, label_smoothing=0.1))``
    or ``jax.jit(loss, static_argnames=("label_smoothing", ...))``; ``softcap`` is static too. ``weight``,
    ``class_mask``, ``sample_weight`` and ``denominator`` may be traced arrays, and JAX differentiates the loss
    with respect to ``sample_weight`` and ``denominator`` as well. The gradient is a ``jax.custom_vjp`` in
    closed form, computed from the saved log-sum-exp (residuals: logits, target and one scalar per element),
    and integer labels are never expanded to a one-hot tensor. float16/bfloat16 logits are accumulated in
    float32; loss and gradient keep the logits' dtype.

    Values are checked when they are concrete: out-of-range labels raise ``ValueError``, as do bad weights,
    sample weights, denominators and class masks. Under ``jit``/``vmap`` they cannot be checked; an element
    whose label is out of range (or on a masked class) then has a NaN loss and a NaN gradient, never a silent
    finite number, as has an element with a negative or non-finite traced ``sample_weight`` (a negative traced
    ``denominator`` or ``weight`` makes everything NaN); a traced ``class_mask`` is trusted.

    Vocabulary parallelism: inside ``jax.shard_map``, ``axis_name=`` names the mesh axis that splits the
    class axis (equal slices in the axis's order). ``logits``, a probability ``target``, ``weight`` and
    ``class_mask`` are this shard's slices; integer labels are the global ones, replicated over the axis;
    ``sample_weight`` and ``denominator`` are replicated. Every option uses the global K and W; the shards
    exchange one ``lax.pmax`` of the row maxima and one ``lax.psum`` of packed row statistics, never logits.
    The loss is the unsharded one on every shard, and the backward pass needs no communication: each shard's
    gradient is its slice of the unsharded gradient. Outside ``shard_map``, plain ``jax.jit`` over logits
    sharded on the class axis with a ``NamedSharding`` needs no ``axis_name``: XLA partitions the same loss.

"""


def _docstring() -> str:
    return (
        spec.LOSS_DOC
        + _JAX_NOTES
        + """Example:
    >>> import jax, jax.numpy as jnp, lsx.jax
    >>> x = jnp.array([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
    >>> y = jnp.array([2, 1, 0])
    >>> round(float(lsx.jax.loss(x, y, label_smoothing=0.3)), 4)
    1.3883
    >>> round(float(jax.jit(lambda x: lsx.jax.loss(x, y, label_smoothing=0.3, spread="others"))(x)), 4)
    1.4178
"""
    )


loss.__doc__ = _docstring()
