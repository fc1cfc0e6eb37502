"""NumPy backend: ``loss`` and ``loss_and_grad`` for NumPy arrays, class axis ``-1`` by default.

Uses the fused Numba kernel (:mod:`lsx.numpy._numba`) when Numba is installed and the pure-NumPy engine
(:mod:`lsx.numpy._engine`) otherwise; both give the same numbers. Logits may be float16, bfloat16 (the
``ml_dtypes`` NumPy dtype), float32 or float64; accumulation is float32 for the first three and float64 for
float64; outputs keep the input's dtype. Read-only inputs are never written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lsx import spec
from lsx.numpy import _engine
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
    softcap: float | None = None,
    sample_weight: Any = None,
    denominator: Any = None,
    convention: str | None = None,
) -> np.ndarray:
    opts = spec.resolve_options_cached(
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
        softcap=softcap,
        sample_weight=sample_weight,
        denominator=denominator,
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
    softcap: float | None = None,
    sample_weight: Any = None,
    denominator: Any = None,
    convention: str | None = None,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The loss and its gradient with respect to ``logits`` (of the sum, for ``reduction="none"``).

    ``out``: an array shaped and typed like ``logits`` to receive the gradient; ``out=logits`` overwrites
    the logits with their gradient (opt-in, saves a logits-sized buffer).
    """
    opts = spec.resolve_options_cached(
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
        softcap=softcap,
        sample_weight=sample_weight,
        denominator=denominator,
    )
    value, grad = _compute(logits, target, opts, axis, want_grad=True, out=out)
    assert grad is not None
    return value, grad


_DOC = (
    spec.LOSS_DOC
    + """Example:
    >>> import numpy as np, lsx.numpy
    >>> x = np.array([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
    >>> y = np.array([2, 1, 0])
    >>> round(float(lsx.numpy.loss(x, y, label_smoothing=0.3)), 4)
    1.3883
    >>> round(float(lsx.numpy.loss(x, y, label_smoothing=0.3, spread="others")), 4)
    1.4178
"""
)
loss.__doc__ = _DOC
loss_and_grad.__doc__ = _DOC.replace(
    "Returns:", "    out: array to receive the gradient (``out=logits`` works in place).\n\nReturns:", 1
).replace("else a scalar.", "else a scalar; and the gradient, shaped and typed like ``logits``.", 1)


# --------------------------------------------------------------------------------------------------------
#: the logits' dtypes, and what each accumulates in (bfloat16 is ml_dtypes' NumPy dtype)
_SUPPORTED = "float16, bfloat16 (ml_dtypes), float32 or float64"


#: the accumulation dtype of the usual logits dtypes (the others go through :func:`_compute_dtype`)
_COMPUTE = {np.dtype(np.float64): np.float64, np.dtype(np.float32): np.float32, np.dtype(np.float16): np.float32}


def _compute_dtype(dtype: np.dtype) -> type:
    compute = _COMPUTE.get(dtype)
    if compute is not None:
        return compute
    if dtype == np.float64:
        return np.float64
    if dtype in (np.float32, np.float16) or dtype.name == "bfloat16":
        return np.float32
    if dtype.kind == "f" and dtype.itemsize > 8:  # long double: accumulated in float64
        return np.float64
    raise TypeError(f"logits must be {_SUPPORTED}, got dtype {dtype}")


def _compute(logits: Any, target: Any, opts: spec.Options, axis: int, *, want_grad: bool, out: np.ndarray | None):
    x = np.asarray(logits)
    t = np.asarray(target)
    compute = _compute_dtype(x.dtype)
    dtype = x.dtype  # the results' dtype
    if dtype != compute and dtype.itemsize < np.dtype(compute).itemsize:
        x = x.astype(compute)  # float16/bfloat16: one widening copy, which the engines need anyway
    if t.dtype.kind == "V" and t.dtype.name == "bfloat16":  # (the name is slow to look up)
        t = t.astype(compute)
    layout, weight, mask = spec.validate(x, t, opts, axis)
    if out is not None and (not isinstance(out, np.ndarray) or out.shape != x.shape or out.dtype != dtype):
        raise ValueError(f"out must be an ndarray of shape {x.shape} and dtype {dtype}, got {_describe(out)}")
    if out is not None and not out.flags.writeable:
        raise ValueError("out must be writeable")
    if out is not None:
        # the gradient must not overwrite an input the engines still read: the target, the class mask
        # (weight is a float64 copy already; logits that share out's memory are handled by the engines)
        if np.may_share_memory(out, t):
            t = t.copy()
        if mask is not None and np.may_share_memory(out, mask):
            mask = mask.copy()

    last = layout.axis == x.ndim - 1
    x2 = x if last else np.moveaxis(x, layout.axis, -1)
    lead_shape = x2.shape[:-1]
    k = layout.num_classes
    x2 = x2.reshape(-1, k)
    if layout.kind == "index":
        t2 = t.reshape(-1)
    else:
        t2 = (t if last else np.moveaxis(t, layout.axis, -1)).reshape(-1, k)

    # per-element weights in the rows' order (the class axis removed, the other axes in order)
    sw = None if opts.sample_weight is None else np.asarray(opts.sample_weight, np.float64).reshape(-1)

    kernel = _numba_kernel()
    out2 = None
    if kernel is not None:
        # the kernel writes straight into ``out`` when it already has the kernel's row layout and dtype
        if want_grad and out is not None and last and out.dtype == compute and out.flags.c_contiguous:
            out2 = out.reshape(-1, k)
        per_element, denominator, grad2 = kernel(
            x2, t2, layout.kind, opts, weight, mask, compute, want_grad, out2, scale_mean=True, sample_weight=sw
        )
    else:
        per_element, denominator, grad2 = _numpy_engine(
            x2, t2, layout.kind, opts, weight, mask, compute, want_grad, sample_weight=sw
        )
        if want_grad:
            scale = spec.reduction_scale(opts.reduction, denominator) if opts.reduction == "mean" else 1.0
            if sw is not None:
                grad2 *= (scale * sw).astype(compute)[:, None]
            elif scale != 1.0:
                grad2 *= compute(scale)
    if sw is not None:
        per_element = (per_element * sw).astype(compute)

    if opts.reduction == "none":
        value = per_element.astype(dtype).reshape(lead_shape)
    else:
        total = per_element.sum(dtype=compute)
        reduced = spec.reduce_total(opts.reduction, total, denominator, opts.empty_mean)
        value = np.asarray(reduced, compute).astype(dtype)
    if not want_grad:
        return value, None
    if out2 is not None and grad2 is out2:
        return value, out
    grad = grad2.reshape(lead_shape + (k,))
    if not last:
        grad = np.moveaxis(grad, -1, layout.axis)
    if out is None:
        return value, grad.astype(dtype, copy=False)
    np.copyto(out, grad, casting="unsafe" if dtype.name == "bfloat16" else "same_kind")
    return value, out


def _describe(value: Any) -> str:
    if isinstance(value, np.ndarray):
        return f"ndarray of shape {value.shape} and dtype {value.dtype}"
    return type(value).__name__


_KERNEL: Any = False  # the Numba kernel once looked up (None: Numba is not installed)


def _numba_kernel():
    global _KERNEL
    if _KERNEL is False:
        try:
            from lsx.numpy import _numba as _numba_kernels
        except ImportError:
            _KERNEL = None
        else:
            _KERNEL = _numba_kernels.forward_backward if _numba_kernels.AVAILABLE else None
    return _KERNEL


#: the pure-NumPy engine (also the contract the Numba kernel follows)
_numpy_engine = _engine.forward_backward
