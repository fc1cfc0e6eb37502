"""The engine interface of :mod:`lsx.torch`: a block of rows of logits in, per-row statistics out; merged
statistics in, the gradient written in place.

Every front door (``loss`` on one device, ``linear_loss``'s chunks of rows, ``process_group=``'s slices of the
class axis) computes the same row algebra (:mod:`lsx.spec`: ``label_row`` / ``probability_row``); they differ
only in how the statistics of the blocks are merged. An engine implements two steps on an (n, k) block ``x``
that holds the classes [offset, offset + k) of ``num_classes``:

``statistics(x, out, *, labels | probs, weight, class_mask, softcap, a, b, smoothing, normalize, offset,
num_classes, ignore_index)``
    writes six statistics per row into ``out`` (6, n), each relative to the block's own row maximum m_r over
    its valid classes (m_r = 0 where that maximum is not finite), on x' = c·tanh(x/c) with ``softcap=c``.
    Labels (global int64 class ids): 0 the raw maximum (−inf without a valid class), 1 Σ exp(x' − m_r),
    2 x'_y − m_r where the block owns the target (NaN on a masked class), 3 w_y there, 4 Σ w_c (x'_c − m_r)
    over the valid classes with w_c ≠ 0 when smoothing (with ``exclude_target``, a target without mass, other
    than the owned target), 5 the ownership flag (0, 1; 2 on a masked class).
    Probabilities (the block's columns of t, q = a·t + b): 0, 1 as above, 2 Σ w q, 3 Σ w q (x' − m_r),
    4 Σ w·xlogx(q) with ``normalize`` (over w q ≠ 0), 5 1 where t puts mass on a masked class.

``gradient(x, grad, *, local_max, p_scale, row_scale, labels | probs, weight, class_mask, softcap, a, b,
smoothing, offset, num_classes, ignore_index, nan_rows)``
    writes ``exp(x' − m_r)·p_scale − row_scale·(w∘q)`` (w∘q = b·w on every valid class plus a·w_y on the
    target, or w·q for probabilities) into ``grad`` (which may be ``x``): 0 on the masked classes, the row 0
    for an ignored label, NaN (on the valid classes) for an invalid label, a masked target and ``nan_rows``,
    times 1 − tanh²(x/c) with a soft cap. ``local_max``, ``p_scale``, ``row_scale`` are (n,) device tensors.

:func:`merge` turns the statistics of P blocks of the same rows (P = 1 on one device) into the per-element
loss and those per-row factors: in block order, with the common maximum m (``spec.merge_max`` /
``spec.reshift``), so every holder of the same statistics gets the same bits. Where the merge is trivial (one
block holds every class), an engine may also offer a fused single call (``run``), as the Numba kernel and the
plain-torch engine do.

Engines (chosen per call by :func:`choose`, or forced with ``LSX_TORCH_ENGINE``, read at every call):

- ``numba`` (:mod:`.numba`): lsx.numpy's Numba kernels on zero-copy NumPy views; CPU float32/float64.
- ``triton`` (:mod:`.triton`): Triton kernels, one program per row; CUDA tensors (float32, float16, bfloat16,
  float64), or CPU tensors in Triton's interpreter when ``TRITON_INTERPRET=1`` was set before lsx.torch
  was imported.
- ``torch`` (:mod:`.ops`): plain torch ops; any device, any floating dtype, no host synchronisation.

``auto`` (the default) takes Numba for CPU float32/float64 logits when Numba is installed, Triton for CUDA
logits when Triton imports, plain torch otherwise; it never takes Triton for CPU tensors. :func:`run` is the
single-device call of an engine that has only the two steps (Triton): statistics, a one-block merge, the
gradient, with the same contract as the plain-torch engine's fused ``run``.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
from typing import Any

import torch

from lsx import spec
from lsx.torch._engines import ops
from lsx.torch._engines.ops import _labels_as_int64 as labels_as_int64

__all__ = [
    "ENVIRONMENT",
    "check_chunk_size",
    "choose",
    "chunk_logits",
    "engine",
    "finish",
    "gradient",
    "labels_as_int64",
    "merge",
    "rows_per_chunk",
    "run",
    "statistics",
]

#: the environment variable that forces an engine (read at every call)
ENVIRONMENT = "LSX_TORCH_ENGINE"
_NAMES = ("auto", "numba", "torch", "triton")
_NUMBA_DTYPES = (torch.float32, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _numba_available() -> bool:
    from lsx.torch._engines import numba as numba_engine

    return numba_engine.kernel() is not None


@functools.cache
def _triton() -> Any:
    """lsx's Triton engine module, or the reason it does not import (a string)."""
    try:
        from lsx.torch._engines import triton as triton_engine
    except ImportError as error:
        return f"triton does not import ({error}); pip install 'lsx[triton]'"
    return triton_engine


