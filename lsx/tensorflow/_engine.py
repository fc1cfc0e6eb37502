"""The traced part of :mod:`lsx.tensorflow`: the reduced loss on (N, K) logits with a closed-form gradient.

The engine computes only row statistics relative to the row maximum m (log Σ exp(x − m), x_y − m,
Σ w_c (x_c − m), or for probabilities A = Σ w q, B = Σ w q (x − m), Σ w xlogx(q)); the loss and the
gradient's row coefficient come from :func:`lsx.spec.label_row` / :func:`lsx.spec.probability_row`, the
reduction from :func:`lsx.spec.reduce_total` and :func:`lsx.spec.reduction_scale`.

exp is the costly op on CPU: the forward pass takes it once and keeps exp(x − m) for the backward pass, where
the gradient ``coef · exp(x − m) / Σ exp(x − m) − w∘q`` is written over that buffer (in place under XLA).

Nothing here looks at values on the host: labels outside [0, K), labels on a masked class, probability mass
on a masked class and (traced) invalid weights make the affected loss and gradient NaN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from lsx import spec

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True)
class Plan:
    """Static facts about one call: what the options and the concrete class mask make of it."""

    kind: str  # "index" or "probs"
    options: spec.Options
    num_classes: int
    mask: np.ndarray | None  # concrete boolean (K,), or None
    compute: tf.DType  # accumulation dtype
    check_weight: bool  # the weight's values are unknown (traced): invalid ones give NaN
    check_target_mask: bool  # probability targets whose values are unknown, with a class mask
    softcap: float | None = None  # the logits become c·tanh(x/c) first


def _where_for(dtype: tf.DType):
    """``where`` for the spec's row algebra: Python numbers become tensors of the compute dtype."""

    def where(condition, x, y):
        return tf.where(condition, tf.cast(x, dtype), tf.cast(y, dtype))

    return where


def labels(target: tf.Tensor, plan: Plan) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """(active, label in [0, K), bad) for integer labels of any dtype, compared in int64 (nothing wraps).

    A uint64 label above 2**63 − 1 is out of range (never read as a negative number, so never ignored).
    """
    k = plan.num_classes
    ignore_index = plan.options.ignore_index
    too_big = None
    if target.dtype == tf.uint64:
        too_big = target > tf.constant(_INT64_MAX, tf.uint64)
    y = tf.cast(target, tf.int64)
    active = tf.ones_like(y, tf.bool) if ignore_index is None else y != tf.constant(ignore_index, tf.int64)
    out_of_range = (y < 0) | (y >= k)
    if too_big is not None:
        active |= too_big
        out_of_range |= too_big
    bad = active & out_of_range
    if plan.mask is not None:
        on_masked = ~tf.gather(tf.constant(plan.mask), tf.clip_by_value(y, 0, k - 1))
        bad |= active & on_masked
    label = tf.where(active & ~bad, y, tf.zeros_like(y))
    return active, label, bad


