"""Vocabulary-parallel ``lsx.jax.loss``: the class axis split over a mesh axis, inside ``jax.shard_map``.

``lsx.jax.loss(logits, target, axis_name="v")`` called inside ``jax.shard_map`` sees this shard's slice of
the classes (equal slices, in the mesh axis's order): ``logits`` holds the slice, integer ``target`` the
global labels (replicated over the axis), a probability ``target``, ``weight`` and ``class_mask`` the slice.
Every option works with the global class count K and the global class-weight total W.

Statistics are communicated, never logits: one ``lax.pmax`` of the row maxima, then one ``lax.psum`` of the
packed per-row statistics taken relative to the global maximum m (Σ exp(x − m); the target's x_y − m and
w_y from the shard that owns the label; Σ w (x − m); for probabilities Σ w q, Σ w q (x − m), Σ w·xlogx(q);
the bad-label and masked-mass flags) together with the per-shard scalars (valid classes, W, a bad traced
weight). A probability target with ``class_mask`` and ε > 0 needs K before its statistics: one more scalar
``psum`` first. The loss and the gradient's row coefficient come from :func:`lsx.spec.label_row` /
:func:`lsx.spec.probability_row`, exactly as in :mod:`lsx.jax._engine`, so every shard holds the same loss.

The gradient is a ``jax.custom_vjp`` whose backward pass needs no communication: from the saved global
log-sum-exp and row coefficient each shard writes its slice of the unsharded gradient (and of the weight's
and the probability target's).

:func:`_forward` (local statistics, their merge over the axis, the loss) and :func:`backward` (this slice's
gradient from the merged statistics) are shared with ``lsx.jax.linear_loss(..., axis_name=...)``
(:mod:`lsx.jax._linear`), which calls them on each chunk of rows of the logits ``hidden @ kernel_local``.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from lsx import spec
from lsx.jax import _engine
from lsx.jax._engine import Config

_OPS = _engine._OPS


def axis_size(axis_name: Any) -> int:
    """The number of shards along ``axis_name``; a clear error outside a ``shard_map`` that binds it."""
    try:
        return int(lax.axis_size(axis_name))
    except NameError:
        raise ValueError(
            f"axis_name={axis_name!r} is not a mesh axis of the enclosing jax.shard_map (call lsx.jax.loss with "
            "axis_name= inside a shard_map over a mesh with that axis)"
        ) from None


def varies_over(value: Any, axis_name: Any) -> bool:
    """Whether ``value`` is typed as varying over ``axis_name`` (shard_map's check_vma typing)."""
    aval = jax.typeof(value)
    manual = getattr(aval, "manual_axis_type", None)
    varying = getattr(manual, "varying", None)
    if varying is None:
        varying = getattr(aval, "vma", frozenset())
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return any(name in varying for name in names)


def varying(tree: Any, axis_name: Any) -> Any:
    """``tree``'s arrays typed as varying over ``axis_name`` (a scan carry that will hold this shard's sums)."""
    if hasattr(lax, "pcast"):
        return jax.tree.map(lambda a: lax.pcast(a, axis_name, to="varying"), tree)
    return jax.tree.map(lambda a: lax.pvary(a, axis_name), tree)


def typed(axis_name: Any) -> bool:
    """Whether the enclosing ``shard_map`` types values as varying or not over the axis (``check_vma=True``)."""
    return varies_over(lax.axis_index(axis_name), axis_name)


def _offset(axis_name, local_classes: int):
    """This shard's first global class index."""
    return lax.axis_index(axis_name).astype(jnp.int32) * local_classes


def _local_label(label, offset, local_classes: int):
    """(owns, the label's index in this slice, clamped to 0 where this shard does not own it)."""
    local = label - offset
    owns = (local >= 0) & (local < local_classes)
    return owns, jnp.where(owns, local, 0)


def _coefficients(cfg: Config, count, total_weight) -> spec.RowCoefficients:
    options = spec.Options(
        label_smoothing=cfg.label_smoothing, spread=cfg.spread, z_loss=cfg.z_loss, normalize=cfg.normalize
    )
    valid = cfg.valid_count if cfg.valid_count is not None else count
    if valid is None:  # ε = 0 with a probability target: a = 1 and b = 0 whatever K is
        valid = 1
    return spec.RowCoefficients.of(options, valid, total_weight)


def _logits(cfg: Config, x, mask):
    """(this slice's logits in the compute dtype, soft-capped when ``cfg.softcap`` is set, −inf on masked
    classes; tanh(x/c) or None)."""
    x = x.astype(cfg.compute)
    tanh = None
    softcap = getattr(cfg, "softcap", None)
    if softcap is not None:
        tanh = jnp.tanh(x / softcap)
        x = softcap * tanh
    return (x if mask is None else jnp.where(mask, x, -jnp.inf)), tanh


def _weight_poison(weight):
    """1 on a shard whose (traced) weight has a negative or non-finite entry, else 0."""
    return jnp.any(~(jnp.isfinite(weight) & (weight >= 0))).astype(weight.dtype)


# ----------------------------------------------------------------------------------------------------------
# Per-element loss with its communication-free closed-form gradient
# ----------------------------------------------------------------------------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def per_element(cfg: Config, axis_name, x, target, weight, mask):
    """(per-element loss, the target's global class weight w_y for integer labels, else None)."""
    loss, w_y, _ = _forward(cfg, axis_name, x, target, weight, mask)
    return loss, w_y


def _forward(cfg: Config, axis_name, x, target, weight, mask):
    local_classes = x.shape[-1]
    w = _engine._effective_weight(weight, mask)
    xc, _ = _logits(cfg, x, mask)
    row_max = lax.pmax(jnp.max(xc, axis=-1), axis_name)
    row_max = jnp.where(row_max == -jnp.inf, 0, row_max)
    sum_exp = jnp.sum(jnp.exp(xc - row_max[..., None]), axis=-1)

    # per-shard scalars summed over the axis with the row statistics: valid classes, W, a bad traced weight
    scalars = {}
    if cfg.valid_count is None:
        scalars["count"] = jnp.sum(mask).astype(cfg.compute)
    if w is not None:
        scalars["total_weight"] = jnp.sum(w)
        scalars["poison"] = _weight_poison(weight)
    rows = {"sum_exp": sum_exp}

    if cfg.kind == "index":
        active, label, bad = _engine._labels(cfg, target, local_classes * axis_size(axis_name), None)
        owns, local = _local_label(label, _offset(axis_name, local_classes), local_classes)
        x_y = jnp.take_along_axis(xc, local[..., None], axis=-1)[..., 0] - row_max  # a masked label is bad
        rows["x_y"] = jnp.where(owns, x_y, 0)
        if w is not None:
            rows["w_y"] = jnp.where(owns, w[local], 0)
        if mask is not None:
            rows["bad"] = (owns & active & ~mask[local]).astype(cfg.compute)
        # Σ_c w_c x_c over the slice (only read when b ≠ 0); the shift by W·m comes after the sum
        empty_target = cfg.spread == "others" and cfg.label_smoothing == 1.0  # q_y = 0: x_y stays out
        if cfg.label_smoothing != 0:
            if w is None:
                terms = xc if mask is None else jnp.where(mask, xc, 0)
            else:
                terms = jnp.where(w != 0, w * xc, 0)
            if empty_target:
                on_target = owns[..., None] & (jnp.arange(local_classes, dtype=local.dtype) == local[..., None])
                terms = jnp.where(on_target, 0, terms)
            rows["weighted_sum"] = jnp.sum(terms, axis=-1)
        rows, scalars = _psum(rows, scalars, axis_name)
        k = _coefficients(cfg, scalars.get("count"), scalars.get("total_weight"))
        w_y = rows.get("w_y", 1.0 if w is None else None)
        if "bad" in rows:
            bad = bad | (rows["bad"] != 0)
        total = k.total_weight - w_y if empty_target else k.total_weight
        weighted_sum = rows["weighted_sum"] - total * row_max if "weighted_sum" in rows else 0.0
        log_sum_exp = jnp.log(rows["sum_exp"])
        loss, _ = spec.label_row(
            k,
            log_sum_exp=log_sum_exp,
            row_max=row_max,
            w_y=w_y,
            x_y=rows["x_y"],
            weighted_sum=weighted_sum,
            target_excluded=k.empty_target,
            **_OPS,
        )
        loss = jnp.where(bad, jnp.nan, jnp.where(active, loss, 0))
        saved = dict(lse=row_max + log_sum_exp, bad=bad, w_y=None if w is None else w_y)
        out_w_y = None if w is None else w_y
    else:
        count = None
        if cfg.valid_count is None and cfg.label_smoothing != 0:
            # q = a·t + b needs K before the statistics
            count = lax.psum(scalars.pop("count"), axis_name)
        else:
            scalars.pop("count", None)
        k = _coefficients(cfg, count, None)
        q, wq, contributes = _engine._probability_terms(cfg, k, target, w, mask)
        rows["target_mass"] = jnp.sum(wq, axis=-1)
        rows["weighted_sum"] = jnp.sum(jnp.where(contributes, wq * xc, 0), axis=-1)
        if cfg.normalize:
            entropy_terms = spec.xlogx(q, **_OPS) if w is None else w * spec.xlogx(q, **_OPS)
            rows["weighted_xlogx"] = jnp.sum(jnp.where(contributes, entropy_terms, 0), axis=-1)
        if mask is not None:
            rows["bad"] = _engine._masked_mass(target, mask).astype(cfg.compute)
        scalars.pop("total_weight", None)
        rows, scalars = _psum(rows, scalars, axis_name)
        log_sum_exp = jnp.log(rows["sum_exp"])
        loss, _ = spec.probability_row(
            k,
            log_sum_exp=log_sum_exp,
            row_max=row_max,
            target_mass=rows["target_mass"],
            weighted_sum=rows["weighted_sum"] - rows["target_mass"] * row_max,
            weighted_xlogx=rows.get("weighted_xlogx"),
        )
        bad = rows["bad"] != 0 if "bad" in rows else None
        if bad is not None:
            loss = jnp.where(bad, jnp.nan, loss)
        saved = dict(lse=row_max + log_sum_exp, bad=bad, target_mass=rows["target_mass"], count=count)
        out_w_y = None
    # a negative or non-finite traced weight on any shard makes everything NaN (concrete ones raise)
    poison = None
    if "poison" in scalars:
        poison = jnp.where(scalars["poison"] != 0, jnp.nan, 0).astype(cfg.compute)
        loss = loss + poison
        out_w_y = None if out_w_y is None else out_w_y + poison
    saved.update(count=saved.get("count", scalars.get("count")), total_weight=scalars.get("total_weight"))
    saved["poison"] = poison
    return loss, out_w_y, saved


def _psum(rows: dict, scalars: dict, axis_name):
    """One all-reduce of the per-row statistics (stacked on a last axis) and the per-shard scalars."""
    names = sorted(rows)
    packed = jnp.stack([rows[name] for name in names], axis=-1)
    packed, scalars = lax.psum((packed, scalars), axis_name)
    return {name: packed[..., i] for i, name in enumerate(names)}, scalars


def _per_element_fwd(cfg: Config, axis_name, x, target, weight, mask):
    loss, w_y, saved = _forward(cfg, axis_name, x, target, weight, mask)
    return (loss, w_y), (x, target, weight, mask, saved)


def _per_element_bwd(cfg: Config, axis_name, residuals, cotangents):
    x, target, weight, mask, saved = residuals
    g, g_w_y = cotangents
    g = whole_cotangent(g, axis_name)
    g_w_y = None if g_w_y is None else whole_cotangent(g_w_y, axis_name)
    return backward(cfg, axis_name, x, target, weight, mask, saved, g, g_w_y)


def whole_cotangent(g, axis_name):
    """The whole cotangent of a replicated output on every shard.

    ``shard_map(check_vma=False)`` hands each shard a part of a replicated output's cotangent (they sum to
    it); with ``check_vma=True`` every shard receives the whole one."""
    return g if typed(axis_name) else lax.psum(g, axis_name)


def backward(cfg: Config, axis_name, x, target, weight, mask, saved, g, g_w_y=None):
    """(this slice's ∂/∂x, ∂/∂target (probabilities), ∂/∂weight, None) of Σ_i g_i·ℓ_i (+ Σ_i g_w_y,i·w_y,i),
    from the statistics ``saved`` by :func:`_forward`; no communication. ``g`` is the whole cotangent."""
    local_classes = x.shape[-1]
    w = _engine._effective_weight(weight, mask)
    k = _coefficients(cfg, saved["count"], saved["total_weight"])
    lse = saved["lse"]
    g = g.astype(cfg.compute)
    xc, tanh = _logits(cfg, x, mask)
    p = jnp.exp(xc - lse[..., None])
    weight_bar = target_bar = None

    if cfg.kind == "index":
        active, label, _ = _engine._labels(cfg, target, local_classes * axis_size(axis_name), None)
        bad = saved["bad"]
        offset = _offset(axis_name, local_classes)
        owns, local = _local_label(label, offset, local_classes)
        g = jnp.where(active, g, 0)
        w_y = 1.0 if w is None else saved["w_y"]
        _, coef = spec.label_row(k, log_sum_exp=lse, row_max=0.0, w_y=w_y, x_y=0.0, weighted_sum=0.0, **_OPS)
        spread = k.b if w is None else k.b * w
        a_w_y = k.a * w_y if w is None else (k.a * w_y)[..., None]
        classes = offset + jnp.arange(local_classes, dtype=jnp.int32)
        on_label = jnp.where(classes == label[..., None], a_w_y, 0)
        grad = (g * coef)[..., None] * p - g[..., None] * (spread + on_label)
        keep = active[..., None] if mask is None else active[..., None] & mask
        grad = jnp.where(bad[..., None], jnp.nan, jnp.where(keep, grad, 0))
        if weight is not None:
            weight_bar = _index_weight_grad(cfg, k, xc, lse, g, active, owns, local, bad, mask)
            # the mean's denominator Σ w_y: its cotangent lands on the owning shard's class
            if g_w_y is not None:
                on_owner = jnp.where(owns & active, g_w_y.astype(cfg.compute), 0)
                weight_bar = weight_bar.at[local.reshape(-1)].add(on_owner.reshape(-1))
    else:
        q, wq, contributes = _engine._probability_terms(cfg, k, target, w, mask)
        _, coef = spec.probability_row(
            k, log_sum_exp=lse, row_max=0.0, target_mass=saved["target_mass"], weighted_sum=0.0, weighted_xlogx=0.0
        )
        grad = (g * coef)[..., None] * p - g[..., None] * wq
        target_bar, weight_bar = _engine._probability_bars(cfg, k, g, coef, lse, xc, q, contributes, w, target, weight)
        if saved["bad"] is not None:
            bad_mass = saved["bad"][..., None]
            grad = jnp.where(bad_mass, jnp.nan, jnp.where(mask, grad, 0))
            target_bar = jnp.where(bad_mass, jnp.nan, jnp.where(mask, target_bar, 0))
        elif mask is not None:
            grad = jnp.where(mask, grad, 0)
            target_bar = jnp.where(mask, target_bar, 0)
        target_bar = target_bar.astype(target.dtype)

    if tanh is not None:
        grad = grad * (1 - tanh * tanh)  # the chain rule through c·tanh(x/c)
    if saved["poison"] is not None:
        grad = grad + saved["poison"]
    if mask is not None and weight_bar is not None:
        weight_bar = jnp.where(mask, weight_bar, 0)
    if weight_bar is not None:
        weight_bar = weight_bar.astype(weight.dtype)
    return grad.astype(x.dtype), target_bar, weight_bar, None


def _index_weight_grad(cfg: Config, k: spec.RowCoefficients, xc, lse, g, active, owns, local, bad, mask):
    """This slice of ∂/∂w_c Σ_i g_i·loss_i for integer labels (see ``lsx.jax._engine._index_weight_grad``)."""
    local_classes = xc.shape[-1]
    rows = tuple(range(xc.ndim - 1))
    g = jnp.where(bad, jnp.nan, g)
    if k.empty_target:  # q_y = 0: x_y is never read (see lsx.jax._engine._index_weight_grad)
        on_label = -spec.scaled(k.b, g * lse, where=jnp.where)
    else:
        x_y = jnp.take_along_axis(xc, local[..., None], axis=-1)[..., 0]
        on_label = spec.scaled(k.a, g * (lse - x_y), where=jnp.where)
    if k.z != 0:
        on_label = on_label + k.z * g * lse * lse
    if k.normalize:
        on_label = on_label + g * (spec.xlogx(k.a + k.b, **_OPS) - spec.xlogx(k.b, **_OPS))
    on_label = jnp.where(active & owns, on_label, 0)
    bar = jnp.zeros(local_classes, cfg.compute).at[local.reshape(-1)].add(on_label.reshape(-1))
    if not (isinstance(k.b, float) and k.b == 0):
        counted = active[..., None]
        if k.empty_target:
            counted = counted & ~(owns[..., None] & (jnp.arange(local_classes, dtype=local.dtype) == local[..., None]))
        valid_x = jnp.where(counted, g[..., None] * (xc if mask is None else jnp.where(mask, xc, 0)), 0)
        bar = bar + spec.scaled(
            k.b, jnp.sum(jnp.where(active, g * lse, 0)) - jnp.sum(valid_x, axis=rows), where=jnp.where
        )
    if k.normalize:
        bar = bar + jnp.sum(g) * spec.xlogx(k.b, **_OPS)
    return bar


per_element.defvjp(_per_element_fwd, _per_element_bwd)


# ----------------------------------------------------------------------------------------------------------
# Reduction (every shard holds the same rows, so the reduction is local)
# ----------------------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(0, 1))
def loss(cfg: Config, axis_name, x, target, weight, mask, sample_weight=None, denominator=None):
    """The reduced loss in the logits' dtype; ``x`` and a probability ``target`` have the classes last.

    ``sample_weight`` and ``denominator`` (replicated over the axis) enter as in ``lsx.jax._engine.loss``,
    differentiated by JAX outside the custom_vjp; so is the mean's Σ w_y (its cotangent reaches the weight
    of the shard that owns each label)."""
    weight = None if weight is None else weight.astype(cfg.compute)
    per, w_y = per_element(cfg, axis_name, x, target, weight, mask)
    if sample_weight is not None:
        sw = sample_weight.astype(cfg.compute)
        sample_weight = jnp.where(jnp.isfinite(sw) & (sw >= 0), sw, jnp.nan)  # a traced bad value: NaN
        per = per * sample_weight
    if cfg.reduction == "none":
        return per.astype(x.dtype)
    total = jnp.sum(per)
    if cfg.reduction == "mean":
        if denominator is not None:
            d = denominator.astype(cfg.compute)
            denominator = jnp.where(jnp.isfinite(d) & (d >= 0), d, jnp.nan)
        elif cfg.kind == "index":
            active, _, _ = _engine._labels(cfg, target, x.shape[-1] * axis_size(axis_name), None)
            counted = active.astype(cfg.compute) if w_y is None else jnp.where(active, w_y, 0)
            if sample_weight is not None:
                counted = jnp.where(active, counted * sample_weight, 0)
            denominator = jnp.sum(counted, dtype=cfg.compute)
        else:
            denominator = per.size if sample_weight is None else jnp.sum(sample_weight)
        total = spec.reduce_total(cfg.reduction, total, denominator, cfg.empty_mean, where=jnp.where)
    return total.astype(x.dtype)


# ----------------------------------------------------------------------------------------------------------
# The adapter's half: checks of what is concrete, with the global class count
# ----------------------------------------------------------------------------------------------------------
def sharded_loss(x, target, raw_target, kind: str, layout: spec.Layout, opts: spec.Options, axis_name):
    """``lsx.jax.loss(..., axis_name=...)`` after the option and shape checks (shapes are the slice's)."""
    from lsx.jax import _check_weight_range, _labels_for_jax, _traced

    shards = axis_size(axis_name)
    local_classes = layout.num_classes
    k = local_classes * shards
    check_sharded("logits", x, target, kind, axis_name)

    w, mask, global_mask = class_slices(opts, local_classes, shards)

    element_shape = spec.element_shape(x.shape, layout.axis)
    if opts.sample_weight is not None and not _traced(opts.sample_weight):
        spec.check_sample_weight(np.asarray(opts.sample_weight), element_shape)
    if opts.denominator is not None and not _traced(opts.denominator):
        spec.check_denominator(opts.denominator)
    sw, d = _real_array("sample_weight", opts.sample_weight), _real_array("denominator", opts.denominator)
    if sw is not None and tuple(sw.shape) != element_shape:
        raise ValueError(f"sample_weight must have the per-element loss's shape {element_shape}, got {sw.shape}")
    _check_weight_range(x.dtype, opts.weight, opts.sample_weight, element_shape)

    ignore_index = opts.ignore_index
    if _traced(target):
        t = target
    else:
        if kind == "index":
            spec.check_labels(raw_target, k, opts, global_mask)
        elif global_mask is not None:
            spec.check_probability_target_mask(raw_target, layout.axis, global_mask[:local_classes])
        if isinstance(target, jax.Array) or kind == "probs":
            t = jnp.asarray(target)
        else:
            t, ignore_index = _labels_for_jax(raw_target, ignore_index)

    extra = {} if opts.softcap is None else {"softcap": opts.softcap}
    cfg = Config(
        **extra,
        kind=kind,
        label_smoothing=opts.label_smoothing,
        spread=opts.spread,
        z_loss=opts.z_loss,
        normalize=opts.normalize,
        ignore_index=ignore_index,
        reduction=opts.reduction,
        empty_mean=opts.empty_mean,
        valid_count=k if mask is None else None,
        compute="float64" if x.dtype == jnp.float64 else "float32",
    )
    return loss(
        cfg,
        axis_name,
        jnp.moveaxis(x, layout.axis, -1),
        t if kind == "index" else jnp.moveaxis(t, layout.axis, -1),
        w,
        mask,
        sw,
        d,
    )


def class_slices(opts: spec.Options, local_classes: int, shards: int):
    """(weight, class_mask, the concrete global class_mask or None) of this shard's slice of the classes,
    checked where concrete (a concrete ``class_mask`` slice is the same on every shard: checked tiled, with the
    global class count)."""
    from lsx.jax import _traced

    k = local_classes * shards
    w = None
    if opts.weight is not None:
        if _traced(opts.weight):
            w = opts.weight
            if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)):
                raise TypeError(f"weight must be a real array, got dtype {w.dtype}")
        else:
            spec.check_weight(np.asarray(opts.weight), local_classes)
            w = jnp.asarray(opts.weight)
    mask = None
    global_mask = None  # a concrete slice is the same on every shard
    if opts.class_mask is not None:
        if _traced(opts.class_mask):
            mask = opts.class_mask
            if mask.dtype != jnp.bool_:
                raise TypeError(f"class_mask must be a boolean array, got dtype {mask.dtype}")
        else:
            concrete = np.asarray(opts.class_mask)
            if concrete.dtype != np.bool_:
                raise TypeError(f"class_mask must be a boolean array, got dtype {concrete.dtype}")
            if concrete.shape != (local_classes,):
                spec.check_class_mask(concrete, local_classes, opts)  # names the shape
            global_mask = spec.check_class_mask(np.tile(concrete, shards), k, opts)
            mask = jnp.asarray(concrete)
    elif opts.spread == "others" and opts.label_smoothing > 0 and k < 2:
        spec.check_class_mask(np.ones(k, bool), k, opts)  # the error for K = 1
    return w, mask, global_mask


