"""The Numba engine of :mod:`lsx.torch`: lsx.numpy's Numba kernels on zero-copy NumPy views of CPU tensors.

- :func:`run`: the fused single-slice kernel (``lsx.numpy._numba.forward_backward``: loss and gradient in one
  sweep per row), for ``loss`` on one device;
- :func:`prepare` / :func:`chunk`: the same kernel on ``linear_loss``'s chunks of rows, in place in the
  chunk's logits buffer, with per-row gradient scales;
- :func:`statistics` / :func:`gradient`: the two steps of :mod:`lsx.torch._engines` over a slice of the class
  axis (``process_group=``), on the kernels ``lsx.numpy._numba.statistics`` / ``gradient``.

CPU float32/float64 logits only (the caller chooses the engine).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, NamedTuple

import numpy as np
import torch

from lsx import spec

__all__ = ["chunk", "gradient", "kernel", "keywords", "prepare", "reduce_numpy", "run", "statistics"]


@functools.cache
def _kernels() -> Any:
    """lsx.numpy's Numba module, or None without Numba."""
    try:
        from lsx.numpy import _numba as kernels
    except ImportError:  # pragma: no cover - depends on the environment
        return None
    return kernels if kernels.AVAILABLE else None


def kernel() -> Any:
    """The fused kernel (``forward_backward``'s contract), or None without Numba."""
    return _fused_kernel()


@functools.cache
def _fused_kernel() -> Any:
    from lsx import numpy as lsx_numpy

    return lsx_numpy._numba_kernel()


_KEYWORDS: dict[Any, frozenset[str]] = {}


def keywords(fn) -> frozenset[str]:
    """The keyword parameters ``fn`` accepts (cached: ``inspect.signature`` dominates a small call)."""
    known = _KEYWORDS.get(fn)
    if known is None:
        try:
            known = frozenset(inspect.signature(fn).parameters)
        except (TypeError, ValueError):
            known = frozenset()
        _KEYWORDS[fn] = known
    return known


@functools.cache
def _run_keywords(fn) -> tuple[bool, bool]:
    """Whether the fused kernel ``fn`` takes ``out2`` and ``scale_mean`` (settled once per kernel)."""
    accepted = keywords(fn)
    return "out2" in accepted, "scale_mean" in accepted


def _np_dtype(dtype: torch.dtype) -> type:
    return np.float64 if dtype == torch.float64 else np.float32


# --------------------------------------------------------------------------------------------------------
# The fused kernel: one device
# --------------------------------------------------------------------------------------------------------
def run(fn, x2, t2, kind, opts, weight_np, mask_np, sw_np=None):
    """(per-element losses as a NumPy array in the compute dtype, the mean's denominator, the gradient) of the
    fused kernel ``fn`` on the contiguous CPU logits ``x2``."""
    compute = _np_dtype(x2.dtype)
    x_np = x2.detach().numpy()
    t_np = t2.numpy() if kind == "index" else t2.detach().to(x2.dtype).contiguous().numpy()
    takes_out2, takes_scale_mean = _run_keywords(fn)
    extra: dict[str, Any] = {}
    grad = None
    if takes_out2:  # write straight into the buffer that autograd will save
        # allocated by NumPy, which asks for huge pages: measured ~0.4 s fewer page faults per 512 MiB than torch.empty
        extra["out2"] = np.empty(x2.shape, compute)
        grad = torch.from_numpy(extra["out2"])
    if takes_scale_mean:  # fold the mean's 1/D into the gradient pass
        extra["scale_mean"] = True
    if sw_np is not None:
        extra["sample_weight"] = sw_np
    per_element, denominator, grad_np = fn(x_np, t_np, kind, opts, weight_np, mask_np, compute, True, **extra)
    if grad is None or grad_np is not extra["out2"]:  # (the kernel returns out2 itself when it wrote there)
        grad = torch.from_numpy(np.ascontiguousarray(grad_np, dtype=compute))
    if opts.reduction == "mean" and not takes_scale_mean:
        grad.mul_(1.0 / denominator if denominator != 0 else 0.0)
    return np.asarray(per_element, dtype=compute), denominator, grad


def reduce_numpy(per_element: np.ndarray, denominator: float, opts: spec.Options) -> torch.Tensor:
    """The reduced loss from the kernel's per-element losses, in NumPy as lsx.numpy does (a few torch ops on
    scalars would cost more than the kernel on small inputs)."""
    compute = per_element.dtype.type
    if opts.reduction == "none":
        return torch.from_numpy(per_element)
    total = per_element.sum(dtype=compute)
    if opts.reduction == "mean":
        empty = compute(np.nan if opts.empty_mean == "nan" else 0.0)
        total = total / compute(denominator) if denominator != 0 else empty
    return torch.from_numpy(np.asarray(total, dtype=compute))


# --------------------------------------------------------------------------------------------------------
# The fused kernel on chunks of rows (linear_loss)
# --------------------------------------------------------------------------------------------------------
class Prepared(NamedTuple):
    """The fused kernel with the chunk-independent arguments, checked once for the whole call."""

    kernel: Any
    kind: str
    opts: spec.Options
    weight: np.ndarray | None
    mask: np.ndarray | None
    compute: type


