"""NumPy backend: ``loss`` and ``loss_and_grad`` for NumPy arrays, class axis ``-1`` by default.

Uses the fused Numba kernel (:mod:`lsx.numpy._numba`) when Numba is installed and the pure-NumPy path
below otherwise; both give the same numbers. Accumulation is float32 for float16/float32 inputs and float64
for float64 inputs; outputs keep the input's dtype.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lsx import spec
from lsx.spec import default

__all__ = ["loss", "loss_and_grad"]


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
    convention: str | None = None,
) -> np.ndarray:
    opts = spec.resolve_options(
        convention,
        label_smoothing=label_smoothing,
        spread=spread,
        weight=weight,
        ignore_index=ignore_index,
        z_loss=z_loss,
        normalize=normalize,
        class_mask=class_mask,
        reduction=reduction,
        empty_mean=empty_mean,
    )
    value, _ = _compute(logits, target, opts, axis, want_grad=False, out=None)
    return value


def loss_and_grad(
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
    convention: str | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The loss and its gradient with respect to ``logits`` (of the sum, for ``reduction="none"``).

    ``out``: an array shaped and typed like ``logits`` to receive the gradient; ``out=logits`` overwrites
    the logits with their gradient (opt-in, saves a logits-sized buffer).
    """
    opts = spec.resolve_options(
        convention,
        label_smoothing=label_smoothing,
        spread=spread,
        weight=weight,
        ignore_index=ignore_index,
        z_loss=z_loss,
        normalize=normalize,
        class_mask=class_mask,
        reduction=reduction,
        empty_mean=empty_mean,
    )
    value, grad = _compute(logits, target, opts, axis, want_grad=True, out=out)
    assert grad is not None
    return value, grad


_DOC = spec.LOSS_DOC + """Example:
    >>> import numpy as np, lsx.numpy
    >>> x = np.array([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
    >>> y = np.array([2, 1, 0])
    >>> round(float(lsx.numpy.loss(x, y, label_smoothing=0.3)), 4)
    1.3883
    >>> round(float(lsx.numpy.loss(x, y, label_smoothing=0.3, spread="others")), 4)
    1.4178
"""
loss.__doc__ = _DOC
loss_and_grad.__doc__ = _DOC.replace(
    "Returns:", "    out: array to receive the gradient (``out=logits`` works in place).\n\nReturns:", 1
).replace("else a scalar.", "else a scalar; and the gradient, shaped and typed like ``logits``.", 1)


# --------------------------------------------------------------------------------------------------------
def _compute(logits: Any, target: Any, opts: spec.Options, axis: int, *, want_grad: bool, out: np.ndarray | None):
    x = np.asarray(logits)
    t = np.asarray(target)
    layout, weight, mask = spec.validate(x, t, opts, axis)
    if out is not None and (not isinstance(out, np.ndarray) or out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"out must be an ndarray of shape {x.shape} and dtype {x.dtype}, got {_describe(out)}")
    if out is not None and not out.flags.writeable:
        raise ValueError("out must be writeable")

    compute = np.float64 if x.dtype == np.float64 else np.float32
    last = layout.axis == x.ndim - 1
    x2 = x if last else np.moveaxis(x, layout.axis, -1)
    lead_shape = x2.shape[:-1]
    k = layout.num_classes
    x2 = x2.reshape(-1, k)
    if layout.kind == "index":
        t2 = t.reshape(-1)
    else:
        t2 = (t if last else np.moveaxis(t, layout.axis, -1)).reshape(-1, k)

    kernel = _numba_kernel()
    if kernel is not None:
        # the kernel writes straight into ``out`` when it already has the kernel's row layout and dtype
        out2 = None
        if want_grad and out is not None and last and out.dtype == compute and out.flags.c_contiguous:
            out2 = out.reshape(-1, k)
        per_element, denominator, grad2 = kernel(
            x2, t2, layout.kind, opts, weight, mask, compute, want_grad, out2, scale_mean=True
        )
    else:
        per_element, denominator, grad2 = _numpy_engine(x2, t2, layout.kind, opts, weight, mask, compute, want_grad)
        if want_grad and opts.reduction == "mean":
            grad2 *= compute(1.0 / denominator) if denominator != 0 else compute(0.0)

    value = _reduce(opts, per_element, denominator, compute).astype(x.dtype)
    if opts.reduction == "none":
        value = value.reshape(lead_shape)
    if not want_grad:
        return value, None
    if out is not None and kernel is not None and out2 is not None and grad2 is out2:
        return value, out
    grad = grad2.reshape(lead_shape + (k,))
    if not last:
        grad = np.moveaxis(grad, -1, layout.axis)
    if out is None:
        return value, grad.astype(x.dtype, copy=False)
    np.copyto(out, grad, casting="same_kind")
    return value, out


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray of shape {value.shape} and dtype {value.dtype}"
    return type(value).__name__