def requested() -> str:
    """The engine ``LSX_TORCH_ENGINE`` asks for (``auto`` when unset or empty)."""
    name = os.environ.get(ENVIRONMENT) or "auto"
    if name not in _NAMES:
        raise ValueError(f"{ENVIRONMENT} must be one of {', '.join(_NAMES)}, got {ENVIRONMENT}={name!r}")
    return name


def choose(x: torch.Tensor, *, strided: bool = True, dtype: torch.dtype | None = None) -> str:
    """The engine for logits ``x``: ``"numba"``, ``"triton"`` or ``"torch"``.

    ``auto``: Numba for CPU float32/float64 logits when Numba is installed (and, unless ``strided``, when ``x``
    is contiguous: a copy would cost more than the plain-torch engine saves), Triton for CUDA logits when
    Triton imports, plain torch otherwise. A forced
    engine that cannot serve ``x`` raises ``RuntimeError`` naming the variable, the engine and why. ``dtype``:
    the dtype the engine will see when it is not ``x``'s (``linear_loss`` computes its logits in float32 for
    float16/bfloat16 inputs).
    """
    dtype = x.dtype if dtype is None else dtype
    name = os.environ.get(ENVIRONMENT)
    if not name or name == "auto":
        device = x.device.type
        if device == "cpu":
            on_cpu = dtype in _NUMBA_DTYPES and (strided or x.is_contiguous())
            return "numba" if on_cpu and _numba_available() else "torch"
        if device == "cuda" and dtype in _TRITON_DTYPES and not isinstance(_triton(), str):
            return "triton"
        return "torch"
    if name == "torch":
        return "torch"
    if name == "triton":
        module = _triton()
        why = None
        if isinstance(module, str):
            why = module
        elif dtype not in _TRITON_DTYPES:
            why = f"it takes float32, float16, bfloat16 or float64 logits, got {dtype}"
        elif x.device.type != "cuda" and not (x.device.type == "cpu" and module.interpreted()):
            why = (
                f"it needs CUDA tensors, got a tensor on {x.device} (CPU tensors run in Triton's interpreter when "
                "TRITON_INTERPRET=1 is set before lsx.torch is imported)"
            )
        if why is not None:
            raise RuntimeError(f"{ENVIRONMENT}=triton cannot serve this call: {why}")
        return "triton"
    if name == "numba":
        why = None
        if x.device.type != "cpu":
            why = f"it runs on CPU tensors only, got a tensor on {x.device}"
        elif dtype not in _NUMBA_DTYPES:
            why = f"it takes float32 or float64 logits, got {dtype}"
        elif not _numba_available():
            why = "numba is not installed (pip install 'lsx[numba]')"
        if why is not None:
            raise RuntimeError(f"{ENVIRONMENT}=numba cannot serve this call: {why}")
        return "numba"
    requested()  # raises for an unknown name
    raise AssertionError(name)


def engine(name: str) -> Any:
    """The module implementing engine ``name`` (its ``statistics`` and ``gradient``)."""
    if name == "numba":
        from lsx.torch._engines import numba as numba_engine

        return numba_engine
    if name == "triton":
        return _triton()
    return ops


# --------------------------------------------------------------------------------------------------------
# Blocks of rows (linear_loss's chunks)
# --------------------------------------------------------------------------------------------------------
#: a chunk of logits holds about this many elements when ``chunk_size`` is None (16 MiB in float32)
CHUNK_ELEMENTS = 1 << 22
#: on CUDA: 512 MiB of float32 logits, so each chunk's matmuls have rows enough to run near the GPU's peak
#: (1024 rows at V = 131072, 524 at V = 256000)
CUDA_CHUNK_ELEMENTS = 1 << 27