def prepare(x_dtype, t2, weight, class_mask, opts, softcap) -> Prepared | None:
    """The fused kernel for chunks of CPU float32/float64 logits when it takes them (in place, soft-capping in
    its sweep, per-row gradient scales); None when it cannot."""
    fn = kernel()
    if fn is None or not {"out2", "sample_weight"} <= keywords(fn):
        return None
    kind = "probs" if t2.is_floating_point() else "index"
    k = weight.shape[0] if weight is not None else None
    v = class_mask.shape[0] if class_mask is not None else k
    mask_np = None if class_mask is None else spec.check_class_mask(class_mask.numpy(), v, opts)
    weight_np = None if weight is None else spec.check_weight(weight.to(torch.float64).numpy(), weight.shape[0])
    return Prepared(fn, kind, dataclasses.replace(opts, softcap=softcap), weight_np, mask_np, _np_dtype(x_dtype))


def chunk(prepared: Prepared, logits, tc, row_scale, want_grad) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(per-element losses, ∂Σ row_scale·loss/∂logits) of one chunk; the gradient overwrites ``logits``
    (contiguous, the compute dtype) in place."""
    x_np = logits.numpy()
    t_np = tc.numpy() if prepared.kind == "index" else tc.to(logits.dtype).contiguous().numpy()
    scale_np = None if row_scale is None else row_scale.detach().to(torch.float64).numpy()
    per_element, _, grad_np = prepared.kernel(
        x_np, t_np, prepared.kind, prepared.opts, prepared.weight, prepared.mask, prepared.compute, want_grad,
        out2=x_np if want_grad else None, sample_weight=scale_np,
    )  # fmt: skip
    grad = None
    if want_grad:
        grad = logits if np.shares_memory(grad_np, x_np) else torch.from_numpy(grad_np)
    return torch.from_numpy(np.asarray(per_element)), grad


# --------------------------------------------------------------------------------------------------------
# The two steps (a slice of the class axis)
# --------------------------------------------------------------------------------------------------------
def _common(x, labels, probs, weight, class_mask) -> dict[str, Any]:
    compute = _np_dtype(x.dtype)
    return dict(
        labels=None if labels is None else labels.detach().to(torch.int64).contiguous().numpy(),
        probs=None if probs is None else probs.detach().to(x.dtype).contiguous().numpy(),
        weight=None if weight is None else weight.detach().to(torch.float64).numpy().astype(compute),
        class_mask=None if class_mask is None else class_mask.detach().contiguous().numpy(),
    )


def statistics(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    labels=None,
    probs=None,
    weight=None,
    class_mask=None,
    softcap=None,
    a: Any = 1.0,
    b: Any = 0.0,
    smoothing=False,
    normalize=False,
    offset=0,
    num_classes=None,
    ignore_index=None,
    exclude_target=False,
) -> None:
    """The six statistics per row (the contract of :mod:`lsx.torch._engines`) into ``out`` (6, n)."""
    x_np = x.detach().contiguous().numpy()
    direct = out.dtype == torch.float64 and out.is_contiguous()
    out_np = out.numpy() if direct else np.empty(tuple(out.shape), np.float64)
    _kernels().statistics(
        x_np,
        out_np,
        **_common(x, labels, probs, weight, class_mask),
        softcap=softcap,
        a=float(a),
        b=float(b),
        smoothing=smoothing,
        normalize=normalize,
        offset=offset,
        num_classes=num_classes,
        ignore_index=ignore_index,
        exclude_target=exclude_target,
    )
    if not direct:
        out.copy_(torch.from_numpy(out_np))


def gradient(
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    local_max,
    p_scale,
    row_scale,
    labels=None,
    probs=None,
    weight=None,
    class_mask=None,
    softcap=None,
    a: Any = 1.0,
    b: Any = 0.0,
    smoothing=False,
    offset=0,
    num_classes=None,
    ignore_index=None,
    nan_rows=None,
) -> None:
    """The block's gradient from the merged per-row factors into ``grad`` (may be ``x`` itself)."""
    in_place = grad.data_ptr() == x.data_ptr() and grad.shape == x.shape and grad.stride() == x.stride()
    x_c = x.detach()
    if not x_c.is_contiguous():
        x_c, in_place = x_c.contiguous(), False
    direct = grad.dtype == x.dtype and grad.is_contiguous()
    target = x_c if in_place and direct else (grad if direct else torch.empty_like(x_c))
    rows = torch.stack([local_max, p_scale, row_scale]).to(torch.float64)
    x_np = x_c.numpy()
    _kernels().gradient(
        x_np,
        x_np if target is x_c else target.detach().numpy(),
        rows=rows.numpy(),
        **_common(x, labels, probs, weight, class_mask),
        softcap=softcap,
        a=float(a),
        b=float(b),
        smoothing=smoothing,
        offset=offset,
        num_classes=num_classes,
        ignore_index=ignore_index,
        nan_rows=None if nan_rows is None else nan_rows.numpy(),
    )
    if target is not grad and not (in_place and direct):
        grad.copy_(target)
