"""The fused engine behind :mod:`lsx.torch`: one custom op that returns the loss and its gradient.

The forward pass computes the log-sum-exp once and writes ``(Σ w q + 2 s w_y L)·p − w∘q`` (already divided
by the mean's denominator) into one logits-sized buffer; autograd saves only that buffer and the backward
pass scales it by the incoming gradient. The op is registered with ``torch.library.custom_op`` so that
``torch.compile`` (``fullgraph=True``) treats it as one opaque node.

Engines, chosen per call:

- CPU, contiguous float32/float64 logits and Numba installed: the fused Numba kernel of :mod:`lsx.numpy`,
  on zero-copy NumPy views of the tensors.
- everything else (CUDA, float16/bfloat16, strided logits, no Numba): plain torch ops; float16/bfloat16
  accumulate in float32, in row chunks that bound the float32 temporaries.

Value checks (labels in range, weight finite and >= 0, class_mask) run on CPU tensors and raise
``ValueError``. On other devices they would synchronise the device, so they are skipped: an out-of-range
label gives NaN for its element (and its gradient row) instead of an error.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import numpy as np
import torch

from lsx import spec

__all__ = ["cross_entropy"]

_OP_NAME = "lsx::fused_cross_entropy"
#: float16/bfloat16 logits are processed in row chunks of about this many elements, to bound the float32
#: temporaries (smaller chunks only add per-op overhead: measured slower on CPU too).
_CHUNK_ELEMENTS = 1 << 24


def cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, opts: spec.Options, axis: int | None, weight: Any, class_mask: Any
) -> torch.Tensor:
    """The loss of ``logits`` against ``target`` under validated scalar ``opts``; differentiable in ``logits``.

    ``weight`` and ``class_mask`` are tensors (or array-likes) checked here, by value on the CPU.
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {_describe(logits)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {_describe(target)}")
    kind = _target_kind(target.dtype)
    if kind == "probs" and target.requires_grad and torch.is_grad_enabled():
        raise ValueError("lsx.torch.loss does not differentiate the target probabilities; pass target.detach()")
    if axis is None:  # torch's rule: classes on dim 1, or dim 0 for a single (C,) row
        axis = 1 if logits.dim() >= 2 else 0
    weight = _as_tensor(weight, "weight", logits.device)
    class_mask = _as_tensor(class_mask, "class_mask", None)
    layout = spec.check_layout(
        tuple(logits.shape),
        tuple(target.shape),
        kind,
        opts,
        axis=axis,
        weight_shape=None if weight is None else tuple(weight.shape),
        class_mask_shape=None if class_mask is None else tuple(class_mask.shape),
    )
    k = layout.num_classes
    if logits.dim() == 2 and layout.axis == 1:  # already (N, K): no views to make
        x2, t2, lead_shape = logits, target, logits.shape[:1]
    else:
        moved = logits.movedim(layout.axis, -1)
        lead_shape = moved.shape[:-1]
        x2 = moved.reshape(-1, k)
        t2 = target.reshape(-1) if kind == "index" else target.movedim(layout.axis, -1).reshape(-1, k)
    if _plain_eager(x2, t2, weight, class_mask):
        if x2.requires_grad and torch.is_grad_enabled():
            value = _EagerFused.apply(x2, t2, weight, class_mask, opts)
        else:
            value, _ = _fused_impl(x2, t2, weight, class_mask, opts)
    else:
        value, _ = _fused(
            x2,
            t2,
            weight,
            class_mask,
            opts.label_smoothing,
            opts.spread,
            opts.ignore_index,
            opts.z_loss,
            opts.normalize,
            opts.reduction,
            opts.empty_mean,
        )
    return value.reshape(lead_shape) if opts.reduction == "none" else value


_TARGET_KINDS: dict[torch.dtype, str] = {}


def _target_kind(dtype: torch.dtype) -> str:
    kind = _TARGET_KINDS.get(dtype)
    if kind is None:
        kind = _TARGET_KINDS[dtype] = spec.target_kind(dtype)
    return kind


def _plain_eager(*tensors: torch.Tensor | None) -> bool:
    """Whether the call can bypass the custom op's dispatch (measured at about half of a small call's time).

    Only for plain tensors in eager mode: under ``torch.compile``, ``torch.func`` transforms, fake tensors,
    tensor subclasses or dispatch/function modes the custom op is what those systems know how to handle.
    """
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return all(t is None or (type(t) is torch.Tensor and not wrapped(t)) for t in tensors)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype}"
    return type(value).__name__