def check_chunk_size(chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got chunk_size={chunk_size!r}")
    return int(chunk_size)


def rows_per_chunk(n: int, v: int, chunk_size: int | None, device: Any = None) -> int:
    """Rows per chunk: the caller's, or about CHUNK_ELEMENTS (CUDA_CHUNK_ELEMENTS on a CUDA ``device``) logits
    per chunk, evened out over the chunks."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    elements = CUDA_CHUNK_ELEMENTS if getattr(device, "type", None) == "cuda" else CHUNK_ELEMENTS
    rows = max(1, elements // max(v, 1))
    if n <= rows:
        return max(n, 1)
    chunks = -(-n // rows)
    return -(-n // chunks)


def chunk_logits(h2, wc, bc, start, stop, buffer) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows [start, stop) of ``h2`` in the compute dtype, their logits written into ``buffer``'s rows)."""
    hc = h2[start:stop].to(wc.dtype)
    logits = buffer[: stop - start]
    if bc is None:
        torch.mm(hc, wc.T, out=logits)
    else:
        torch.addmm(bc, hc, wc.T, out=logits)
    return hc, logits


# --------------------------------------------------------------------------------------------------------
# Labels for the two steps, and the merge
# --------------------------------------------------------------------------------------------------------
def engine_labels(labels: torch.Tensor, ignore_index: int | None, num_classes: int) -> torch.Tensor:
    """Integer labels of any dtype as the engines take them: int64, with a uint64 label above 2**63 − 1 (read
    as a negative int64) replaced by an id outside [0, num_classes) that is not ``ignore_index``."""
    as_int64, too_big = labels_as_int64(labels)
    if too_big is None:
        return as_int64
    sentinel = num_classes if ignore_index != num_classes else num_classes + 1
    return torch.where(too_big, sentinel, as_int64)


def merge(
    stats: torch.Tensor,
    *,
    rank: int,
    kind: str,
    coefficients: spec.RowCoefficients,
    smoothing: bool,
    weight_totals: list[float],
) -> dict[str, Any]:
    """The statistics of P blocks of the same rows, (P, 6, N) float64 in block order, merged.

    Returns the per-element loss before masking and reduction (``loss``), the gradient's row coefficient
    (``coef``), block ``rank``'s factor exp(m_r − m) (``own_factor``), Σ exp(x − m) (``sum_exp``), the maximum
    block ``rank``'s statistics used (``local_max``), the target's weight (``w_y``, labels), and ``flagged``: the rows with a label on a masked class
    (labels) or probability mass on a masked class (probabilities), in any block.
    ``weight_totals``: each block's Σ w over its valid classes (its class count without weights).
    """
    raws = stats[:, 0]
    top = raws.amax(dim=0)
    m = torch.where(torch.isfinite(top), top, 0.0)
    # a block without a finite valid logit in the row has only zeros and −inf in its shifted sums
    delta = torch.where(torch.isfinite(raws), raws - m, 0.0)
    factor = torch.exp(delta)
    sum_exp = (stats[:, 1] * factor).sum(dim=0)
    sum_exp = torch.where(top == math.inf, math.nan, sum_exp)
    log_sum_exp = sum_exp.log()
    if kind == "index":
        flagged = (stats[:, 5] == 2).any(dim=0)
        owner_shift = torch.where(stats[:, 5] != 0, delta, 0.0).sum(dim=0)
        w_y = stats[:, 3].sum(dim=0)
        weighted_sum: Any = 0.0
        excluded = coefficients.empty_target
        if smoothing:  # Σ_r (S_r + W_r·(m_r − m)), in block order (a Python total never travels to the device)
            for r, total in enumerate(weight_totals):
                term = stats[r, 4]
                if excluded:  # the owner's statistic 4 left the target out (``exclude_target``): so does its total
                    total = total - stats[r, 3]
                if isinstance(total, torch.Tensor):
                    term = term + torch.where(total != 0, total * delta[r], 0.0)
                elif total != 0:
                    term = term + total * delta[r]
                weighted_sum = term if r == 0 else weighted_sum + term
        loss, coef = spec.label_row(
            coefficients,
            log_sum_exp=log_sum_exp,
            row_max=m,
            w_y=w_y,
            x_y=stats[:, 2].sum(dim=0) + owner_shift,
            weighted_sum=weighted_sum,
            where=torch.where,
            log=torch.log,
            target_excluded=excluded,
        )
    else:
        flagged = (stats[:, 5] != 0).any(dim=0)
        w_y = None
        mass = stats[:, 2]
        loss, coef = spec.probability_row(
            coefficients,
            log_sum_exp=log_sum_exp,
            row_max=m,
            target_mass=mass.sum(dim=0),
            weighted_sum=(stats[:, 3] + torch.where(mass != 0, mass * delta, 0.0)).sum(dim=0),
            weighted_xlogx=stats[:, 4].sum(dim=0),
        )
    own = raws[rank]  # this block's m_r, as its statistics used it
    return dict(
        loss=loss,
        coef=coef,
        own_factor=factor[rank],
        sum_exp=sum_exp,
        local_max=torch.where(torch.isfinite(own), own, 0.0),
        flagged=flagged,
        w_y=w_y,
    )


# --------------------------------------------------------------------------------------------------------
# The two steps of any engine, and the single-device call over them
# --------------------------------------------------------------------------------------------------------
def _compute(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_columns(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or tensor.dim() < 2 or tensor.shape[1] <= 1 or tensor.stride(1) == 1:
        return tensor
    return tensor.contiguous()


def _block_arguments(x: torch.Tensor, arguments: dict[str, Any]) -> dict[str, Any]:
    """The per-block arguments as every engine takes them: int64 labels, weights in the compute dtype, the
    mask as bool, all contiguous on ``x``'s device; probabilities with unit column stride."""
    compute = _compute(x.dtype)
    found = dict(arguments)
    for name, dtype in (("labels", torch.int64), ("weight", compute), ("class_mask", torch.bool)):
        tensor = found.get(name)
        if tensor is not None:
            found[name] = tensor.to(device=x.device, dtype=dtype).contiguous()
    if found.get("probs") is not None:
        found["probs"] = _unit_columns(found["probs"].to(x.device))
    return found


def statistics(
    name: str, x: torch.Tensor, out: torch.Tensor, *, exclude_target: bool = False, **arguments: Any
) -> None:
    """Engine ``name``'s six statistics of the block ``x`` into ``out`` (6, n) float64 (see the module's
    docstring for the arguments). ``exclude_target`` (labels whose target carries no mass, q_y = 0:
    ``RowCoefficients.empty_target``): statistic 4 leaves out the target class where the block owns it, so the
    target's logit is never read, even at −inf; :func:`merge` then leaves it out of the weight total too."""
    x = _unit_columns(x)
    arguments = _block_arguments(x, arguments)
    exclude_target = bool(exclude_target) and arguments.get("labels") is not None
    if name == "triton":  # its statistics are in the compute dtype
        staged = torch.empty(tuple(out.shape), dtype=_compute(x.dtype), device=x.device)
        engine(name).statistics(x, staged, **arguments)
        out.copy_(staged)
        if exclude_target:
            # the Triton kernel sums every valid class: statistic 4 without the target from the plain-torch
            # engine (same maximum, same contract); only for ε = 1 with spread="others"
            redo = torch.empty(tuple(out.shape), dtype=_compute(x.dtype), device=x.device)
            ops.statistics(x, redo, exclude_target=True, **arguments)
            out[4].copy_(redo[4])
        return
    if exclude_target:
        arguments["exclude_target"] = True
    engine(name).statistics(x, out, **arguments)


def gradient(
    name: str,
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    local_max: torch.Tensor,
    p_scale: torch.Tensor,
    row_scale: torch.Tensor,
    nan_rows: torch.Tensor | None = None,
    **arguments: Any,
) -> None:
    """Engine ``name``'s gradient of the block ``x`` into ``grad`` (may be ``x``), from the merged per-row
    factors (any float dtype; taken in the compute dtype)."""
    compute = _compute(x.dtype)
    strided = x.dim() == 2 and x.shape[1] > 1 and x.stride(1) != 1
    target = grad
    if strided or (grad.dim() == 2 and grad.shape[1] > 1 and grad.stride(1) != 1):
        in_place = grad.data_ptr() == x.data_ptr()
        x = x.contiguous()
        target = x if in_place else torch.empty(x.shape, dtype=grad.dtype, device=x.device)
    rows = {
        "local_max": local_max,
        "p_scale": p_scale,
        "row_scale": row_scale,
    }
    rows = {key: value.to(device=x.device, dtype=compute).contiguous() for key, value in rows.items()}
    if nan_rows is not None:
        rows["nan_rows"] = nan_rows.to(device=x.device, dtype=torch.bool).contiguous()
    engine(name).gradient(x, target, **rows, **_block_arguments(x, arguments))
    if target is not grad:
        grad.copy_(target)


def finish(
    merged: dict[str, Any],
    *,
    kind: str,
    opts: spec.Options,
    n: int,
    active: torch.Tensor | None,
    invalid: torch.Tensor | None,
    sample_weight: torch.Tensor | None,
    denominator: torch.Tensor | None,
) -> tuple[torch.Tensor, Any, dict[str, Any]]:
    """(the per-element loss, unweighted by ``sample_weight``: 0 for an ignored label, NaN for an invalid one
    or a masked target; the mean's denominator; the gradient's per-row factors) from :func:`merge`'s result.

    The denominator is ``denominator`` when given, else Σ sample_weight·w_y over the non-ignored labels
    (Σ sample_weight, or N, for probabilities). The factors: ``local_max``, ``p_factor`` (p_scale per unit of
    row scale), ``row_scale`` (the reduction's scale × sample_weight, 0 for ignored rows) and ``nan_rows``.
    """
    loss = merged["loss"]
    device = loss.device
    sw = None if sample_weight is None else sample_weight.to(device=device, dtype=torch.float64).reshape(-1)
    if denominator is not None:
        d: Any = denominator.detach().to(device=device, dtype=torch.float64).reshape(())
    elif kind == "index":
        w_y_active = torch.where(active, merged["w_y"], 0.0)
        d = (w_y_active if sw is None else w_y_active * sw).sum()
    else:
        d = torch.full((), float(n), dtype=torch.float64, device=device) if sw is None else sw.sum()
    scale = spec.reduction_scale(opts.reduction, d, where=torch.where)
    m = merged["local_max"]
    row_scale = torch.full_like(m, scale) if isinstance(scale, float) else scale.expand_as(m)
    if sw is not None:
        row_scale = row_scale * sw
    nan_rows = merged["flagged"]  # a label or probability mass on a class masked in any block
    if kind == "index":
        row_scale = torch.where(active, row_scale, 0.0)
        nan_rows = nan_rows | invalid
        loss = torch.where(active, loss, 0.0)
    loss = loss.masked_fill(nan_rows, math.nan)
    factors = dict(
        p_factor=merged["coef"] * merged["own_factor"] / merged["sum_exp"],
        row_scale=row_scale,
        local_max=m,
        nan_rows=nan_rows,
    )
    return loss, d, factors


def label_facts(labels: torch.Tensor, ignore_index: int | None, num_classes: int) -> tuple[torch.Tensor, ...]:
    """(the engines' int64 labels, active, invalid) of integer labels, on their device."""
    labels = engine_labels(labels, ignore_index, num_classes)
    if ignore_index is None:
        active = torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    else:
        active = labels != ignore_index
    return labels, active, active & ((labels < 0) | (labels >= num_classes))


def run(
    name: str,
    x2: torch.Tensor,
    t2: torch.Tensor,
    kind: str,
    opts: spec.Options,
    weight: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    grad: torch.Tensor | None,
    sample_weight: torch.Tensor | None = None,
    denominator: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Any]:
    """One device, engine ``name``'s two steps with a one-block merge: the contract of the plain-torch engine's
    fused ``run`` (fills ``grad``, which may be ``x2`` itself, unless it is None; returns the per-element loss
    in the compute dtype, unweighted by ``sample_weight``, and the mean's denominator), with no host read."""
    n, k = x2.shape
    device = x2.device
    compute = _compute(x2.dtype)
    x2 = x2.detach()
    mask = None if class_mask is None else class_mask.to(device=device, dtype=torch.bool)
    valid_count: Any = k if mask is None else mask.sum().to(compute)
    w = None if weight is None else weight.detach().to(device=device, dtype=compute)
    total_weight = valid_count if w is None else (w if mask is None else w.masked_fill(~mask, 0)).sum()
    coefficients = spec.RowCoefficients.of(opts, valid_count, total_weight)
    smoothing = opts.label_smoothing != 0
    arguments: dict[str, Any] = dict(
        weight=w,
        class_mask=mask,
        softcap=opts.softcap,
        a=coefficients.a,
        b=coefficients.b,
        smoothing=smoothing,
        offset=0,
        num_classes=k,
        ignore_index=opts.ignore_index,
    )
    active = invalid = None
    if kind == "index":
        labels, active, invalid = label_facts(t2.detach().to(device), opts.ignore_index, k)
        arguments["labels"] = labels
    else:
        arguments["probs"] = t2.detach().to(device)
    stats = torch.empty((6, n), dtype=torch.float64, device=device)
    statistics(name, x2, stats, normalize=opts.normalize, exclude_target=coefficients.empty_target, **arguments)
    merged = merge(
        stats.unsqueeze(0),
        rank=0,
        kind=kind,
        coefficients=coefficients,
        smoothing=smoothing,
        weight_totals=[total_weight],
    )
    sw = None if sample_weight is None else sample_weight.detach().reshape(n)
    loss, d, factors = finish(
        merged, kind=kind, opts=opts, n=n, active=active, invalid=invalid, sample_weight=sw, denominator=denominator
    )
    if grad is not None:
        row_scale = factors["row_scale"]
        gradient(
            name,
            x2,
            grad,
            local_max=factors["local_max"],
            p_scale=factors["p_factor"] * row_scale,
            row_scale=row_scale,
            nan_rows=factors["nan_rows"],
            **arguments,
        )
    return loss.to(compute), d.to(compute) if isinstance(d, torch.Tensor) else d
