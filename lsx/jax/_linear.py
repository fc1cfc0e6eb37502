"""Fused linear + loss for JAX: the loss of ``hidden @ kernel (+ bias)`` without ever holding the logits.

The rows of ``hidden`` are flattened to (N, H) and processed in chunks of ``chunk`` rows (``lax.scan``, plus
one remainder chunk when ``chunk`` does not divide N). A chunk's logits are computed, reduced to the engine's
row statistics (:func:`lsx.jax._engine._forward`) and turned into the gradient with respect to the logits
(:func:`lsx.jax._engine._per_element_bwd`), which the two matmuls of the chain rule consume at once; no
logits-sized array outlives its chunk.

Two ``custom_vjp`` functions, one per reduction kind:

- ``"sum"``/``"mean"``: :func:`_reduced` returns Σ_i sw_i·ℓ_i (÷ D for the mean, D an input). Its forward
  rule (used only when something is differentiated) computes the gradients for a unit upstream in the same
  sweep as the loss, for exactly the inputs being differentiated, so the logits are computed once; its
  backward rule scales them by the upstream scalar (a constant 1 under ``value_and_grad``, which XLA folds
  away, so the kernel's gradient is accumulated straight into the output). Residuals: the gradients (shaped
  like the inputs) and, when ``sample_weight`` is differentiated, the per-element losses.
- ``"none"``: :func:`_per_element` returns ℓ_i; its forward rule keeps the log-sum-exp of each row (residuals
  O(N·H + N): hidden, kernel, bias, target and L), and its backward rule sweeps the chunks again with the
  caller's per-element cotangent, recomputing each chunk's logits.

The mean's denominator (Σ sw·w_y over the non-ignored elements, Σ sw for probabilities, or the caller's) and
the division are plain JAX around them, so JAX differentiates them with respect to ``sample_weight`` too.

With ``axis_name`` (inside ``jax.shard_map``) the kernel's V axis is split over that mesh axis: each chunk's
local logits are reduced to this shard's row statistics and merged with the other shards' by
:func:`lsx.jax._parallel._forward` (one ``pmax`` of the row maxima, one ``psum`` of the packed statistics),
and :func:`lsx.jax._parallel.backward` writes this shard's columns of the gradient with respect to the
logits. The hidden gradient, Σ over the shards of dz_local @ kernel_local.T, is one ``psum`` of (N, H) after
the sweep; the mean's Σ w_y is one scalar ``psum`` (each shard adds the labels it owns). For ``"none"`` the
backward sweep merges each chunk's statistics again (one more ``pmax`` and ``psum`` per chunk).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import lsx.jax as _adapter
from lsx import spec
from lsx.jax import _engine, _parallel
from lsx.spec import default

__all__ = ["linear_loss"]

#: rows per chunk when ``chunk_size`` is None: about this many logits per chunk
CHUNK_ELEMENTS = 2**22
#: the kernel's gradient is accumulated in column blocks of about this many elements
KERNEL_BLOCK_ELEMENTS = 2**21


@dataclass(frozen=True)
class _Plan:
    engine: _engine.Config
    softcap: float | None
    chunk: int
    dtype: str  # the inputs' common floating dtype: loss and gradients come back in it
    axis_name: Any = None  # the mesh axis splitting the kernel's V axis (inside jax.shard_map), or None


# ----------------------------------------------------------------------------------------------------------
# One chunk of rows
# ----------------------------------------------------------------------------------------------------------
def _logits(plan: _Plan, h, kernel, bias):
    """(logits of the chunk in the compute dtype, soft-capped; tanh(z/c) for the chain rule, or None)."""
    compute = plan.engine.compute
    z = jnp.dot(h, kernel, preferred_element_type=compute)
    if bias is not None:
        z = z + bias.astype(compute)
    if plan.softcap is None:
        return z, None
    tanh = jnp.tanh(z / plan.softcap)
    return plan.softcap * tanh, tanh


def _chunk_losses(plan: _Plan, h, kernel, bias, target, weight, mask):
    """(ℓ, L) of the chunk's rows; with an axis, this shard's logits merged with the others' statistics (one
    ``pmax`` and one ``psum``, :func:`lsx.jax._parallel._forward`)."""
    z, _ = _logits(plan, h, kernel, bias)
    if plan.axis_name is None:
        return _engine._forward(plan.engine, z, target, weight, mask)
    loss, _, saved = _parallel._forward(plan.engine, plan.axis_name, z, target, weight, mask)
    return loss, saved["lse"]


def _chunk_grads(plan: _Plan, wants, h, kernel, bias, target, weight, mask, g, lse, dk_total):
    """(loss or None, dh, dkernel_total + dkernel, dbias, dweight, dtarget) of Σ_i g_i·ℓ_i over one chunk.

    ``lse`` is the saved log-sum-exp, or None to compute it (and the loss) here. Entries of ``wants``
    (hidden, kernel, bias, weight, target) that are False come back as None."""
    want_h, want_k, want_b, want_w, want_t = wants
    z, tanh = _logits(plan, h, kernel, bias)
    loss = None
    if plan.axis_name is not None:
        # the statistics are merged over the axis again (a backward sweep saves no per-shard scalars)
        loss, _, saved = _parallel._forward(plan.engine, plan.axis_name, z, target, weight, mask)
        dz, t_bar, w_bar, _ = _parallel.backward(plan.engine, plan.axis_name, z, target, weight, mask, saved, g)
    else:
        if lse is None:
            loss, lse = _engine._forward(plan.engine, z, target, weight, mask)
        dz, t_bar, w_bar, _ = _engine._per_element_bwd(plan.engine, (z, target, weight, mask, lse), g)
    if tanh is not None:
        dz = dz * (1 - tanh * tanh)
    compute = plan.engine.compute
    dz_in = dz.astype(plan.dtype)  # the matmuls run in the inputs' dtype, as the materialised path's
    # with an axis: this shard's contribution to the hidden gradient (summed over the axis in _sweep)
    dh = jnp.dot(dz_in, kernel.T, preferred_element_type=compute) if want_h else None
    dk = _accumulate_kernel_grad(dk_total, h, dz_in, compute) if want_k else None
    db = jnp.sum(dz, axis=0) if want_b else None
    return loss, dh, dk, db, (w_bar if want_w else None), (t_bar if want_t else None)


def _accumulate_kernel_grad(total, h, dz, compute):
    """``total + h.T @ dz``, in column blocks of about :data:`KERNEL_BLOCK_ELEMENTS` updated in place, so
    that no second (H, V) buffer holds the chunk's product before it is added."""
    hidden_size, v = total.shape
    blocks = -(-hidden_size * v // KERNEL_BLOCK_ELEMENTS)
    width = -(-v // blocks)
    for start in range(0, v, width):
        stop = min(v, start + width)
        part = jnp.dot(h.T, dz[:, start:stop], preferred_element_type=compute)
        total = lax.dynamic_update_slice(total, total[:, start:stop] + part, (0, start))
    return total


def _over_chunks(chunk: int, body, carry, rows):
    """``body(carry, rows_c) -> (carry, out_c)`` over chunks of ``chunk`` rows: a ``lax.scan`` over the
    whole chunks and one call on the remainder; the outputs are concatenated back to N rows."""
    n = jax.tree.leaves(rows)[0].shape[0]
    full, rem = divmod(n, chunk)
    outs = []
    if full or not rem:
        stacked = jax.tree.map(lambda a: a[: full * chunk].reshape((full, chunk) + a.shape[1:]), rows)
        carry, out = lax.scan(body, carry, stacked)
        outs.append(jax.tree.map(lambda a: a.reshape((full * chunk,) + a.shape[2:]), out))
    if rem:
        carry, out = body(carry, jax.tree.map(lambda a: a[full * chunk :], rows))
        outs.append(out)
    out = outs[0] if len(outs) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *outs)
    return carry, out


def _add(total, part):
    return None if total is None else total + part


def _sweep(plan: _Plan, wants, h, kernel, bias, target, weight, mask, g, lse):
    """Σ over the chunks of :func:`_chunk_grads`: (loss or None, dh, dk, db, dweight, dtarget), in the
    inputs' dtypes (gradients accumulate in the compute dtype)."""
    _, want_k, want_b, want_w, _ = wants
    compute = plan.engine.compute
    carry = (
        jnp.zeros(kernel.shape, compute) if want_k else None,
        jnp.zeros(kernel.shape[1:], compute) if want_b else None,
        jnp.zeros(weight.shape, compute) if want_w else None,
    )
    if plan.axis_name is not None and _parallel.typed(plan.axis_name):
        carry = _parallel.varying(carry, plan.axis_name)  # the sums of this shard's columns

    def body(carry, rows):
        h_c, t_c, g_c, lse_c = rows
        loss, dh, dk, db, dw, dt = _chunk_grads(plan, wants, h_c, kernel, bias, t_c, weight, mask, g_c, lse_c, carry[0])
        return (dk, _add(carry[1], db), _add(carry[2], dw)), (loss, dh, dt)

    (dk, db, dw), (loss, dh, dt) = _over_chunks(plan.chunk, body, carry, (h, target, g, lse))
    if dh is not None and plan.axis_name is not None and _parallel.typed(plan.axis_name):
        # Σ over the shards of dz_local @ kernel_local.T; without check_vma, shard_map's transpose sums the
        # replicated hidden's cotangent itself
        dh = lax.psum(dh, plan.axis_name)
    return (
        loss,
        None if dh is None else dh.astype(h.dtype),
        None if dk is None else dk.astype(kernel.dtype),
        None if db is None else db.astype(bias.dtype),
        None if dw is None else dw.astype(weight.dtype),
        None if dt is None else dt.astype(target.dtype),
    )


def _losses(plan: _Plan, h, kernel, bias, target, weight, mask):
    """(ℓ, L) per row, chunk by chunk."""

    def body(carry, rows):
        return carry, _chunk_losses(plan, rows[0], kernel, bias, rows[1], weight, mask)

    return _over_chunks(plan.chunk, body, (), (h, target))[1]


def _wants(plan: _Plan, h: bool, kernel: bool, bias: bool, target: bool, weight: bool) -> tuple[bool, ...]:
    """Which gradients to take: (hidden, kernel, bias, weight, target); a label target has none."""
    return (h, kernel, bias, weight, target and plan.engine.kind == "probs")


def _perturbed(primal) -> bool:
    return primal is not None and primal.perturbed


# ----------------------------------------------------------------------------------------------------------
# reduction="none": per-element losses, backward sweep recomputing the logits
# ----------------------------------------------------------------------------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _per_element(plan: _Plan, h, kernel, bias, target, weight, mask):
    return _losses(plan, h, kernel, bias, target, weight, mask)[0]


def _per_element_fwd(plan: _Plan, h, kernel, bias, target, weight, mask):
    loss, lse = _losses(plan, h, kernel, bias, target, weight, mask)
    return loss, (h, kernel, bias, target, weight, mask, lse)


def _per_element_bwd(plan: _Plan, residuals, cotangent):
    h, kernel, bias, target, weight, mask, lse = residuals
    wants = _wants(plan, True, True, bias is not None, True, weight is not None)
    if plan.axis_name is not None:
        cotangent = _parallel.whole_cotangent(cotangent, plan.axis_name)
        lse = None  # recomputed with the statistics
    _, dh, dk, db, dw, dt = _sweep(plan, wants, h, kernel, bias, target, weight, mask, cotangent, lse)
    return dh, dk, db, dt, dw, None


_per_element.defvjp(_per_element_fwd, _per_element_bwd)


# ----------------------------------------------------------------------------------------------------------
# reduction="sum"/"mean": Σ sw·ℓ (÷ D), gradients taken in the forward sweep
# ----------------------------------------------------------------------------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _reduced(plan: _Plan, h, kernel, bias, target, weight, mask, sample_weight, denominator):
    loss = _losses(plan, h, kernel, bias, target, weight, mask)[0]
    total = jnp.sum(loss if sample_weight is None else loss * sample_weight)
    return _divide(plan, total, denominator)


def _divide(plan: _Plan, total, denominator):
    if denominator is None:
        return total
    return spec.reduce_total("mean", total, denominator, plan.engine.empty_mean, where=jnp.where)


def _reduced_fwd(plan: _Plan, h, kernel, bias, target, weight, mask, sample_weight, denominator):
    primals = (h, kernel, bias, target, weight, mask, sample_weight, denominator)
    hv, kv, bv, tv, wv, mv, swv, dv = (None if p is None else p.value for p in primals)
    wants = _wants(plan, *map(_perturbed, (h, kernel, bias, target, weight)))
    # the gradients for a unit upstream: each element's cotangent is sw_i / D (0 when D = 0), so the
    # upstream of value_and_grad (a constant 1) leaves them as they are, with no extra pass over them
    scale = 1.0 if dv is None else spec.reduction_scale("mean", dv, where=jnp.where)
    g = jnp.ones(hv.shape[:1], plan.engine.compute) if swv is None else swv
    if any(wants):
        loss, dh, dk, db, dw, dt = _sweep(plan, wants, hv, kv, bv, tv, wv, mv, g * scale, None)
    else:
        loss, _ = _losses(plan, hv, kv, bv, tv, wv, mv)
        dh = dk = db = dw = dt = None
    total = jnp.sum(loss if swv is None else loss * swv)
    dsw = loss * scale if _perturbed(sample_weight) else None
    # ∂(total / D)/∂D = −total / D², 0 for D = 0 (the empty mean is a constant)
    dd = None if dv is None else jnp.where(dv != 0, -total * scale * scale, 0.0)
    return _divide(plan, total, dv), (dh, dk, db, dt, dw, dsw, dd)


def _reduced_bwd(plan: _Plan, residuals, cotangent):
    # the gradients of the sharded inputs (and this shard's part of the hidden's, without check_vma) take the
    # whole cotangent; those of replicated ones take what shard_map hands this shard
    whole = cotangent if plan.axis_name is None else _parallel.whole_cotangent(cotangent, plan.axis_name)
    scales = (whole,) * 5 + (cotangent,) * 2
    dh, dk, db, dt, dw, dsw, dd = (
        None if r is None else (c * r).astype(r.dtype) for c, r in zip(scales, residuals, strict=True)
    )
    return dh, dk, db, dt, dw, None, dsw, dd


_reduced.defvjp(_reduced_fwd, _reduced_bwd, symbolic_zeros=True)


@partial(jax.jit, static_argnums=(0,))
def _loss(plan: _Plan, h, kernel, bias, target, weight, mask, sample_weight, denominator):
    cfg = plan.engine
    if weight is not None:  # a bad traced weight: NaN (on any shard: _parallel._forward merges the check)
        weight = weight.astype(cfg.compute)
        weight = weight if plan.axis_name is not None else _engine._checked_weight(weight)
    sw = None
    if sample_weight is not None:  # a traced negative or non-finite one makes its element NaN
        sw = sample_weight.astype(cfg.compute)
        sw = jnp.where(jnp.isfinite(sw) & (sw >= 0), sw, jnp.nan)
    if cfg.reduction == "none":
        per = _per_element(plan, h, kernel, bias, target, weight, mask)
        return (per if sw is None else per * sw).astype(plan.dtype)
    d = None
    if cfg.reduction == "mean":  # D, differentiated by JAX with respect to sample_weight and weight
        if denominator is not None:
            d = jnp.asarray(denominator).astype(cfg.compute)
            d = jnp.where(jnp.isfinite(d) & (d >= 0), d, jnp.nan)  # a traced bad value gives NaN
        elif cfg.kind == "index" and plan.axis_name is not None:
            d = _sharded_label_count(plan, kernel.shape[1], target, weight, mask, sw)
        elif cfg.kind == "index":
            active, label, _ = _engine._labels(cfg, target, kernel.shape[1], mask)
            w = _engine._effective_weight(weight, mask)
            counted = active.astype(cfg.compute) if w is None else jnp.where(active, w[label], 0)
            d = jnp.sum(counted if sw is None else jnp.where(active, counted * sw, 0), dtype=cfg.compute)
        else:
            d = jnp.asarray(h.shape[0], cfg.compute) if sw is None else jnp.sum(sw)
    return _reduced(plan, h, kernel, bias, target, weight, mask, sw, d).astype(plan.dtype)


def _sharded_label_count(plan: _Plan, local_classes: int, target, weight, mask, sw):
    """The mean's Σ sw·w_y over the non-ignored labels with this shard's slice of the weight: each shard adds
    the w_y of the labels it owns, one scalar ``psum`` (differentiated by JAX with respect to the weight)."""
    cfg, axis_name = plan.engine, plan.axis_name
    active, label, _ = _engine._labels(cfg, target, local_classes * _parallel.axis_size(axis_name), None)
    w = _engine._effective_weight(weight, mask)
    if w is None:
        counted = active.astype(cfg.compute)
        return jnp.sum(counted if sw is None else jnp.where(active, counted * sw, 0), dtype=cfg.compute)
    owns, local = _parallel._local_label(label, _parallel._offset(axis_name, local_classes), local_classes)
    counted = jnp.where(active & owns, w[local], 0)
    counted = counted if sw is None else jnp.where(active & owns, counted * sw, 0)
    return lax.psum(jnp.sum(counted, dtype=cfg.compute), axis_name)


# ----------------------------------------------------------------------------------------------------------
# Public entry point: validation on the host, then the compiled sweep
# ----------------------------------------------------------------------------------------------------------
def linear_loss(
    hidden: Any,
    kernel: Any,
    target: Any,
    *,
    bias: Any = None,
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
    chunk_size: int | None = None,
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
    for name, value in given.items():
        if _traced(value):
            raise TypeError(
                f"{name} is a static option but was traced; use "
                f"jax.jit(functools.partial(linear_loss, {name}=...)) or jax.jit(..., static_argnames=({name!r},))"
            )
    opts = spec.resolve_options(
        convention,
        weight=weight,
        class_mask=class_mask,
        sample_weight=sample_weight,
        denominator=denominator,
        **given,
    )

    h = jnp.asarray(hidden)
    k = jnp.asarray(kernel)
    b = None if bias is None else jnp.asarray(bias)
    for name, array in (("hidden", h), ("kernel", k), ("bias", b)):
        if array is not None and not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"{name} must be floating point, got dtype {array.dtype}")
    if h.ndim < 1:
        raise ValueError(f"hidden must have shape (..., H), got a scalar of shape {h.shape}")
    if k.ndim != 2:
        raise ValueError(
            f"kernel must have shape (H, V) (as Flax's Dense; tied embeddings: pass embedding.T), got {k.shape}"
        )
    if k.shape[0] != h.shape[-1]:
        raise ValueError(
            f"kernel must have shape (H, V) with H = hidden.shape[-1] = {h.shape[-1]}, got kernel of shape {k.shape}"
        )
    num_classes = int(k.shape[1])
    if b is not None and b.shape != (num_classes,):
        raise ValueError(f"bias must have shape ({num_classes},) (one entry per class of kernel), got {b.shape}")
    dtype = jnp.result_type(h, k) if b is None else jnp.result_type(h, k, b)
    h, k, b = h.astype(dtype), k.astype(dtype), None if b is None else b.astype(dtype)

    lead = tuple(h.shape[:-1])
    logits_shape = lead + (num_classes,)
    raw_target = target if _traced(target) else np.asarray(target)
    kind = spec.target_kind(raw_target.dtype)
    layout = spec.check_layout(
        logits_shape,
        raw_target.shape,
        kind,
        opts,
        axis=-1,
        weight_shape=None if opts.weight is None else np.shape(opts.weight),
        class_mask_shape=None if opts.class_mask is None else np.shape(opts.class_mask),
        sample_weight_shape=None if opts.sample_weight is None else np.shape(opts.sample_weight),
    )
    n = int(np.prod(lead, dtype=np.int64))
    chunk = _chunk_rows(chunk_size, n, num_classes)

    global_classes = num_classes
    if axis_name is not None:  # the kernel's V axis (and bias, weight, class_mask) split over the mesh axis
        shards = _parallel.axis_size(axis_name)
        global_classes = num_classes * shards
        _parallel.check_sharded("kernel", k, target, kind, axis_name)
        if _parallel.varies_over(h, axis_name):
            raise ValueError(
                f"with axis_name={axis_name!r} hidden holds the whole rows and must be replicated over that axis "
                f"(in_specs without {axis_name!r} for it), but it varies over it"
            )
        w, mask, concrete_mask = _parallel.class_slices(opts, num_classes, shards)
        valid_count = global_classes if mask is None else None
        if concrete_mask is not None:
            valid_count = int(concrete_mask.sum())
    else:
        w, mask, concrete_mask, valid_count = _classes(opts, num_classes)
    sw = None
    if opts.sample_weight is not None:
        sw = opts.sample_weight
        if _traced(sw):
            if not (jnp.issubdtype(sw.dtype, jnp.floating) or jnp.issubdtype(sw.dtype, jnp.integer)):
                raise TypeError(f"sample_weight must be a real array, got dtype {sw.dtype}")
        else:
            spec.check_sample_weight(np.asarray(sw), lead)
            sw = jnp.asarray(sw)
        sw = sw.reshape(n)
    den = opts.denominator
    if den is not None and not _traced(den):
        den = spec.check_denominator(den)
    spec.check_softcap(opts.softcap, dtype)
    _adapter._check_weight_range(dtype, opts.weight, opts.sample_weight, lead)

    ignore = opts.ignore_index
    if _traced(target):
        t = target
    else:
        if kind == "index":
            spec.check_labels(raw_target, global_classes, opts, concrete_mask)
        elif concrete_mask is not None:  # with an axis, the concrete slice is the same on every shard
            spec.check_probability_target_mask(raw_target, layout.axis, concrete_mask[:num_classes])
        if isinstance(target, jax.Array) or kind == "probs":
            t = jnp.asarray(target)
        else:
            t, ignore = _adapter._labels_for_jax(raw_target, ignore)
    t = t.reshape((n,) if kind == "index" else (n, num_classes))

    compute = "float64" if dtype == jnp.float64 else "float32"
    plan = _Plan(
        engine=_engine.Config(
            kind=kind,
            label_smoothing=opts.label_smoothing,
            spread=opts.spread,
            z_loss=opts.z_loss,
            normalize=opts.normalize,
            ignore_index=ignore,
            reduction=opts.reduction,
            empty_mean=opts.empty_mean,
            valid_count=valid_count,
            compute=compute,
        ),
        softcap=opts.softcap,
        chunk=chunk,
        dtype=jnp.dtype(dtype).name,
        axis_name=axis_name,
    )
    out = _loss(plan, h.reshape(n, h.shape[-1]), k, b, t, w, mask, sw, den)
    return out.reshape(lead) if opts.reduction == "none" else out


def _classes(opts: spec.Options, num_classes: int):
    """(weight, class_mask, the concrete class_mask or None, the valid class count or None), checked where
    concrete."""
    w = None
    if opts.weight is not None:
        if _traced(opts.weight):
            w = opts.weight
            if not (jnp.issubdtype(w.dtype, jnp.floating) or jnp.issubdtype(w.dtype, jnp.integer)):
                raise TypeError(f"weight must be a real array, got dtype {w.dtype}")
        else:
            spec.check_weight(np.asarray(opts.weight), num_classes)
            w = jnp.asarray(opts.weight)
    concrete_mask = None
    valid_count: int | None = num_classes
    mask = None
    if opts.class_mask is not None:
        if _traced(opts.class_mask):
            mask = opts.class_mask
            if mask.dtype != jnp.bool_:
                raise TypeError(f"class_mask must be a boolean array, got dtype {mask.dtype}")
            valid_count = None
        else:
            concrete_mask = spec.check_class_mask(np.asarray(opts.class_mask), num_classes, opts)
            valid_count = int(concrete_mask.sum())
            mask = jnp.asarray(concrete_mask)
    return w, mask, concrete_mask, valid_count


def _chunk_rows(chunk_size: Any, n: int, num_classes: int) -> int:
    if chunk_size is None:
        return max(1, min(n, CHUNK_ELEMENTS // num_classes))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows per chunk) or None, got chunk_size={chunk_size!r}")
    return int(min(chunk_size, max(n, 1)))


def _traced(value: Any) -> bool:
    return isinstance(value, jax.core.Tracer)


linear_loss.__doc__ = f"""Label-smoothed cross-entropy of the logits ``hidden @ kernel (+ bias)``, never materialised.

Equal to ``lsx.jax.loss(hidden @ kernel + bias, target, ...)`` (every option, same names and defaults), with
memory O(N·H + H·V + chunk·V) instead of O(N·V): the rows are processed in chunks, and each chunk's logits
are reduced to the loss and consumed by the gradient's matmuls before the next chunk is computed.

Args:
    hidden: floating array (..., H): the last layer's activations.
    kernel: floating array (H, V), as Flax's ``Dense``; for tied embeddings pass ``embedding.T``.
    target: integer labels shaped like ``hidden`` without its last axis, or probabilities (..., V).
    bias: optional floating array (V,).
    label_smoothing, spread, weight, ignore_index, z_loss, normalize, class_mask, reduction, empty_mean, softcap, sample_weight, denominator, convention: as in
        :func:`lsx.jax.loss` (below); the classes are the kernel's V axis and ``sample_weight`` is shaped like
        the per-element loss, ``hidden.shape[:-1]``.
    axis_name: the name of a ``jax.shard_map`` mesh axis that splits the kernel's V axis (vocabulary-parallel
        LM head), or None. Inside the ``shard_map``, ``kernel`` is this shard's columns (H, V_local),
        ``bias``, ``weight``, ``class_mask`` and a probability ``target`` are this shard's slices (equal slices
        in the axis's order), ``hidden``, integer labels (global, in [0, V_local·shards)), ``sample_weight``
        and ``denominator`` are replicated over the axis. Every option uses the global class count. The loss
        is the unsharded one on every shard; the gradient with respect to ``kernel``/``bias``/``weight`` is
        this shard's columns of the unsharded one, and the gradient with respect to ``hidden`` is the full
        gradient on every shard: it is already summed over the axis inside the backward pass, so do not
        reduce it over the axis again. Never more than one chunk of this shard's logits is held.
    chunk_size: rows per chunk. None picks ``max(1, {CHUNK_ELEMENTS} // V)`` rows (about 2**22 logits, 16 MiB
        in float32, per chunk), at most N; an explicit positive int wins. A chunk that does not divide N
        leaves a smaller last chunk.

Returns:
    The loss in the inputs' common dtype: shaped like ``hidden.shape[:-1]`` for ``reduction="none"``, else a
    scalar.

Works under ``jax.jit``, ``jax.vmap``, ``jax.grad`` / ``jax.value_and_grad`` with respect to ``hidden``,
``kernel`` and ``bias`` (and ``weight``, ``sample_weight`` and probability targets). Each chunk's logits are
computed in float32 (float64 for float64 inputs), the gradient's matmuls run in the inputs' dtype with the
same accumulation. For ``"sum"``/``"mean"`` the gradients are computed in the same sweep as the loss (the
logits of each chunk are computed once); for ``"none"`` the backward pass recomputes each chunk's logits,
so any upstream gradient works. Residuals are O(N·H + H·V + N), never O(N·V) (probability targets are
themselves (N, V)).

With ``axis_name``, a kernel replicated over the axis, a hidden or integer target that varies over it (under
``check_vma=True``), and an axis the enclosing ``shard_map`` does not bind raise ``ValueError``.

Bad shapes (a kernel that is not (H, V) for hidden's H, a bias, weight, class_mask or sample_weight of the
wrong shape) and a bad ``chunk_size`` raise ``ValueError``; values are checked as in :func:`lsx.jax.loss`.

Example:
    >>> import jax.numpy as jnp, lsx.jax
    >>> h = jnp.array([[1.0, 0.5], [0.0, -1.0], [2.0, 0.3]])
    >>> k = jnp.array([[0.2, -0.4, 0.1], [0.7, 0.0, -0.3]])
    >>> y = jnp.array([2, 1, 0])
    >>> bool(jnp.allclose(lsx.jax.linear_loss(h, k, y, label_smoothing=0.1), lsx.jax.loss(h @ k, y, label_smoothing=0.1)))
    True

The loss itself:

{spec.LOSS_DOC}"""