def _reduce(opts: spec.Options, per_element: np.ndarray, denominator: float, compute: type) -> np.ndarray:
    if opts.reduction == "none":
        return per_element
    total = per_element.sum(dtype=compute)
    if opts.reduction == "sum":
        return np.asarray(total)
    if denominator == 0:
        return np.asarray(np.nan if opts.empty_mean == "nan" else 0.0, compute)
    return np.asarray(total / compute(denominator))


def _numba_kernel():
    try:
        from lsx.numpy import _numba as _numba_kernels
    except ImportError:
        return None
    return _numba_kernels.forward_backward if _numba_kernels.AVAILABLE else None


def _xlogx(q: np.ndarray | float) -> np.ndarray:
    q = np.asarray(q)
    return np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0)


def _numpy_engine(x2, t2, kind, opts, weight, mask, compute, want_grad):
    """Pure-NumPy loss and gradient on (N, K) logits; returns (per-element loss, mean denominator, grad)."""
    n, k = x2.shape
    x = x2.astype(compute, copy=False)
    valid_count = k if mask is None else int(mask.sum())
    a, b = (compute(c) for c in spec.smoothing_coefficients(opts, valid_count))
    w = (
        None
        if weight is None
        else np.where(mask, weight, 0).astype(compute)
        if mask is not None
        else weight.astype(compute)
    )
    total_weight = compute(valid_count) if w is None else w.sum(dtype=compute)

    # masked classes take no part: −inf for the softmax, 0 for the linear terms
    x_soft = x if mask is None else np.where(mask, x, -np.inf).astype(compute)
    row_max = x_soft.max(axis=1)
    row_max = np.where(np.isfinite(row_max), row_max, 0).astype(compute)
    e = np.exp(x_soft - row_max[:, None])
    sum_e = e.sum(axis=1)
    lse = row_max + np.log(sum_e)

    rows = np.arange(n)
    if kind == "index":
        active = np.ones(n, bool) if opts.ignore_index is None else t2 != opts.ignore_index
        y = np.where(active, t2, 0).astype(np.intp)
        w_y = np.ones(n, compute) if w is None else w[y]
        ce = a * w_y * (lse - x[rows, y]) if a != 0 else np.zeros(n, compute)
        if b != 0:
            x_lin = x if mask is None else np.where(mask, x, 0)
            weighted_sum = x_lin.sum(axis=1) if w is None else x_lin @ w
            ce = ce + b * (total_weight * lse - weighted_sum)
        per_element = ce + compute(opts.z_loss) * w_y * lse * lse
        if opts.normalize:
            per_element += w_y * _xlogx(a + b).astype(compute) + _xlogx(b).astype(compute) * (total_weight - w_y)
        target_mass = a * w_y + b * total_weight
        denominator = float(w_y[active].sum(dtype=np.float64))
    else:
        active = np.ones(n, bool)
        q = a * t2.astype(compute) + b
        if mask is not None:
            q = np.where(mask, q, 0)
        wq = q if w is None else q * w
        per_element = np.where(wq > 0, wq * (lse[:, None] - x), 0).sum(axis=1, dtype=compute)
        w_y = np.ones(n, compute)
        per_element += compute(opts.z_loss) * lse * lse
        if opts.normalize:
            per_element += (_xlogx(q) if w is None else w * _xlogx(q)).sum(axis=1, dtype=compute)
        target_mass = wq.sum(axis=1, dtype=compute)
        denominator = float(n)
    per_element = np.where(active, per_element, 0).astype(compute)
    if not want_grad:
        return per_element, denominator, None

    grad = e
    grad /= sum_e[:, None]
    grad *= (target_mass + 2 * compute(opts.z_loss) * w_y * lse)[:, None]
    if kind == "index":
        if b != 0:
            grad -= b if w is None else b * w
        grad[rows, y] -= a * w_y
    else:
        grad -= wq
    if mask is not None:
        grad[:, ~mask] = 0
    grad[~active] = 0
    return per_element, denominator, grad