def check_sharded(name: str, x, target, kind: str, axis_name) -> None:
    """``x`` (the logits, or the kernel) must vary over ``axis_name``; integer labels must not (checked where
    the enclosing ``shard_map`` types values, ``check_vma=True``)."""
    if typed(axis_name) and not varies_over(x, axis_name):
        raise ValueError(
            f"with axis_name={axis_name!r} the {name} must be this shard's slice of the classes, varying over that "
            f"axis (in_specs with {axis_name!r} on the class axis), but it is replicated over it"
        )
    if kind == "index" and varies_over(target, axis_name):
        raise ValueError(
            f"with axis_name={axis_name!r} the integer target holds the global labels and must be replicated "
            f"over that axis (in_specs without {axis_name!r} for it), but it varies over it"
        )


def _real_array(name: str, value: Any) -> Any:
    """A per-element ``sample_weight`` or a 0-d ``denominator`` as a real JAX array, or None."""
    if value is None:
        return None
    array = value if isinstance(value, jax.core.Tracer) else jnp.asarray(value)
    if array.dtype == jnp.bool_ or not (
        jnp.issubdtype(array.dtype, jnp.floating) or jnp.issubdtype(array.dtype, jnp.integer)
    ):
        raise TypeError(f"{name} must be a real array, got dtype {array.dtype}")
    return array
