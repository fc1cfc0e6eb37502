"""Vocabulary-parallel label-smoothed cross-entropy on ``torch.distributed`` (``process_group=``).

The class axis is split over the group's ranks in rank order: ``input`` holds this rank's slice of the
classes (slices may be uneven; a rank may hold none), ``target`` holds the global labels (or this rank's
slice of the probabilities), ``weight`` and ``class_mask`` this rank's slices. The result is the
single-device loss, with the global class count K and the global weight total W in the smoothing.

Only per-row statistics travel, never logits: two collectives per call, both all-gathers.

1. A header of a few numbers per rank: its class count, valid class count and weight total (the global K, W
   and the slice offsets follow, in rank order), and what every rank must agree on (element count, dtypes,
   target kind, the options, a 64-bit digest of the labels and of sample_weight, the denominator's value)
   or an error code when this rank rejected its input.
   Its size depends only on the group's size, so ranks whose batches or dtypes disagree get a ``ValueError``
   (on every rank) before any collective whose size depends on the batch, never a hang.
2. Six float64 statistics per row (48 bytes), each taken relative to this rank's own row maximum m_r over
   its valid classes: m_r, Σ exp(x − m_r), the target's x_y − m_r and w_y with an ownership flag (from the
   rank that owns the target class, 0 elsewhere), Σ w (x − m_r); for probabilities Σ w q, Σ w q (x − m_r)
   and Σ w·xlogx(q). Every rank merges them in rank order with the global maximum m (``spec.merge_max`` /
   ``spec.reshift``: sums of exponentials scale by exp(m_r − m), shifted sums add their weight total
   times m_r − m), so every rank holds the same global statistics bit for bit.

Each rank then applies ``spec.label_row`` / ``spec.probability_row`` to those statistics, so the loss is
bitwise identical on every rank, and writes its slice of the gradient ``(coef · p − w∘q) · scale`` in the
forward pass; the backward pass scales it by the upstream gradient and needs no communication.

Value checks (labels in [0, K), weight finite and >= 0, class_mask, probability mass on a masked class) run
on CPU tensors, and their outcome travels with the collectives, so bad input raises ``ValueError`` on every
rank (the rank holding the bad value names it, the others name that rank). On accelerators the header is
read on the host once per call (one synchronisation); value checks are skipped there and a bad label gives
NaN, as on a single device.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from lsx import spec
from lsx.torch import _engines, _function
from lsx.torch._engines import chunk_logits as _chunk_logits
from lsx.torch._engines import ops as _ops

__all__ = ["cross_entropy"]

_DTYPE_CODES = {
    dtype: code
    for code, dtype in enumerate(
        (
            torch.float64,
            torch.float32,
            torch.float16,
            torch.bfloat16,
            torch.int8,
            torch.int16,
            torch.int32,
            torch.int64,
            torch.uint8,
            getattr(torch, "uint16", None),
            getattr(torch, "uint32", None),
            getattr(torch, "uint64", None),
        ),
        start=1,
    )
    if dtype is not None
}

_NUMPY_DTYPES = {torch.float64: np.float64, torch.float32: np.float32}
#: error codes exchanged in the header
_ERRORS = {1: "weight", 2: "class_mask", 3: "target", 4: "sample_weight or denominator", 5: "input's shapes or types"}
#: the header's columns
_ERROR, _ELEMENTS, _X_DTYPE, _T_DTYPE, _KIND, _CLASSES, _VALID, _WEIGHT, _SUM1, _SUM2, _OPTIONS, _INPUT_GRAD = range(12)
#: the digests of what is replicated: sample_weight's (two 32-bit halves), the denominator's value
_SW1, _SW2, _DEN = range(12, 15)
_HEADER = 15
#: what every rank must agree on, with the error's wording
_AGREE = (
    (_ELEMENTS, "element count (batch shape)"),
    (_X_DTYPE, "logits dtype"),
    (_T_DTYPE, "target dtype"),
    (_KIND, "target kind (labels or probabilities)"),
    (_OPTIONS, "options"),
    (_SUM1, "labels (their digest)"),
    (_SUM2, "labels (their digest)"),
    (_SW1, "sample_weight (its digest)"),
    (_SW2, "sample_weight (its digest)"),
    (_DEN, "denominator"),
    (_INPUT_GRAD, "input's requires_grad (linear_loss all-reduces the input's gradient in the backward)"),
)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    opts: spec.Options,
    axis: int | None,
    weight: Any,
    class_mask: Any,
    group: Any,
    *,
    sample_weight: Any = None,
    denominator: Any = None,
) -> torch.Tensor:
    """The loss of this rank's class slice ``logits`` against ``target`` over the group ``group``.

    ``sample_weight`` (per element, the same on every rank) and ``denominator`` override ``opts``' own; neither
    is differentiated here.
    """
    if not isinstance(opts, spec.Options):
        raise NotImplementedError("process_group is not supported under torch.compile; call the loss eagerly")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group needs an initialised torch.distributed (dist.init_process_group)")
    if sample_weight is not None or denominator is not None:
        opts = dataclasses.replace(
            opts,
            sample_weight=opts.sample_weight if sample_weight is None else sample_weight,
            denominator=opts.denominator if denominator is None else denominator,
        )
    call = _Call(group, opts)
    try:  # every local failure travels in the header, so that the other ranks raise too
        resolve = _function.resolve_neg
        call.prepare(resolve(logits), resolve(target), axis, resolve(weight), class_mask)
    except Exception as error:  # raised on this rank after the header, whatever it is
        call.fail(error, 5)
    call.exchange_header(logits)
    if call.x2.requires_grad and torch.is_grad_enabled():
        value = _ParallelFused.apply(call.x2, call)
    else:
        value, _ = call.run(call.x2.detach())
    return value.reshape(call.lead_shape) if opts.reduction == "none" else value


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype}"
    return type(value).__name__


def _as_tensor(value: Any, name: str, device: torch.device) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if name == "weight" and (tensor.dtype == torch.bool or tensor.is_complex()):
        raise TypeError(f"weight must be a real tensor, got dtype {tensor.dtype}")
    if name == "class_mask" and tensor.dtype != torch.bool:
        raise TypeError(f"class_mask must be a boolean tensor, got dtype {tensor.dtype}")
    return tensor.detach().to(device=device)


def _options_code(opts: spec.Options) -> float:
    scalars = (
        opts.label_smoothing,
        opts.spread,
        opts.ignore_index,
        opts.z_loss,
        opts.normalize,
        opts.reduction,
        opts.empty_mean,
        opts.softcap,
        opts.sample_weight is None,
        opts.denominator is None,
    )
    return float(zlib.crc32(repr(scalars).encode()))


def _denominator(value: Any, device: torch.device) -> torch.Tensor:
    """The caller's denominator as a 0-d float64 tensor on ``device`` (a number filled in there: no copy)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=device, dtype=torch.float64).reshape(())
    return torch.full((), float(np.asarray(value)), dtype=torch.float64, device=device)


