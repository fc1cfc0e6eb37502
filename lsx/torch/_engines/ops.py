"""The plain-torch engine of :mod:`lsx.torch`: any device, any floating dtype.

Both forms of the engine interface (:mod:`lsx.torch._engines`): the fused single-slice call :func:`run`, and the
two steps :func:`statistics` / :func:`gradient` over a slice of the class axis.

:func:`run` reduces each row of logits to the statistics of :mod:`lsx.spec`'s per-row algebra, taken relative to the
row maximum m (log Σ exp(x − m), x_y − m, Σ w_c (x_c − m); for probabilities Σ w q, Σ w q (x − m) and
Σ w·xlogx(q)), gets the per-element loss and the gradient's row coefficient from ``spec.label_row`` /
``spec.probability_row``, and writes the gradient ``(coef · p − w∘q) · reduction_scale`` into the caller's
buffer. Everything stays on the logits' device as tensors: no ``.item()``, no host synchronisation, no
CPU-only call, so the same code serves CPU, CUDA and meta tensors. float16/bfloat16 accumulate in float32,
in row chunks that bound the float32 temporaries.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lsx import spec

__all__ = ["CHUNK_ELEMENTS", "gradient", "reduce", "run", "statistics"]

#: float16/bfloat16 logits are processed in row chunks of about this many elements, to bound the float32
#: temporaries (smaller chunks only add per-op overhead: measured slower on CPU too).
CHUNK_ELEMENTS = 1 << 24

_INT64_MAX = 2**63 - 1


def _labels_as_int64(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Integer labels of any dtype as int64 and, for uint64, where they exceed the int64 range.

    Every comparison then happens on the caller's values in int64 (``ignore_index``, K and K − 1 never meet
    a narrow dtype, where they would wrap). uint64 labels above 2**63 − 1 read as negative int64 numbers
    through the view; they are flagged instead of matching a negative ``ignore_index``.
    """
    if labels.dtype == torch.int64:
        return labels, None
    if labels.dtype == torch.uint64:
        as_int64 = labels.view(torch.int64)
        return as_int64, as_int64 < 0
    return labels.to(torch.int64), None