def _as_tensor(value: Any, name: str, device: torch.device | None) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = value if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if name == "weight":
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise TypeError(f"weight must be a real tensor, got dtype {tensor.dtype}")
        return tensor.detach().to(device=device)
    if tensor.dtype != torch.bool:
        raise TypeError(f"class_mask must be a boolean tensor, got dtype {tensor.dtype}")
    return tensor.detach()


# --------------------------------------------------------------------------------------------------------
# The custom op: (loss, gradient) in one call
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op(_OP_NAME, mutates_args=())
def _fused(
    x2: torch.Tensor,
    t2: torch.Tensor,
    weight: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    label_smoothing: float,
    spread: str,
    ignore_index: int | None,
    z_loss: float,
    normalize: bool,
    reduction: str,
    empty_mean: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    opts = spec.Options(
        label_smoothing=label_smoothing,
        spread=spread,  # type: ignore[arg-type]
        ignore_index=ignore_index,
        z_loss=z_loss,
        normalize=normalize,
        reduction=reduction,  # type: ignore[arg-type]
        empty_mean=empty_mean,  # type: ignore[arg-type]
    )
    return _fused_impl(x2, t2, weight, class_mask, opts)


def _fused_impl(x2, t2, weight, class_mask, opts: spec.Options) -> tuple[torch.Tensor, torch.Tensor]:
    """The op's body: (the reduced loss, or per-element losses, in x2's dtype; the gradient buffer)."""
    kind = "probs" if t2.is_floating_point() else "index"
    k = x2.shape[1]
    on_cpu = x2.device.type == "cpu"
    mask_np = None
    if class_mask is not None and class_mask.device.type == "cpu":
        mask_np = spec.check_class_mask(class_mask.numpy(), k, opts)
    if on_cpu:
        weight_np = None if weight is None else spec.check_weight(weight.to(torch.float64).numpy(), k)
        if kind == "index":
            _check_labels(t2.numpy(), k, opts, mask_np)
        elif mask_np is not None:
            spec.check_probability_target_mask(t2.to(torch.float64).numpy(), -1, mask_np)

    kernel = _numba_engine() if on_cpu and x2.dtype in (torch.float32, torch.float64) and x2.is_contiguous() else None
    if kernel is not None:
        return _run_numba(kernel, x2, t2, kind, opts, weight_np, mask_np)
    else:
        grad = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        per_element, denominator = _torch_engine(x2, t2, kind, opts, weight, class_mask, grad)
    return _reduce(per_element, denominator, opts, x2.dtype), grad


@_fused.register_fake
def _(x2, t2, weight, class_mask, label_smoothing, spread, ignore_index, z_loss, normalize, reduction, empty_mean):
    value_shape = (x2.shape[0],) if reduction == "none" else ()
    return x2.new_empty(value_shape), x2.new_empty(x2.shape)


def _setup_context(ctx, inputs, output) -> None:
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.set_materialize_grads(False)  # no logits-sized zeros for the (unused) gradient of ``grad``
    ctx.save_for_backward(grad)
    ctx.per_element = inputs[9] == "none"


def _backward(ctx, grad_value, _grad_of_grad):
    (grad,) = ctx.saved_tensors
    none = (None,) * 10
    if torch.is_grad_enabled() and not torch.compiler.is_compiling():
        raise RuntimeError(
            "lsx.torch.loss supports first-order gradients only (its gradient is computed in the forward pass); "
            "double backward / create_graph=True is not supported"
        )
    if grad_value is None:
        return (None,) + none
    scale = grad_value.to(grad.dtype)
    scale = scale.reshape(-1, 1) if ctx.per_element else scale
    if torch.compiler.is_compiling() or _is_traced(grad) or _graph_kept():
        return (grad * scale,) + none
    # The graph is released after this call: reuse the saved buffer as the result (no copy), so that
    # fwd+bwd holds a single logits-sized buffer; skip the pass for the usual loss.backward() (reading the
    # scalar is one tiny device read on accelerators).
    if scale.numel() == 1 and float(scale) == 1.0:
        return (grad,) + none
    return (grad.mul_(scale),) + none


def _graph_kept() -> bool:
    """Whether this backward runs with retain_graph=True (then the saved buffer must stay intact)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else bool(keep_graph())


def _is_traced(tensor: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(tensor, FakeTensor) or torch._C._functorch.is_functorch_wrapped_tensor(tensor)


_fused.register_autograd(_backward, setup_context=_setup_context)


class _EagerFused(torch.autograd.Function):
    """The op's autograd in eager mode, without the custom op's dispatch: same forward, same backward."""

    @staticmethod
    def forward(ctx, x2, t2, weight, class_mask, opts):
        value, grad = _fused_impl(x2, t2, weight, class_mask, opts)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(grad)
        ctx.per_element = opts.reduction == "none"
        return value

    @staticmethod
    def backward(ctx, grad_value):
        return _backward(ctx, grad_value, None)[:5]


def _check_labels(labels: np.ndarray, k: int, opts: spec.Options, mask: np.ndarray | None) -> None:
    """``spec.check_labels``, after a quick pass that settles the usual case (all labels valid) in a few ops."""
    if mask is None and labels.dtype.kind == "i" and labels.size:
        unsigned, low, high = _unsigned_view(labels.dtype)
        as_unsigned = labels.view(unsigned)  # negative labels become huge
        if as_unsigned.max() < k:
            return
        ignore = opts.ignore_index
        if ignore is not None and not 0 <= ignore < k and low <= ignore <= high:
            if np.where(labels == ignore, 0, as_unsigned).max() < k:
                return
    spec.check_labels(labels, k, opts, mask)


@functools.cache
def _unsigned_view(dtype: np.dtype) -> tuple[np.dtype, int, int]:
    limits = np.iinfo(dtype)
    return np.dtype(dtype.str.replace("i", "u")), int(limits.min), int(limits.max)


def _reduce(per_element: torch.Tensor, denominator: torch.Tensor, opts: spec.Options, dtype: torch.dtype):
    if opts.reduction == "none":
        return per_element.to(dtype)
    total = per_element.sum()
    if opts.reduction == "sum":
        return total.to(dtype)
    empty = float("nan") if opts.empty_mean == "nan" else 0.0
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator != 0, total / safe, torch.full_like(total, empty)).to(dtype)


def _mean_scale(denominator: torch.Tensor) -> torch.Tensor:
    """1/D, or 0 when every element is ignored (the gradient of an empty mean is zero, like torch)."""
    safe = torch.where(denominator != 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator != 0, 1.0 / safe, torch.zeros_like(denominator))


# --------------------------------------------------------------------------------------------------------
# Numba engine (CPU): zero-copy NumPy views of the tensors
# --------------------------------------------------------------------------------------------------------
def _numba_engine():
    return _numba_kernel()


@functools.cache
def _numba_kernel():
    from lsx import numpy as lsx_numpy

    return lsx_numpy._numba_kernel()


_KEYWORDS: dict[Any, frozenset[str]] = {}


def _keywords(kernel) -> frozenset[str]:
    """The keyword parameters ``kernel`` accepts (cached: ``inspect.signature`` dominates a small call)."""
    known = _KEYWORDS.get(kernel)
    if known is None:
        try:
            known = frozenset(inspect.signature(kernel).parameters)
        except (TypeError, ValueError):
            known = frozenset()
        _KEYWORDS[kernel] = known
    return known


def _run_numba(kernel, x2, t2, kind, opts, weight_np, mask_np):
    compute = np.float64 if x2.dtype == torch.float64 else np.float32
    x_np = x2.detach().numpy()
    t_np = t2.numpy() if kind == "index" else t2.detach().to(x2.dtype).contiguous().numpy()
    keywords = _keywords(kernel)
    extra: dict[str, Any] = {}
    grad = None
    if "out2" in keywords:  # write straight into the buffer that autograd will save
        # allocated by NumPy, which asks for huge pages: measured ~0.4 s fewer page faults per 512 MiB than torch.empty
        extra["out2"] = np.empty(x2.shape, compute)
        grad = torch.from_numpy(extra["out2"])
    if "scale_mean" in keywords:  # fold the mean's 1/D into the gradient pass
        extra["scale_mean"] = True
    per_element, denominator, grad_np = kernel(x_np, t_np, kind, opts, weight_np, mask_np, compute, True, **extra)
    if grad is None or not np.shares_memory(grad_np, extra["out2"]):
        grad = torch.from_numpy(np.ascontiguousarray(grad_np, dtype=compute))
    if opts.reduction == "mean" and "scale_mean" not in extra:
        grad.mul_(1.0 / denominator if denominator != 0 else 0.0)
    # reduced in NumPy, as lsx.numpy does: a few torch ops on scalars would cost more than the kernel
    per_element = np.asarray(per_element, dtype=compute)
    if opts.reduction == "none":
        return torch.from_numpy(per_element), grad
    total = per_element.sum(dtype=compute)
    if opts.reduction == "mean":
        empty = compute(np.nan if opts.empty_mean == "nan" else 0.0)
        total = total / compute(denominator) if denominator != 0 else empty
    return torch.from_numpy(np.asarray(total, dtype=compute)), grad


# --------------------------------------------------------------------------------------------------------
# Plain-torch engine (any device)
# --------------------------------------------------------------------------------------------------------
def _xlogx(q: float) -> float:
    return q * float(np.log(q)) if q > 0 else 0.0


def _torch_engine(x2, t2, kind, opts, weight, class_mask, grad):
    """Fill ``grad`` (N, K) and return the per-element loss (N,) and the mean's denominator, as tensors."""
    n, k = x2.shape
    device = x2.device
    compute = torch.float64 if x2.dtype == torch.float64 else torch.float32
    x2 = x2.detach()
    mask = None if class_mask is None else class_mask.to(device)
    valid_count = k if mask is None else int(mask.sum())  # one small sync on accelerators, with class_mask only
    a, b = spec.smoothing_coefficients(opts, valid_count)
    w = None if weight is None else weight.to(device=device, dtype=compute)
    if w is not None and mask is not None:
        w = w.masked_fill(~mask, 0)
    total_weight = float(valid_count) if w is None else w.sum()
    z = opts.z_loss

    if kind == "index":
        labels = t2.to(device)
        active = (
            torch.ones(n, dtype=torch.bool, device=device) if opts.ignore_index is None else labels != opts.ignore_index
        )
        y = torch.where(active, labels, torch.zeros_like(labels))
        # On the CPU the labels were checked; elsewhere a bad label turns its element into NaN (no sync).
        invalid = (y < 0) | (y >= k)
        y = y.clamp(0, k - 1)
        if mask is not None:
            invalid = invalid | ~mask[y]
        w_y = torch.ones(n, dtype=compute, device=device) if w is None else w[y]
        w_y = torch.where(active, w_y, torch.zeros_like(w_y))
        denominator = w_y.sum()
        row_coef = a * w_y + b * total_weight  # Σ_c w_c q_c
        target = None
    else:
        active = torch.ones(n, dtype=torch.bool, device=device)
        invalid = None
        w_y = torch.ones(n, dtype=compute, device=device)
        denominator = torch.tensor(float(n), dtype=compute, device=device)
        y = row_coef = None
        target = t2.detach().to(device)
    row_scale = w_y.new_ones(()) if opts.reduction != "mean" else _mean_scale(denominator)
    bw = None if b == 0 else (torch.full((k,), b, dtype=compute, device=device) if w is None else b * w)
    if bw is not None and mask is not None:
        bw = bw.masked_fill(~mask, 0)

    per_element = torch.empty(n, dtype=compute, device=device)
    rows = max(1, _CHUNK_ELEMENTS // max(k, 1)) if compute != x2.dtype else max(n, 1)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        x = x2[start:stop].to(compute)
        g = grad[start:stop] if compute == x2.dtype else torch.empty(x.shape, dtype=compute, device=device)
        x_soft = x if mask is None else x.masked_fill(~mask, float("-inf"))
        row_max = x_soft.amax(dim=1, keepdim=True)
        row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        torch.sub(x_soft, row_max, out=g)
        g.exp_()
        sum_exp = g.sum(dim=1, keepdim=True)
        lse = (row_max + sum_exp.log()).squeeze(1)
        x_lin = x if mask is None else x.masked_fill(~mask, 0)
        act = active[start:stop]
        wy = w_y[start:stop]
        if kind == "index":
            yc = y[start:stop].unsqueeze(1)
            coef = row_coef[start:stop]
            loss = torch.zeros_like(lse)
            if a != 0:
                loss = loss + a * wy * (lse - x.gather(1, yc).squeeze(1))
            if b != 0:
                lin = x_lin.sum(dim=1) if w is None else x_lin @ w
                loss = loss + (b * total_weight) * lse - b * lin
            if opts.normalize:
                loss = loss + wy * _xlogx(a + b) + _xlogx(b) * (total_weight - wy)
        else:
            q = a * target[start:stop].to(compute) + b
            if mask is not None:
                q = q.masked_fill(~mask, 0)
            wq = q if w is None else q * w
            nll = torch.where(wq > 0, lse.unsqueeze(1) - x, torch.zeros_like(x))
            loss = (wq * nll).sum(dim=1)
            if opts.normalize:
                xlogx = torch.where(q > 0, q * torch.where(q > 0, q, torch.ones_like(q)).log(), torch.zeros_like(q))
                loss = loss + (xlogx if w is None else xlogx * w).sum(dim=1)
            coef = wq.sum(dim=1)
        if z != 0:
            loss = loss + z * wy * lse * lse
        # grad = (Σ w q + 2 s w_y L)·p − w∘q, each row times its share of the reduction (0 when ignored)
        scale = torch.where(act, row_scale.expand_as(lse), torch.zeros_like(lse))
        g.mul_(((coef + (2 * z) * wy * lse) * scale / sum_exp.squeeze(1)).unsqueeze(1))
        if kind == "index":
            if bw is not None:
                g.addcmul_(scale.unsqueeze(1), bw.unsqueeze(0), value=-1)
            if a != 0:
                g.scatter_add_(1, yc, (-a * wy * scale).unsqueeze(1))
        else:
            g.addcmul_(scale.unsqueeze(1), wq, value=-1)
        if mask is not None:
            g.masked_fill_(~mask, 0)
        g.masked_fill_(~act.unsqueeze(1), 0)
        loss = torch.where(act, loss, torch.zeros_like(loss))
        if invalid is not None:
            bad = invalid[start:stop] & act
            g.masked_fill_(bad.unsqueeze(1), float("nan"))
            loss = loss.masked_fill(bad, float("nan"))
        per_element[start:stop] = loss
        if g.data_ptr() != grad[start:stop].data_ptr():
            grad[start:stop] = g
    return per_element, denominator
