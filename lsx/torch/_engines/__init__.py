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
    over the valid classes with w_c ≠ 0 when smoothing, 5 the ownership flag (0, 1; 2 on a masked class).
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
- ``torch`` (:mod:`.ops`): plain torch ops; any device, any floating dtype, no host synchronisation.

``auto`` (the default) takes Numba for CPU float32/float64 logits when Numba is installed, plain torch
otherwise.
"""

from __future__ import annotations

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
    "labels_as_int64",
    "merge",
    "rows_per_chunk",
]

#: the environment variable that forces an engine (read at every call)
ENVIRONMENT = "LSX_TORCH_ENGINE"
_NAMES = ("auto", "numba", "torch")
_NUMBA_DTYPES = (torch.float32, torch.float64)


def _numba_available() -> bool:
    from lsx.torch._engines import numba as numba_engine

    return numba_engine.kernel() is not None


def requested() -> str:
    """The engine ``LSX_TORCH_ENGINE`` asks for (``auto`` when unset or empty)."""
    name = os.environ.get(ENVIRONMENT) or "auto"
    if name not in _NAMES:
        raise ValueError(f"{ENVIRONMENT} must be one of {', '.join(_NAMES)}, got {ENVIRONMENT}={name!r}")
    return name


def choose(x: torch.Tensor, *, strided: bool = True, dtype: torch.dtype | None = None) -> str:
    """The engine for logits ``x``: ``"numba"`` or ``"torch"``.

    ``auto``: Numba for CPU float32/float64 logits when Numba is installed (and, unless ``strided``, when ``x``
    is contiguous: a copy would cost more than the plain-torch engine saves), plain torch otherwise. A forced
    engine that cannot serve ``x`` raises ``RuntimeError`` naming the variable, the engine and why. ``dtype``:
    the dtype the engine will see when it is not ``x``'s (``linear_loss`` computes its logits in float32 for
    float16/bfloat16 inputs).
    """
    dtype = x.dtype if dtype is None else dtype
    name = os.environ.get(ENVIRONMENT)
    if not name or name == "auto":
        on_cpu = x.device.type == "cpu" and dtype in _NUMBA_DTYPES and (strided or x.is_contiguous())
        return "numba" if on_cpu and _numba_available() else "torch"
    if name == "torch":
        return "torch"
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
    return ops


# --------------------------------------------------------------------------------------------------------
# Blocks of rows (linear_loss's chunks)
# --------------------------------------------------------------------------------------------------------
#: a chunk of logits holds about this many elements when ``chunk_size`` is None (16 MiB in float32)
CHUNK_ELEMENTS = 1 << 22


def check_chunk_size(chunk_size: Any) -> int | None:
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got chunk_size={chunk_size!r}")
    return int(chunk_size)


def rows_per_chunk(n: int, v: int, chunk_size: int | None) -> int:
    """Rows per chunk: the caller's, or about CHUNK_ELEMENTS logits per chunk, evened out over the chunks."""
    if chunk_size is not None:
        return max(1, min(chunk_size, n))
    rows = max(1, CHUNK_ELEMENTS // max(v, 1))
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
        if smoothing:
            totals = torch.tensor(weight_totals, dtype=torch.float64, device=stats.device).unsqueeze(1)
            weighted_sum = (stats[:, 4] + torch.where(totals != 0, totals * delta, 0.0)).sum(dim=0)
        loss, coef = spec.label_row(
            coefficients,
            log_sum_exp=log_sum_exp,
            row_max=m,
            w_y=w_y,
            x_y=stats[:, 2].sum(dim=0) + owner_shift,
            weighted_sum=weighted_sum,
            where=torch.where,
            log=torch.log,
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