def run(
    x2: torch.Tensor,
    t2: torch.Tensor,
    kind: str,
    opts: spec.Options,
    weight: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    grad: torch.Tensor,
    sample_weight: torch.Tensor | None = None,
    denominator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Any]:
    """Fill ``grad`` (N, K) with the gradient of the reduced loss; return the per-element loss (N,) in the
    compute dtype, unweighted by ``sample_weight``, and the mean's denominator (a 0-d tensor on the logits'
    device).

    ``opts.softcap`` replaces the logits by c·tanh(x/c) (in the compute dtype, chunk by chunk) and multiplies
    the gradient by 1 − tanh²(x/c). ``sample_weight`` ((N,) or None) multiplies each row's gradient and
    enters the mean's denominator Σ sample_weight·w_y; ``denominator`` (a 0-d tensor, or None) replaces it.

    Labels are not checked here (the caller does that on the CPU): an out-of-range label, or one on a class
    that ``class_mask`` removes, gives NaN for its element's loss and gradient row; so does probability mass
    on a removed class.
    """
    n, k = x2.shape
    device = x2.device
    compute = torch.float64 if x2.dtype == torch.float64 else torch.float32
    x2 = x2.detach()
    mask = None if class_mask is None else class_mask.to(device=device, dtype=torch.bool)
    # the number of valid classes stays a tensor with class_mask: reading it would synchronise the device
    valid_count: Any = k if mask is None else mask.sum().to(compute)
    w = None if weight is None else weight.detach().to(device=device, dtype=compute)
    if w is not None and mask is not None:
        w = w.masked_fill(~mask, 0)
    total_weight = valid_count if w is None else w.sum()
    coefficients = spec.RowCoefficients.of(opts, valid_count, total_weight)
    smoothing = opts.label_smoothing != 0  # b = 0 exactly when ε = 0
    sw = None if sample_weight is None else sample_weight.detach().to(device=device, dtype=compute).reshape(n)

    # classes that enter Σ_c w_c (x_c − m): valid and with w_c ≠ 0 (no 0·(−∞) from a removed class)
    linear = None
    if smoothing and (mask is not None or w is not None):
        linear = torch.ones(k, dtype=torch.bool, device=device) if mask is None else mask
        if w is not None:
            linear = linear & (w != 0)

    if kind == "index":
        labels, too_big = _labels_as_int64(t2.detach().to(device))
        if opts.ignore_index is None:
            active = torch.ones(n, dtype=torch.bool, device=device)
        else:
            active = labels != opts.ignore_index
        if too_big is not None:
            active = active | too_big
        invalid = (labels < 0) | (labels >= k)
        if too_big is not None:
            invalid = invalid | too_big
        y = torch.where(active & ~invalid, labels, torch.zeros_like(labels))
        if mask is not None:
            invalid = invalid | ~mask[y]
        invalid = invalid & active
        w_y = torch.ones(n, dtype=compute, device=device) if w is None else w[y]
        w_y = torch.where(active, w_y, torch.zeros_like(w_y))
        local = w_y if sw is None else w_y * sw
        local_denominator: Any = local.sum()
        # the w∘q part of the gradient: b·w on every valid class, a·w_y on the target
        b_row = None
        if smoothing:
            b_row = coefficients.b * (torch.ones(k, dtype=compute, device=device) if w is None else w)
            if mask is not None:
                b_row = b_row.masked_fill(~mask, 0)
        target = None
    else:
        active = None
        invalid = None
        w_y = None
        local_denominator = torch.full((), n, dtype=compute, device=device) if sw is None else sw.sum()
        target = t2.detach().to(device)
        if mask is not None:  # mass on a removed class (the CPU raises for it before getting here)
            invalid = (target.to(compute).masked_fill(mask, 0) != 0).any(dim=1)
    if denominator is None:
        denominator = local_denominator
    else:
        denominator = denominator.detach().to(device=device, dtype=compute)
    scale = spec.reduction_scale(opts.reduction, denominator, where=torch.where)
    softcap = opts.softcap

    per_element = torch.empty(n, dtype=compute, device=device)
    rows = max(1, CHUNK_ELEMENTS // max(k, 1)) if compute != x2.dtype else max(n, 1)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        x = x2[start:stop].to(compute)
        g = grad[start:stop] if compute == x2.dtype else torch.empty(x.shape, dtype=compute, device=device)
        chain = None
        if softcap is not None:  # x' = c·tanh(x/c) (±inf become ±c); the gradient gains 1 − tanh²(x/c)
            tanh = torch.tanh(x / softcap)
            x = tanh * softcap
            chain = tanh.mul_(tanh).neg_().add_(1.0)
        x_soft = x if mask is None else x.masked_fill(~mask, -math.inf)
        raw_max = x_soft.amax(dim=1, keepdim=True)
        finite = torch.isfinite(raw_max)
        row_max = torch.where(finite, raw_max, torch.zeros_like(raw_max))
        torch.sub(x_soft, row_max, out=g)
        g.exp_()
        # a +inf logit on a valid class makes its element's loss and gradient row NaN (as the reference and
        # F.cross_entropy): its Σ exp is NaN, and so are L and every p_c = exp(x_c − m) / Σ exp
        sum_exp = torch.where(raw_max.squeeze(1) == math.inf, math.nan, g.sum(dim=1))
        log_sum_exp = sum_exp.log()
        m = row_max.squeeze(1)
        if kind == "index":
            yc = y[start:stop].unsqueeze(1)
            wy = w_y[start:stop]
            weighted_sum: Any = 0.0
            if smoothing:
                shifted = x - row_max
                if linear is not None:
                    shifted = shifted.masked_fill(~linear, 0)
                if coefficients.empty_target:  # q_y = 0: the target's logit stays out, even at −inf
                    shifted = shifted.scatter(1, yc, 0.0)
                weighted_sum = shifted.sum(dim=1) if w is None else shifted @ w
            loss, coef = spec.label_row(
                coefficients,
                log_sum_exp=log_sum_exp,
                row_max=m,
                w_y=wy,
                x_y=x.gather(1, yc).squeeze(1) - m,
                weighted_sum=weighted_sum,
                where=torch.where,
                log=torch.log,
                target_excluded=coefficients.empty_target,
            )
        else:
            q = coefficients.a * target[start:stop].to(compute) + coefficients.b
            if mask is not None:
                q = q.masked_fill(~mask, 0)
            wq = q if w is None else q * w
            # a class contributes wherever w_c·q_c ≠ 0, linearly (NaN spreads, negative mass counts)
            contributes = wq != 0
            shifted = torch.where(contributes, x - row_max, torch.zeros_like(x))
            weighted_xlogx = None
            if opts.normalize:
                h = spec.xlogx(q, where=torch.where, log=torch.log)
                h = h if w is None else h * w
                weighted_xlogx = torch.where(contributes, h, torch.zeros_like(h)).sum(dim=1)
            loss, coef = spec.probability_row(
                coefficients,
                log_sum_exp=log_sum_exp,
                row_max=m,
                target_mass=wq.sum(dim=1),
                weighted_sum=(wq * shifted).sum(dim=1),
                weighted_xlogx=weighted_xlogx,
            )
        # gradient = (coef · p − w∘q) · scale, each row's scale 0 when it is ignored
        row_scale = torch.full_like(m, scale) if isinstance(scale, float) else scale.expand_as(m)
        if active is not None:
            row_scale = torch.where(active[start:stop], row_scale, torch.zeros_like(row_scale))
        if sw is not None:
            row_scale = row_scale * sw[start:stop]
        g.mul_((coef * row_scale / sum_exp).unsqueeze(1))
        if kind == "index":
            if b_row is not None:
                g.addcmul_(row_scale.unsqueeze(1), b_row.unsqueeze(0), value=-1)
            if isinstance(coefficients.a, torch.Tensor) or coefficients.a != 0:  # (a tensor: never read)
                g.scatter_add_(1, yc, (-coefficients.a * wy * row_scale).unsqueeze(1))
        else:
            g.addcmul_(row_scale.unsqueeze(1), wq, value=-1)
        if active is not None:
            act = active[start:stop]
            g.masked_fill_(~act.unsqueeze(1), 0)
            loss = torch.where(act, loss, torch.zeros_like(loss))
        if invalid is not None:
            bad = invalid[start:stop]
            g.masked_fill_(bad.unsqueeze(1), math.nan)
            loss = loss.masked_fill(bad, math.nan)
        if chain is not None:
            g.mul_(chain)
        if mask is not None:
            g.masked_fill_(~mask, 0)
        per_element[start:stop] = loss
        if g.data_ptr() != grad[start:stop].data_ptr():
            grad[start:stop] = g
    return per_element, denominator


def reduce(
    per_element: torch.Tensor, denominator: torch.Tensor, opts: spec.Options, dtype: torch.dtype
) -> torch.Tensor:
    """The loss in ``dtype``: per element, summed, or the mean (``spec.reduce_total``)."""
    if opts.reduction == "none":
        return per_element.to(dtype)
    total = spec.reduce_total(opts.reduction, per_element.sum(), denominator, opts.empty_mean, where=torch.where)
    return total.to(dtype)



# --------------------------------------------------------------------------------------------------------
# The two steps: statistics of a class slice, then the gradient from the merged statistics
# --------------------------------------------------------------------------------------------------------
def _capped(x: torch.Tensor, softcap: float | None, chain: bool) -> tuple[torch.Tensor, Any]:
    """(c·tanh(x/c), 1 − tanh²(x/c) or None) for ``softcap=c``; (x, None) without."""
    if softcap is None:
        return x, None
    tanh = torch.tanh(x / softcap)
    factor = (1.0 - tanh * tanh) if chain else None
    return tanh * softcap, factor


def _owned(labels, k, offset, num_classes, ignore_index):
    """(active, valid id, this block owns the target, the target's local index (0 where not owned))."""
    active = labels != ignore_index if ignore_index is not None else torch.ones_like(labels, dtype=torch.bool)
    valid_id = (labels >= 0) & (labels < num_classes)
    local = labels - offset
    owns = active & valid_id & (local >= 0) & (local < k)
    return active, valid_id, owns, torch.where(owns, local, torch.zeros_like(local))


def statistics(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    class_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    a: Any = 1.0,
    b: Any = 0.0,
    smoothing: bool = False,
    normalize: bool = False,
    offset: int = 0,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    exclude_target: bool = False,
) -> None:
    """The six statistics per row of the block ``x`` into ``out`` (6, n) (the contract of
    :mod:`lsx.torch._engines`), with torch ops on ``x``'s device (no host read)."""
    n, k = x.shape
    device = x.device
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    num_classes = k if num_classes is None else num_classes
    x, _ = _capped(x.to(compute), softcap, False)
    mask = class_mask
    w = None if weight is None else weight.to(device=device, dtype=compute)
    if w is not None and mask is not None:
        w = w.masked_fill(~mask, 0)
    zeros = torch.zeros(n, dtype=compute, device=device)
    x_soft = x if mask is None else x.masked_fill(~mask, -math.inf)
    raw_max = x_soft.amax(dim=1) if k else torch.full((n,), -math.inf, dtype=compute, device=device)
    local_max = torch.where(torch.isfinite(raw_max), raw_max, 0.0)
    sum_exp = torch.exp(x_soft - local_max.unsqueeze(1)).sum(dim=1)
    del x_soft
    if probs is None:
        _, _, owns, y_local = _owned(labels, k, offset, num_classes, ignore_index)
        x_y = w_y = owned = zeros
        if k:
            x_y = torch.where(owns, x.gather(1, y_local.unsqueeze(1)).squeeze(1) - local_max, 0.0)
            w_y = owns.to(compute) if w is None else torch.where(owns, w[y_local], 0.0)
            owned = owns.to(compute)
            if mask is not None:  # a label on a masked class: flagged (2), its x_y NaN
                on_masked = owns & ~mask[y_local]
                x_y = torch.where(on_masked, math.nan, x_y)
                owned = torch.where(on_masked, 2.0, owned)
        weighted_sum = zeros
        if smoothing and k:
            linear = None  # the classes with w_c ≠ 0 among the valid ones
            if mask is not None or w is not None:
                linear = torch.ones(k, dtype=torch.bool, device=device) if mask is None else mask
                if w is not None:
                    linear = linear & (w != 0)
            shifted = x - local_max.unsqueeze(1)
            if linear is not None:
                shifted = shifted.masked_fill(~linear, 0)
            if exclude_target:  # a massless target (q_y = 0): left out where owned, even at x_y = −inf
                at_target = torch.zeros((n, k), dtype=torch.bool, device=device)
                at_target.scatter_(1, y_local.unsqueeze(1), owns.unsqueeze(1))
                shifted = shifted.masked_fill(at_target, 0)
            weighted_sum = shifted.sum(dim=1) if w is None else shifted @ w
        columns = [raw_max, sum_exp, x_y, w_y, weighted_sum, owned]
    else:
        t = probs.to(device=device, dtype=compute)
        q = a * t + b
        if mask is not None:
            q = q.masked_fill(~mask, 0)
        wq = q if w is None else q * w
        contributes = wq != 0
        entropy = zeros
        if normalize:
            h = spec.xlogx(q, where=torch.where, log=torch.log)
            h = h if w is None else h * w
            entropy = torch.where(contributes, h, torch.zeros_like(h)).sum(dim=1)
        shifted = x - local_max.unsqueeze(1)
        weighted = torch.where(contributes, wq * shifted, torch.zeros_like(x)).sum(dim=1)
        masked_mass = zeros if mask is None else (t.masked_fill(mask, 0) != 0).any(dim=1).to(compute)
        columns = [raw_max, sum_exp, wq.sum(dim=1), weighted, entropy, masked_mass]
    out.copy_(torch.stack(columns))


def gradient(
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    local_max: torch.Tensor,
    p_scale: torch.Tensor,
    row_scale: torch.Tensor,
    labels: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    class_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    a: Any = 1.0,
    b: Any = 0.0,
    smoothing: bool = False,
    offset: int = 0,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    nan_rows: torch.Tensor | None = None,
) -> None:
    """The block's gradient from the merged per-row factors into ``grad`` (may be ``x`` itself), the
    contract of :mod:`lsx.torch._engines`, with torch ops on ``x``'s device (no host read)."""
    n, k = x.shape
    device = x.device
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    num_classes = k if num_classes is None else num_classes
    x, chain = _capped(x.to(compute), softcap, True)
    mask = class_mask
    w = None if weight is None else weight.to(device=device, dtype=compute)
    if w is not None and mask is not None:
        w = w.masked_fill(~mask, 0)
    x_soft = x if mask is None else x.masked_fill(~mask, -math.inf)
    g = torch.exp(x_soft - local_max.to(compute).unsqueeze(1))
    del x_soft, x
    g.mul_(p_scale.to(compute).unsqueeze(1))
    rs = row_scale.to(compute)
    bad = None if nan_rows is None else nan_rows
    if probs is None:
        active, valid_id, owns, y_local = _owned(labels, k, offset, num_classes, ignore_index)
        if smoothing and k:
            b_row = b * (torch.ones(k, dtype=compute, device=device) if w is None else w)
            if mask is not None:
                b_row = b_row.masked_fill(~mask, 0)
            g.addcmul_(rs.unsqueeze(1), b_row.unsqueeze(0), value=-1)
        if k and (isinstance(a, torch.Tensor) or a != 0):
            w_y = torch.ones(n, dtype=compute, device=device) if w is None else w[y_local]
            g.scatter_add_(1, y_local.unsqueeze(1), torch.where(owns, -a * w_y * rs, 0.0).unsqueeze(1))
        invalid = active & ~valid_id
        if mask is not None and k:
            invalid = invalid | (owns & ~mask[y_local])
        bad = invalid if bad is None else bad | invalid
        g.masked_fill_(~active.unsqueeze(1), 0)
    else:
        t = probs.to(device=device, dtype=compute)
        q = a * t + b
        if mask is not None:
            q = q.masked_fill(~mask, 0)
            masked_mass = (t.masked_fill(mask, 0) != 0).any(dim=1)
            bad = masked_mass if bad is None else bad | masked_mass
        g.addcmul_(rs.unsqueeze(1), q if w is None else q * w, value=-1)
    if bad is not None:
        g.masked_fill_(bad.unsqueeze(1), math.nan)
    if mask is not None:
        g.masked_fill_(~mask, 0)
    if chain is not None:
        g.mul_(chain)
    grad.copy_(g)