def reduced_loss(
    x2: tf.Tensor,
    t2: tf.Tensor,
    plan: Plan,
    weight: Any,
    *,
    weight_is_input: bool,
    sample_weight: tf.Tensor | None = None,
    denominator: tf.Tensor | None = None,
) -> tf.Tensor:
    """The loss (per element for ``reduction="none"``, else a scalar) in the compute dtype.

    ``x2``: (N, K) logits; ``t2``: (N,) labels or (N, K) probabilities; ``weight``: None or a (K,) tensor in
    the compute dtype, differentiated (its gradient returned alongside the logits') when ``weight_is_input``;
    ``sample_weight``: None or (N,) per-element weights and ``denominator``: None or a 0-d caller's mean
    denominator, both in the compute dtype and both differentiated.
    """
    opts = plan.options
    compute = plan.compute
    where = _where_for(compute)
    k = plan.num_classes
    mask_t = None if plan.mask is None else tf.constant(plan.mask)
    valid_count = k if plan.mask is None else int(plan.mask.sum())
    nan = tf.constant(np.nan, compute)

    if plan.kind == "index":
        active, y, bad = labels(t2, plan)
        target_probs = None
    else:
        active = y = None
        target_probs = tf.cast(t2, compute)
        bad = None
        if plan.check_target_mask:  # traced probabilities: mass on a masked class is NaN for that element
            bad = tf.reduce_any(tf.logical_and(~mask_t, target_probs != 0), axis=-1)

    def effective_weight(w):
        """Class weights with masked classes at 0; None when every class weighs 1."""
        if w is None:
            return None if mask_t is None else tf.cast(mask_t, compute)
        return w if mask_t is None else tf.where(mask_t, w, tf.zeros_like(w))

    def forward(logits, w, sw, d, probs):
        x = tf.cast(logits, compute)
        tanh = None
        if plan.softcap is not None:  # c·tanh(x/c) before anything else: ±inf become ±c
            tanh = tf.tanh(x / plan.softcap)
            x = plan.softcap * tanh
        w_eff = effective_weight(w)
        x_soft = x if mask_t is None else tf.where(mask_t, x, tf.constant(-np.inf, compute))
        row_max = tf.reduce_max(x_soft, axis=-1)
        positive_inf = row_max == np.inf  # a +inf logit: the row's L, loss and gradient are NaN
        row_max = tf.where(tf.math.is_finite(row_max), row_max, tf.zeros_like(row_max))
        shifted_exp = tf.exp(x_soft - row_max[:, None])
        sum_exp = tf.reduce_sum(shifted_exp, axis=-1)
        sum_exp = tf.where(positive_inf, nan, sum_exp)
        log_sum_exp = tf.math.log(sum_exp)
        total_weight = float(valid_count) if w is None else tf.reduce_sum(w_eff)
        rows = spec.RowCoefficients.of(opts, valid_count, total_weight)
        a, b = rows.a, rows.b

        if plan.kind == "index":
            w_y = tf.ones_like(log_sum_exp) if w_eff is None else tf.gather(w_eff, y)
            x_y = tf.gather(x, y, batch_dims=1) - row_max
            if w is not None:  # a class with weight 0 contributes nothing, even against x_y = −inf
                x_y = tf.where(w_y != 0, x_y, tf.zeros_like(x_y))
            weighted_sum = 0.0
            if b != 0 and rows.empty_target:  # q_y = 0: the target's logit stays out, even at −inf
                others = tf.range(k, dtype=y.dtype)[None, :] != y[:, None]
                kept = others if w_eff is None else others & (w_eff != 0)
                terms = x - row_max[:, None] if w_eff is None else (x - row_max[:, None]) * w_eff
                weighted_sum = tf.reduce_sum(tf.where(kept, terms, tf.zeros_like(terms)), axis=-1)
            elif b != 0:
                shifted = x - row_max[:, None]
                if w_eff is None:  # Σ (x_c − m) as Σ x_c − K·m: independent of the max, one pass with it
                    weighted_sum = tf.reduce_sum(x, axis=-1) - k * row_max
                else:
                    weighted_sum = tf.reduce_sum(tf.where(w_eff != 0, shifted, 0) * w_eff, axis=-1)
            per_element, coef = spec.label_row(
                rows,
                log_sum_exp=log_sum_exp,
                row_max=row_max,
                w_y=w_y,
                x_y=x_y,
                weighted_sum=weighted_sum,
                where=where,
                log=tf.math.log,
                target_excluded=rows.empty_target,
            )
            per_element = tf.where(active, per_element, tf.zeros_like(per_element))
            per_element = tf.where(bad, nan, per_element)
            wq = None
            counted = tf.where(active, w_y, tf.zeros_like(w_y))  # each element's share of the local D
            local = tf.reduce_sum(counted if sw is None else counted * sw)
        else:
            q = a * tf.cast(probs, compute) + b
            if mask_t is not None:
                q = tf.where(mask_t, q, tf.zeros_like(q))
            wq = q if w is None else q * w_eff
            contributes = wq != 0  # NaN counts (NaN loss), a negative q counts linearly
            zero = tf.zeros_like(wq)
            weighted_xlogx = None
            if opts.normalize:
                xlogx = spec.xlogx(q, where=where, log=tf.math.log)
                weighted_xlogx = tf.reduce_sum(tf.where(contributes, xlogx if w is None else w_eff * xlogx, zero), -1)
            per_element, coef = spec.probability_row(
                rows,
                log_sum_exp=log_sum_exp,
                row_max=row_max,
                target_mass=tf.reduce_sum(wq, axis=-1),
                weighted_sum=tf.reduce_sum(tf.where(contributes, wq * (x - row_max[:, None]), zero), axis=-1),
                weighted_xlogx=weighted_xlogx,
            )
            if bad is not None:
                per_element = tf.where(bad, nan, per_element)
            counted = None
            local = tf.cast(tf.shape(x)[0], compute) if sw is None else tf.reduce_sum(sw)
        if plan.check_weight:  # a traced weight with a negative or non-finite entry: NaN, never a number
            invalid = tf.reduce_any(~(w >= 0) | ~tf.math.is_finite(w))
            per_element = tf.where(invalid, nan, per_element)

        unweighted = per_element
        if sw is not None:
            per_element = per_element * sw
        denominator = local if d is None else d
        if opts.reduction == "none":
            value = per_element
        else:
            value = spec.reduce_total(
                opts.reduction, tf.reduce_sum(per_element), denominator, opts.empty_mean, where=where
            )
        saved = dict(
            x=x,
            w_eff=w_eff,
            row_max=row_max,
            shifted_exp=shifted_exp,
            sum_exp=sum_exp,
            log_sum_exp=log_sum_exp,
            coef=coef,
            a=a,
            b=b,
            wq=wq,
            q=None if plan.kind == "index" else q,
            denominator=denominator,
            value=value,
            per_element=per_element,
            unweighted=unweighted,
            counted=counted,
            tanh=tanh,
            empty_target=rows.empty_target,
        )
        return value, saved

    def row_scale(upstream, saved):
        """Per-row factor: the upstream gradient times the reduction's (0 on ignored rows, NaN on bad ones),
        without the sample weight."""
        scale = tf.cast(upstream, compute)
        if opts.reduction != "none":
            scale = scale * spec.reduction_scale(opts.reduction, saved["denominator"], where=where)
            scale = tf.broadcast_to(scale, tf.shape(saved["sum_exp"]))
        if active is not None:
            scale = tf.where(active, scale, tf.zeros_like(scale))
        if bad is not None:
            scale = tf.where(bad, nan, scale)
        return scale

    def logits_grad(scale, saved):
        a, b, w_eff = saved["a"], saved["b"], saved["w_eff"]
        # softmax = shifted_exp / sum_exp, folded into the per-row factor
        g = saved["shifted_exp"] * (saved["coef"] * scale / saved["sum_exp"])[:, None]
        if plan.kind == "index":
            if b != 0:
                g -= (b * scale)[:, None] if w_eff is None else (b * scale)[:, None] * w_eff
            if a != 0:
                w_y = 1.0 if w_eff is None else tf.gather(w_eff, y)
                hit = tf.range(k, dtype=tf.int32)[None, :] == tf.cast(y, tf.int32)[:, None]
                g -= tf.where(hit, (a * scale * w_y)[:, None], tf.zeros_like(g))
            g = tf.where(active[:, None], g, tf.zeros_like(g))
        else:
            g -= saved["wq"] * scale[:, None]
        if mask_t is not None:
            g = tf.where(mask_t, g, tf.zeros_like(g))
        if saved["tanh"] is not None:  # the chain rule through c·tanh(x/c)
            g *= 1 - saved["tanh"] * saved["tanh"]
        return g

    def target_grad(scale, saved, probs):
        """∂value/∂t_c = scale_i·a·w_c·[(L − x_c) + normalize·(log q_c + 1)] for probability targets: linear in
        q_c (so also where q_c = 0 against a finite logit); nothing where w_c·q_c = 0 against x_c = −inf; NaN
        where the element's loss is NaN."""
        a = saved["a"]
        if isinstance(a, float) and a == 0:
            return tf.zeros_like(probs)
        x, q, wq = saved["x"], saved["q"], saved["wq"]
        lse = (saved["row_max"] + saved["log_sum_exp"])[:, None]
        contributes = wq != 0
        w_or_1 = 1.0 if saved["w_eff"] is None else saved["w_eff"]
        zero = tf.zeros_like(wq)
        per_q = tf.where(contributes | (x > -np.inf), w_or_1 * (lse - x), zero)
        if opts.normalize:
            safe_q = tf.where(contributes, q, tf.ones_like(q))
            per_q += tf.where(contributes, w_or_1 * (tf.math.log(safe_q) + 1), zero)
        bar = (scale * a)[:, None] * per_q
        bar = tf.where(tf.math.is_nan(saved["coef"])[:, None], nan, bar)
        if mask_t is not None:
            bar = tf.where(mask_t, bar, zero)
        if bad is not None:
            bar = tf.where(bad[:, None], nan, bar)
        return tf.cast(bar, probs.dtype)

    def sample_weight_grad(scale, saved):
        """∂value/∂sw_i = scale_i·(ℓ_i − [local mean]·mean·w_{y_i}), ℓ_i the unweighted per-element loss."""
        out = scale * saved["unweighted"]
        if opts.reduction == "mean" and denominator is None:  # the local D = Σ sw·w_y (Σ sw) moves with sw
            d, value = saved["denominator"], saved["value"]
            mean = tf.where(d != 0, value, tf.zeros_like(value))
            out -= scale * mean * (1.0 if saved["counted"] is None else saved["counted"])
        return out

    def denominator_grad(upstream, saved):
        """∂(Σ loss / d)/∂d = −mean/d (0 where d = 0, as the rest of an empty mean's gradient)."""
        d, value = saved["denominator"], saved["value"]
        safe = tf.where(d != 0, d, tf.ones_like(d))
        return tf.where(d != 0, -tf.cast(upstream, compute) * value / safe, tf.zeros_like(d))

    def weight_grad(scale, saved):
        """∂value/∂w_c: Σ_i scale_i ∂loss_i/∂w_c, and for the mean with labels the denominator's share."""
        x, a, b = saved["x"], saved["a"], saved["b"]
        row_max, log_sum_exp = saved["row_max"], saved["log_sum_exp"]
        if plan.kind == "index":
            if saved["empty_target"]:
                # q_y = 0: a·(L − x_y) cancels the target column's b·(L − x_y) exactly, so x_y (maybe −inf) is
                # never read: the column keeps −b·L here and is left out of the Σ scale·x below
                on_label = -spec.scaled(b, log_sum_exp, where=where)
            else:
                x_y = tf.gather(x, y, batch_dims=1) - row_max
                on_label = spec.scaled(a, log_sum_exp - x_y, where=where)
            if opts.z_loss != 0:
                lse = row_max + log_sum_exp
                on_label = on_label + opts.z_loss * lse * lse
            if opts.normalize:
                on_label = on_label + (spec.xlogx(a + b) - spec.xlogx(b))
            if opts.reduction == "mean" and denominator is None:
                # the local D = Σ sw·w_y: each counted element takes the mean off w_y's gradient
                d = saved["denominator"]
                on_label = on_label - tf.where(d != 0, saved["value"], tf.zeros_like(saved["value"]))
            on_label = tf.where(active, scale * on_label, tf.zeros_like(on_label))
            if bad is not None:
                on_label = tf.where(bad, nan, on_label)
            bar = tf.math.unsorted_segment_sum(on_label, y, k)
            if b != 0:
                counted = active[:, None]
                if saved["empty_target"]:
                    counted = counted & (tf.range(k, dtype=y.dtype)[None, :] != y[:, None])
                shifted = tf.where(counted, x - row_max[:, None], tf.zeros_like(x))
                bar += b * (tf.reduce_sum(scale * log_sum_exp) - tf.linalg.matvec(shifted, scale, transpose_a=True))
            if opts.normalize:
                bar += tf.reduce_sum(scale) * spec.xlogx(b)
        else:
            q = saved["q"]
            nonzero = q != 0
            per_class = tf.where(nonzero, q * (log_sum_exp[:, None] - (x - row_max[:, None])), tf.zeros_like(q))
            if opts.normalize:
                per_class += tf.where(nonzero, spec.xlogx(q, where=where, log=tf.math.log), tf.zeros_like(q))
            bar = tf.linalg.matvec(per_class, scale, transpose_a=True)
        if mask_t is not None:
            bar = tf.where(mask_t, bar, tf.zeros_like(bar))
        return bar

    weight_input = weight is not None and weight_is_input
    inputs = [x2]
    if weight_input:
        inputs.append(weight)
    if sample_weight is not None:
        inputs.append(sample_weight)
    if denominator is not None:
        inputs.append(denominator)
    target_input = plan.kind == "probs"  # probability targets get their gradient too
    if target_input:
        inputs.append(t2)

    @tf.custom_gradient
    def differentiated(logits, *extras):
        extras = list(extras)
        w = extras.pop(0) if weight_input else weight
        sw = extras.pop(0) if sample_weight is not None else None
        d = extras.pop(0) if denominator is not None else None
        probs = extras.pop(0) if target_input else None
        # traced values cannot be checked: a negative or non-finite one makes the result NaN (its element's for
        # sample_weight, everything for the denominator), loss and gradient alike; checked ones pass unchanged
        if sw is not None:
            sw = tf.where(tf.math.is_finite(sw) & (sw >= 0), sw, nan)
        if d is not None:
            d = tf.where(tf.math.is_finite(d) & (d >= 0), d, nan)
        value, saved = forward(logits, w, sw, d, probs)

        def grad(upstream):
            scale = row_scale(upstream, saved)
            weighted_scale = scale if sw is None else scale * sw
            grads = [tf.cast(logits_grad(weighted_scale, saved), logits.dtype)]
            if weight_input:
                grads.append(weight_grad(weighted_scale, saved))
            if sw is not None:  # a bad traced weight (NaN by now) has a NaN derivative too
                grads.append(tf.where(tf.math.is_nan(sw), nan, sample_weight_grad(scale, saved)))
            if d is not None:
                grads.append(denominator_grad(upstream, saved))
            if probs is not None:
                grads.append(target_grad(weighted_scale, saved, probs))
            return tuple(grads)

        return value, grad

    return differentiated(*inputs)