#: the constants of SplitMix64 (as signed int64: torch multiplies int64 modulo 2**64)
_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685
_LOW32 = (1 << 32) - 1


def _shift(z: torch.Tensor, bits: int) -> torch.Tensor:
    """z >> bits as an unsigned 64-bit shift."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def _digest(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A 64-bit digest of int64 ``keys`` and their positions, as two float64 halves (exact in the header),
    computed on the keys' device (no host read): the sum modulo 2**64 of SplitMix64(key·φ + position), so a
    changed value or two swapped positions change it (but for a 2**-64 chance), whatever the distance."""
    keys = keys.reshape(-1)
    positions = torch.arange(1, keys.numel() + 1, device=keys.device, dtype=torch.int64)
    z = keys * _GOLDEN + positions * _MIX2
    z = z ^ _shift(z, 30)
    z = z * _MIX1
    z = z ^ _shift(z, 27)
    z = z * _MIX2
    z = z ^ _shift(z, 31)
    total = z.sum()
    return (_shift(total, 32)).to(torch.float64), (total & _LOW32).to(torch.float64)


def _gather(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """All-gather ``tensor`` (float64) from every rank, stacked in rank order on its device."""
    device = tensor.device
    if str(dist.get_backend(group)) == "gloo":
        tensor = tensor.cpu()
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, tensor, group=group)
    return torch.stack(gathered).to(device)


class _Call:
    """One call: its local preparation, the two collectives and the arithmetic (see the module docstring)."""

    def __init__(self, group: Any, opts: spec.Options) -> None:
        self.group = group
        self.opts = opts
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.error: Exception | None = None
        self.error_code = 0
        self.x2 = self.t2 = self.weight = self.mask = self.sample_weight = None
        self.kind = "index"
        self.input_grad = False  # linear_loss: whether the backward all-reduces the input's gradient
        self.lead_shape: Any = ()

    def fail(self, error: Exception, code: int) -> None:
        if self.error is None:
            self.error, self.error_code = error, code

    # ---- local preparation (no communication) ------------------------------------------------------
    def prepare(self, logits, target, axis, weight, class_mask) -> None:
        opts = self.opts
        if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
            raise TypeError(f"input must be a floating-point tensor, got {_describe(logits)}")
        if not isinstance(target, torch.Tensor):
            raise TypeError(f"target must be a tensor, got {_describe(target)}")
        kind = spec.target_kind(target.dtype)
        if kind == "probs" and target.requires_grad and torch.is_grad_enabled():
            raise ValueError("lsx.torch.loss does not differentiate the target probabilities; pass target.detach()")
        if axis is None:
            axis = 1 if logits.dim() >= 2 else 0
        shape, target_shape = tuple(logits.shape), tuple(target.shape)
        ndim = len(shape)
        if ndim == 0:
            raise ValueError("logits must have a class axis, got a scalar")
        if isinstance(axis, bool) or not isinstance(axis, int) or not -ndim <= axis < ndim:
            raise ValueError(f"axis must be an int in [{-ndim}, {ndim}) for logits of shape {shape}, got {axis!r}")
        axis %= ndim
        k = shape[axis]
        expected = shape[:axis] + shape[axis + 1 :] if kind == "index" else shape
        if target_shape != expected:
            what = "integer labels" if kind == "index" else "probabilities"
            raise ValueError(f"target of {what} must have shape {expected} (this rank's slice), got {target_shape}")
        weight = _as_tensor(weight, "weight", logits.device)
        class_mask = _as_tensor(class_mask, "class_mask", logits.device)
        for name, tensor in (("weight", weight), ("class_mask", class_mask)):
            if tensor is not None and tuple(tensor.shape) != (k,):
                raise ValueError(
                    f"{name} must have shape ({k},) (this rank's slice of the classes), got {tuple(tensor.shape)}"
                )
        if opts.denominator is not None:
            if opts.reduction != "mean":
                raise ValueError(f'denominator is only for reduction="mean", got reduction={opts.reduction!r}')
            if isinstance(opts.denominator, bool) or np.ndim(opts.denominator) != 0:
                raise ValueError(f"denominator must be a number or a 0-d tensor, got {_describe(opts.denominator)}")
        for name in ("sample_weight", "denominator"):
            value = getattr(opts, name)
            if isinstance(value, torch.Tensor) and value.requires_grad and torch.is_grad_enabled():
                raise ValueError(f"{name} is not differentiated with process_group; pass {name}.detach()")
        elements = spec.element_shape(shape, axis)
        if opts.sample_weight is not None and tuple(np.shape(opts.sample_weight)) != elements:
            raise ValueError(
                f"sample_weight must have the per-element loss's shape {elements}, "
                f"got {tuple(np.shape(opts.sample_weight))}"
            )
        if ndim == 2 and axis == 1:
            x2, t2, self.lead_shape = logits, target, shape[:1]
        else:
            moved = logits.movedim(axis, -1)
            self.lead_shape = moved.shape[:-1]
            n = math.prod(self.lead_shape)  # explicit: a rank without classes has no elements to infer from
            x2 = moved.reshape(n, k)
            t2 = target.reshape(n) if kind == "index" else target.movedim(axis, -1).reshape(n, k)
        self.x2, self.t2, self.kind, self.weight, self.mask = x2, t2, kind, weight, class_mask
        if opts.sample_weight is not None:
            self.sample_weight = torch.as_tensor(opts.sample_weight, device=logits.device).detach().reshape(-1)
        self._check_values()

    def _check_values(self) -> None:
        """Value checks of this rank's slices (CPU tensors only); failures are recorded, not raised."""
        opts = self.opts
        weight, mask, t2 = self.weight, self.mask, self.t2
        weight_np = sw_np = None
        try:
            if weight is not None and weight.device.type == "cpu":
                weight_np = spec.check_weight(weight.to(torch.float64).numpy(), weight.shape[0])
                # this rank's slice: the rank holding the largest weight names it
                spec.check_weight_range(self.x2.dtype, weight=weight_np, num_elements=self.x2.shape[0])
        except (ValueError, TypeError) as error:
            return self.fail(error, 1)
        try:
            if self.sample_weight is not None and self.sample_weight.device.type == "cpu":
                sw_np = spec.check_sample_weight(self.sample_weight.double().numpy(), tuple(self.sample_weight.shape))
                spec.check_weight_range(self.x2.dtype, weight=weight_np, sample_weight=sw_np)
            den = opts.denominator
            if den is not None and (not isinstance(den, torch.Tensor) or den.device.type == "cpu"):
                spec.check_denominator(torch.as_tensor(den).detach().cpu().numpy())
        except (ValueError, TypeError) as error:
            return self.fail(error, 4)
        if self.kind == "probs" and mask is not None and t2.device.type == "cpu" and mask.device.type == "cpu":
            try:
                spec.check_probability_target_mask(t2.detach().to(torch.float64).numpy(), -1, mask.numpy())
            except ValueError as error:
                return self.fail(error, 3)
        return None

    # ---- collective 1: the header ----------------------------------------------------------------
    def exchange_header(self, logits: Any) -> None:
        opts = self.opts
        device = logits.device if isinstance(logits, torch.Tensor) else torch.device("cpu")
        header = torch.zeros(_HEADER, dtype=torch.float64, device=device)
        header[_ERROR] = float(self.error_code)
        header[_OPTIONS] = _options_code(opts)
        header[_INPUT_GRAD] = float(self.input_grad)
        x2, t2 = self.x2, self.t2
        if x2 is not None:
            n, k = x2.shape
            header[_ELEMENTS] = float(n)
            header[_X_DTYPE] = float(_DTYPE_CODES.get(x2.dtype, 0))
            header[_T_DTYPE] = float(_DTYPE_CODES.get(t2.dtype, 0))
            header[_KIND] = 1.0 if self.kind == "index" else 2.0
            header[_CLASSES] = float(k)
            mask, w = self.mask, self.weight
            valid = torch.full((), float(k), dtype=torch.float64, device=device) if mask is None else mask.sum()
            header[_VALID] = valid
            if w is None:
                header[_WEIGHT] = valid
            else:
                header[_WEIGHT] = (w.double() if mask is None else w.double().masked_fill(~mask, 0)).sum()
            if self.kind == "index" and n:
                labels, too_big = _engines.labels_as_int64(t2)
                if too_big is not None:  # (a uint64 label above 2**63 - 1 keeps its own key)
                    labels = torch.where(too_big, t2.view(torch.int64), labels) ^ too_big.to(torch.int64)
                header[_SUM1], header[_SUM2] = _digest(labels.to(device))
            sw = self.sample_weight
            if sw is not None and sw.numel():
                # the bits of each value (+ 0.0 makes −0.0 the same key as 0.0)
                header[_SW1], header[_SW2] = _digest((sw.to(device=device, dtype=torch.float64) + 0.0).view(torch.int64))
        den = opts.denominator
        header[_DEN] = -1.0 if den is None else torch.as_tensor(den, dtype=torch.float64).to(device).reshape(())
        rows = _gather(header, self.group).cpu().tolist()
        if self.error is not None:
            raise self.error
        for rank, row in enumerate(rows):
            if row[_ERROR]:
                raise ValueError(
                    f"rank {rank} of the process group rejected its {_ERRORS.get(int(row[_ERROR]), 'input')} "
                    "(see the error raised there); no rank computed the loss"
                )
        for column, name in _AGREE:
            values = [row[column] for row in rows]
            if len(set(values)) > 1:
                shown = f": {[int(v) for v in values]} in rank order" if column == _ELEMENTS else ""
                raise ValueError(
                    f"the ranks of the process group disagree on the {name}{shown}; every rank must pass the same "
                    "batch, labels and options, with its own slice of the classes"
                )
        counts = [int(row[_CLASSES]) for row in rows]
        self.offset = sum(counts[: self.rank])
        self.total_classes = sum(counts)
        self.weight_totals = [row[_WEIGHT] for row in rows]
        valid = sum(row[_VALID] for row in rows)  # rank order: the same on every rank
        global_weight = sum(self.weight_totals)
        opts = self.opts
        if self.kind == "index" and self.t2.device.type == "cpu":
            spec.check_labels(self.t2.numpy(), self.total_classes, opts)  # the same labels on every rank
        spec.check_class_count(int(valid), opts)
        self.coefficients = spec.RowCoefficients.of(
            opts, int(valid), int(valid) if self.weight is None else global_weight
        )

    # ---- the arithmetic, shared by the single call and the chunked (fused linear) one ----------------
    def setup(self, dtype: torch.dtype, device: torch.device) -> None:
        """What every row block of the call shares: the engine for blocks of ``dtype`` on ``device``, the
        compute dtype, the engine's per-call arguments, the labels' per-row facts (active, invalid) for all
        N rows. No logits-sized tensor."""
        opts, kind = self.opts, self.kind
        k = self.x2.shape[1]
        compute = torch.float64 if dtype == torch.float64 else torch.float32
        self.compute, self.device, self.k = compute, device, k
        self.engine = _engines.choose(self.x2, dtype=dtype)
        self.smoothing = opts.label_smoothing != 0
        coefficients = self.coefficients
        self.arguments = dict(
            weight=None if self.weight is None else self.weight.to(compute),
            class_mask=self.mask,
            softcap=opts.softcap,
            a=coefficients.a,
            b=coefficients.b,
            smoothing=self.smoothing,
            offset=self.offset,
            num_classes=self.total_classes,
            ignore_index=opts.ignore_index,
        )
        self.labels = self.active = self.invalid = None
        if kind != "index":
            return
        self.labels, self.active, self.invalid = _engines.label_facts(
            self.t2.to(device), opts.ignore_index, self.total_classes
        )

    def _rows(self, rows: slice) -> dict[str, Any]:
        """The per-row arguments of the engine for rows ``rows``: labels, or this rank's probabilities."""
        if self.kind == "index":
            return dict(labels=self.labels[rows])
        return dict(probs=self.t2[rows].to(self.device))

    def statistics(self, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """This rank's six float64 statistics (6, rows) of rows ``rows`` from their logits ``x`` (not modified)."""
        out = torch.empty((6, x.shape[0]), dtype=torch.float64, device=self.device)
        _engines.statistics(
            self.engine,
            x,
            out,
            normalize=self.opts.normalize,
            exclude_target=self.coefficients.empty_target,
            **self._rows(rows),
            **self.arguments,
        )
        return out

    def merge(
        self, stats: torch.Tensor, rows: slice = slice(None), reduction: str | None = None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """(the loss before the reduction, the per-row factors of the gradient) of rows ``rows`` from every
        rank's statistics (P, 6, rows), merged in rank order (:func:`lsx.torch._engines.merge`): the same bits
        on every rank. ``reduction`` overrides the options' (``"sum"``: row scales without the mean's 1/D);
        ``self.denominator`` is then these rows' share of the mean's denominator (or the caller's)."""
        opts, kind, device = self.opts, self.kind, self.device
        if reduction is not None:
            opts = dataclasses.replace(opts, reduction=reduction)
        n = stats.shape[-1]
        merged = _engines.merge(
            stats,
            rank=self.rank,
            kind=kind,
            coefficients=self.coefficients,
            smoothing=self.smoothing,
            weight_totals=self.weight_totals,
        )
        flagged = merged["flagged"]
        if kind == "index" and self.t2.device.type == "cpu" and flagged.device.type == "cpu" and bool(flagged.any()):
            label = int(self.labels[rows][flagged][0])
            raise ValueError(f"target has label {label}, a class that class_mask marks as absent")
        loss, self.denominator, factors = _engines.finish(
            merged,
            kind=kind,
            opts=opts,
            n=n,
            active=None if self.active is None else self.active[rows],
            invalid=None if self.invalid is None else self.invalid[rows],
            sample_weight=None if self.sample_weight is None else self.sample_weight[rows],
            denominator=None if opts.denominator is None else _denominator(opts.denominator, device),
        )
        if self.sample_weight is not None:
            loss = loss * self.sample_weight[rows].to(torch.float64)
        return loss, factors

    def reduce(self, loss: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return _ops.reduce(loss, self.denominator, self.opts, dtype)

    def gradient(
        self,
        x: torch.Tensor,
        grad: torch.Tensor,
        rows: slice,
        merged: dict[str, Any],
        upstream: Any = None,
        factor_rows: slice | None = None,
    ) -> torch.Tensor:
        """This rank's slice of the gradient of rows ``rows``, ``(coef · p − w∘q) · scale`` (× the soft-cap's
        chain factor, × ``upstream``, per row or a scalar), from their logits ``x`` into ``grad`` (which may be
        ``x``). ``merged``'s factors are for all N rows, or for rows ``factor_rows`` of them."""
        rows_in_factors = rows if factor_rows is None else factor_rows
        row_scale = merged["row_scale"][rows_in_factors]
        if upstream is not None:
            row_scale = row_scale * upstream
        _engines.gradient(
            self.engine,
            x,
            grad,
            local_max=merged["local_max"][rows_in_factors],
            p_scale=merged["p_factor"][rows_in_factors] * row_scale,
            row_scale=row_scale,
            nan_rows=merged["nan_rows"][rows_in_factors],
            **self._rows(rows),
            **self.arguments,
        )
        return grad

    # ---- collective 2 for one call of ``loss``: every row at once ------------------------------------
    def run(self, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss in x2's dtype, this rank's slice of the reduced loss's gradient)."""
        self.setup(x2.dtype, x2.device)
        every = slice(None)
        local = self.statistics(x2, every)
        loss, merged = self.merge(_gather(local, self.group))  # (P, 6, N)
        value = self.reduce(loss, x2.dtype)
        if x2.device.type == "cpu" and x2.dtype in _NUMPY_DTYPES:  # NumPy asks for huge pages: fewer page faults
            grad = torch.from_numpy(np.empty(tuple(x2.shape), _NUMPY_DTYPES[x2.dtype]))
        else:
            grad = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        return value, self.gradient(x2, grad, every, merged)


class _ParallelFused(torch.autograd.Function):
    """The gradient is computed in the forward pass; the backward scales it (no communication)."""

    @staticmethod
    def forward(ctx, x2, call):
        value, grad = call.run(x2.detach())
        ctx.save_for_backward(grad)
        ctx.per_element = call.opts.reduction == "none"
        return value

    @staticmethod
    def backward(ctx, grad_value):
        (grad,) = ctx.saved_tensors
        # the single-device rule: first-order only; the saved buffer scaled in place once the graph is released
        return _function._input_grad(ctx, grad_value, grad), None


def _all_reduce(tensor: torch.Tensor, group: Any) -> torch.Tensor:
    """The sum of ``tensor`` over the group (in place where the backend takes the tensor's device)."""
    device = tensor.device
    reduced = tensor.cpu() if str(dist.get_backend(group)) == "gloo" else tensor
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM, group=group)
    return reduced.to(device)


def linear_cross_entropy(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    linear_bias: torch.Tensor | None,
    weight: Any,
    class_mask: Any,
    sample_weight: Any,
    opts: spec.Options,
    group: Any,
    chunk_size: Any = None,
) -> torch.Tensor:
    """``lsx.torch.linear_loss`` over a vocabulary split across ``group``: ``linear_weight`` (V_r, H) and
    ``linear_bias`` (V_r,) are this rank's rows (the tensor-parallel LM head), fused: no (N, V_r) logits.

    Pass 1 runs over row chunks: each chunk's logits go into one reused (rows, V_r) buffer and leave only
    their six statistics per row (:meth:`_Call.statistics`); then the two collectives of ``loss`` for all
    rows at once and the merge. Pass 2 (in the backward) recomputes each chunk's logits in the buffer, turns
    them into this rank's gradient slice in place (:meth:`_Call.gradient`, the upstream gradient included)
    and pushes it through the projection: ``grad_h = g @ W_r`` (summed over the group by one all-reduce of
    an (N, H) tensor), ``grad_W_r += g.T @ h``, ``grad_b_r += Σ g``.
    """
    if not isinstance(opts, spec.Options):
        raise NotImplementedError("process_group is not supported under torch.compile; call the loss eagerly")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("process_group needs an initialised torch.distributed (dist.init_process_group)")
    if sample_weight is not None:
        opts = dataclasses.replace(opts, sample_weight=sample_weight)
    call = _Call(group, opts)
    grad_on = torch.is_grad_enabled()
    leaves = (input, linear_weight, linear_bias)
    need = tuple(grad_on and isinstance(t, torch.Tensor) and t.requires_grad for t in leaves)
    call.input_grad = need[0]
    try:  # every local failure travels in the header, so that the other ranks raise too
        chunk_size = _engines.check_chunk_size(chunk_size)
        lead, h = _check_linear(input, linear_weight, linear_bias)
        v = linear_weight.shape[0]
        # a stride-0 stand-in with the logits' shape, dtype and device: prepare() checks the layout on it
        stand_in = torch.empty((), dtype=input.dtype, device=input.device).expand(*lead, v)
        call.prepare(stand_in, target, -1, weight, class_mask)
    except Exception as error:  # raised on this rank after the header, whatever it is
        call.fail(error, 5)
    call.exchange_header(input)
    n = call.x2.shape[0]
    rows = _engines.rows_per_chunk(n, linear_weight.shape[0], chunk_size, input.device)
    h2 = input.reshape(n, h)
    if any(need):
        value = _ParallelLinear.apply(h2, linear_weight, linear_bias, call, rows, need)
    else:
        value, _ = _linear_forward(call, h2.detach(), linear_weight.detach(), _detach(linear_bias), rows)
    return value.reshape(lead) if opts.reduction == "none" else value


def _detach(tensor: Any) -> Any:
    return None if tensor is None else tensor.detach()


def _check_linear(input: Any, linear_weight: Any, linear_bias: Any) -> tuple[tuple[int, ...], int]:
    """(the input's leading shape, H), or a ValueError/TypeError naming the argument."""
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {_describe(input)}")
    if input.dim() < 1:
        raise ValueError(f"input must have shape (..., H), got a tensor of shape {tuple(input.shape)}")
    if not isinstance(linear_weight, torch.Tensor) or linear_weight.dim() != 2:
        shape = tuple(linear_weight.shape) if isinstance(linear_weight, torch.Tensor) else _describe(linear_weight)
        raise ValueError(f"linear_weight must be a (V_r, H) tensor (this rank's rows), got {shape}")
    v, h = linear_weight.shape
    if input.shape[-1] != h:
        raise ValueError(
            f"input's last dim ({input.shape[-1]}) must equal linear_weight's H: linear_weight has shape "
            f"{tuple(linear_weight.shape)} (V_r, H), input has shape {tuple(input.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight must have the input's dtype {input.dtype}, got {linear_weight.dtype}")
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor) or tuple(linear_bias.shape) != (v,):
            shape = tuple(linear_bias.shape) if isinstance(linear_bias, torch.Tensor) else _describe(linear_bias)
            raise ValueError(f"linear_bias must have shape ({v},) (this rank's rows), got {shape}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias must have the input's dtype {input.dtype}, got {linear_bias.dtype}")
    return tuple(input.shape[:-1]), h


def _linear_forward(call: _Call, h2, w, b, rows):
    """Pass 1 and the collectives: (the loss in h2's dtype, the merged per-row factors)."""
    compute = torch.float64 if h2.dtype == torch.float64 else torch.float32
    call.setup(compute, h2.device)
    n = h2.shape[0]
    wc, bc = w.to(compute), None if b is None else b.to(compute)
    buffer = torch.empty((min(rows, n), wc.shape[0]), dtype=compute, device=h2.device)
    local = torch.empty((6, n), dtype=torch.float64, device=h2.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        _, logits = _chunk_logits(h2, wc, bc, start, stop, buffer)
        local[:, start:stop] = call.statistics(logits, slice(start, stop))
    loss, merged = call.merge(_gather(local, call.group))  # (P, 6, N)
    return call.reduce(loss, h2.dtype), merged


def _linear_backward(call: _Call, h2, w, b, merged, upstream, rows, need):
    """Pass 2: (∂/∂h partial to this rank, ∂/∂W_r, ∂/∂b_r) in the compute dtype, ``upstream`` a scalar or (N,)."""
    need_h, need_w, need_b = need
    n = h2.shape[0]
    compute = call.compute
    wc, bc = w.detach().to(compute), None if b is None else b.detach().to(compute)
    h2 = h2.detach()
    upstream = upstream.detach().to(device=h2.device, dtype=torch.float64)
    per_row = upstream.dim() > 0
    upstream = upstream.reshape(-1) if per_row else upstream
    grad_h = torch.empty(h2.shape, dtype=compute, device=h2.device) if need_h else None
    grad_w = torch.zeros(wc.shape, dtype=compute, device=h2.device) if need_w else None
    grad_b = torch.zeros(wc.shape[:1], dtype=compute, device=h2.device) if need_b else None
    buffer = torch.empty((min(rows, n), wc.shape[0]), dtype=compute, device=h2.device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = slice(start, stop)
        hc, logits = _chunk_logits(h2, wc, bc, start, stop, buffer)
        g = call.gradient(logits, logits, block, merged, upstream[block] if per_row else upstream)  # in place
        if grad_h is not None:
            torch.mm(g, wc, out=grad_h[block])
        if grad_w is not None:
            grad_w.addmm_(g.T, hc)
        if grad_b is not None:
            grad_b.add_(g.sum(dim=0))
        del g, logits, hc
    return grad_h, grad_w, grad_b


def _linear_fused(call: _Call, h2, w, b, rows, need):
    """``"mean"``/``"sum"``: each chunk's logits computed once, in the forward: the matmul, this rank's
    statistics, one all-gather of the chunk's statistics (6 float64 per row), the merge, the gradient in place,
    pushed through the projection. Three matmuls per chunk in all. Returns (the loss in h2's dtype, the
    gradients of the reduced loss in the compute dtype: ∂/∂h (already summed over the group), ∂/∂W_r, ∂/∂b_r,
    each None unless ``need`` asks for it)."""
    need_h, need_w, need_b = need
    compute = torch.float64 if h2.dtype == torch.float64 else torch.float32
    call.setup(compute, h2.device)
    n = h2.shape[0]
    device = h2.device
    wc, bc = w.to(compute), None if b is None else b.to(compute)
    grad_h = torch.empty(h2.shape, dtype=compute, device=device) if need_h else None
    grad_w = torch.zeros(wc.shape, dtype=compute, device=device) if need_w else None
    grad_b = torch.zeros(wc.shape[:1], dtype=compute, device=device) if need_b else None
    buffer = torch.empty((min(rows, n), wc.shape[0]), dtype=compute, device=device)
    losses = torch.empty(n, dtype=torch.float64, device=device)
    denominator = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        block = slice(start, stop)
        hc, logits = _chunk_logits(h2, wc, bc, start, stop, buffer)
        local = call.statistics(logits, block)
        # the row scales without the mean's 1/D (known after the last chunk): every gradient is linear in it
        losses[block], merged = call.merge(_gather(local, call.group), block, reduction="sum")
        denominator = denominator + call.denominator
        g = call.gradient(logits, logits, block, merged, factor_rows=slice(None))  # in place
        if grad_h is not None:
            torch.mm(g, wc, out=grad_h[block])
        if grad_w is not None:
            grad_w.addmm_(g.T, hc)
        if grad_b is not None:
            grad_b.add_(g.sum(dim=0))
        del g, logits, hc
    opts = call.opts
    if opts.denominator is not None:
        denominator = _denominator(opts.denominator, device)
    call.denominator = denominator
    value = call.reduce(losses, h2.dtype)
    if opts.reduction == "mean":
        scale = spec.reduction_scale("mean", denominator, where=torch.where).to(compute)
        for grad in (grad_h, grad_w, grad_b):
            if grad is not None:
                grad.mul_(scale)
    if grad_h is not None:  # every rank holds part of it: summed here, so callers must not reduce it again
        grad_h = _all_reduce(grad_h, call.group)
    return value, (grad_h, grad_w, grad_b)


class _ParallelLinear(torch.autograd.Function):
    """``"mean"``/``"sum"``: everything in the forward (:func:`_linear_fused`, the input's gradient all-reduced
    there); the backward scales the gradients by the upstream scalar. ``"none"``: pass 1 and the collectives in
    the forward; pass 2 (the logits recomputed) and the all-reduce of the input's gradient in the backward,
    with the upstream gradient (per row) folded into each row's scale."""

    @staticmethod
    def forward(ctx, h2, w, b, call, rows, need):
        ctx.call, ctx.dtypes = call, (h2.dtype, w.dtype, None if b is None else b.dtype)
        if call.opts.reduction != "none":
            value, ctx.grads = _linear_fused(call, h2.detach(), w.detach(), _detach(b), rows, need)
            return value
        value, merged = _linear_forward(call, h2.detach(), w.detach(), _detach(b), rows)
        ctx.save_for_backward(h2, w, b)
        ctx.merged, ctx.rows = merged, rows
        ctx.grads = None
        return value

    @staticmethod
    def backward(ctx, grad_value):
        if torch.is_grad_enabled():  # create_graph=True: the single-device rule, first-order only
            from lsx.torch._linear import _FIRST_ORDER

            raise RuntimeError(_FIRST_ORDER)
        call = ctx.call
        if ctx.grads is not None:
            grads, ctx.grads = ctx.grads, None
            scale = grad_value.detach()
            grads = [None if g is None else g * scale.to(g.dtype) for g in grads]
        else:
            h2, w, b = ctx.saved_tensors
            need = (call.input_grad, ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
            grads = list(_linear_backward(call, h2, w, b, ctx.merged, grad_value, ctx.rows, need))
            if grads[0] is not None:  # every rank holds part of it: summed here, so callers must not reduce it again
                grads[0] = _all_reduce(grads[0], call.group)
        outputs = [None if g is None or dtype is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        if not ctx.needs_input_grad[0]:
            outputs[0] = None
        return (*outputs, None, None, None)
