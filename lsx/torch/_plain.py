"""The usual eager call, short: CPU logits (N, K), int64 labels (N,), no per-class or per-element tensors.

An image classifier's loss at (64, 10) costs torch's own kernels a few microseconds; the rest of a call is
Python. This path keeps that rest small: the option values resolve once per set (cached, with the spec's
errors), the label check runs inside the Numba kernel (a label out of range makes it stop before writing, and
the spec then names it), and the loss, its reduction and the gradient come from one kernel call that reads the
tensors' memory by address (no NumPy views to make). Autograd sees one node whose backward hands back the
gradient computed in the forward pass.

:func:`cross_entropy` returns None whenever the call is not that case (other devices, dtypes or layouts,
``torch.compile``, ``torch.func`` transforms, forward-mode AD, tensor subclasses, torch-function and dispatch
modes, lazily negated views, an engine forced by ``LSX_TORCH_ENGINE`` other than Numba, no Numba); the general path in
:mod:`lsx.torch._function` then serves it. Both give the same loss and gradient bit for bit: they run the same
compiled kernel entry (:func:`lsx.numpy._numba._plain_at`, which lsx.numpy's ``plain_rows`` calls too), and the reduction sums in
NumPy's order: up to 128 rows in the kernel call (:func:`lsx.numpy._numba._pairwise_block`, held to
``add.reduce``'s bits by the tests), more rows with ``add.reduce`` itself.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np
import torch
from torch.autograd import forward_ad

from lsx import spec
from lsx.torch import _engines, _function
from lsx.torch._engines import numba as _numba_engine

__all__ = ["cross_entropy"]

_is_compiling = torch.compiler.is_compiling
_keep_graph = _function._keep_graph
_function_mode = torch._C._is_torch_function_mode_enabled
_dispatch_stack = torch._C._len_torch_dispatch_stack
_transforms_active = torch._C._are_functorch_transforms_active
_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_grad_enabled = torch.is_grad_enabled
_NP_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}
_ENGINES_SERVED = (None, "", "auto", "numba", b"", b"auto", b"numba")
# LSX_TORCH_ENGINE is read at every call: from os.environ's own mapping where it has one (a dict lookup;
# os.environ.get costs a few microseconds when the variable is unset), else through os.environ
_ENVIRON = getattr(os.environ, "_data", None)
try:
    _ENGINE_KEY = os.environ.encodekey(_engines.ENVIRONMENT)  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - another Python's os.environ
    _ENVIRON = None
if not isinstance(_ENVIRON, dict):  # pragma: no cover - another Python's os.environ
    _ENVIRON = None


def cross_entropy(
    x: Any,
    t: Any,
    ignore_index: Any,
    reduction: Any,
    label_smoothing: Any,
    spread: Any,
    z_loss: Any,
    normalize: Any,
    empty_mean: Any,
) -> torch.Tensor | None:
    """The loss (and, when ``x`` requires grad, its autograd node), or None for the general path."""
    if type(x) is not torch.Tensor or type(t) is not torch.Tensor or t.dtype is not torch.int64:
        return None
    compute = _NP_DTYPES.get(x.dtype)
    if compute is None or not x.is_cpu or not t.is_cpu:
        return None
    if (
        _is_compiling()
        or _function_mode()
        or _dispatch_stack()
        or _transforms_active()
        or forward_ad._current_level >= 0
        or _wrapped(x)
        or x.is_neg()  # (lazily negated views: the general path negates them first)
        or t.is_neg()
        or not x.is_contiguous()
        or not t.is_contiguous()
        or (os.environ.get(_engines.ENVIRONMENT) if _ENVIRON is None else _ENVIRON.get(_ENGINE_KEY)) not in _ENGINES_SERVED
    ):
        return None
    shape = x.shape
    if len(shape) != 2 or t.shape != shape[:1] or not shape[0]:
        return None
    n, k = shape
    global _latest
    latest = _latest
    if (  # the same option objects as the latest call (a training loop's): its plan, without hashing them
        latest[0] is label_smoothing
        and latest[1] is spread
        and latest[2] is ignore_index
        and latest[3] is z_loss
        and latest[4] is normalize
        and latest[5] is reduction
        and latest[6] is empty_mean
        and latest[7] == k
    ):
        plan = latest[8]
    else:
        try:
            plan = _plan(label_smoothing, spread, ignore_index, z_loss, normalize, reduction, empty_mean, k)
        except TypeError:  # an unhashable option: the general path resolves it (or raises the spec's error)
            return None
        if plan is None:
            return None
        _latest = (label_smoothing, spread, ignore_index, z_loss, normalize, reduction, empty_mean, k, plan)
    opts, params, ignore, kernels, reduced, mean, empty = plan
    want_grad = x.requires_grad and _grad_enabled()
    losses = np.empty(n + reduced, compute)  # (with a reduction, the reduced loss follows the rows')
    grad = np.empty((n, k), compute) if want_grad else _NO_GRAD[compute]
    # the kernel reads the tensors' memory by address (contiguous, checked above; no NumPy views to make)
    if n * k < kernels._PARALLEL_MIN_ELEMENTS:
        active = kernels._plain_at(x.data_ptr(), t.data_ptr(), n, k, params, ignore, want_grad, grad, losses)
    else:
        chunks = min(n, 4 * kernels.numba.get_num_threads())
        active = kernels._plain_at_threaded(
            x.data_ptr(), t.data_ptr(), n, k, params, ignore, want_grad, grad, losses, chunks
        )
    if active < 0:
        spec.check_labels(t.numpy(), k, opts)  # raises, naming the label
        raise AssertionError("the kernel found a label out of range that spec.check_labels accepts")
    if reduced and n > kernels._PAIRWISE_BLOCK:  # (the kernel sums one block of NumPy's pairwise sum; NumPy more)
        total = _sum(losses[:n])
        losses[n] = (total / compute(active) if active else compute(empty)) if mean else total
    value = losses[n, ...] if reduced else losses  # (a 0-d view for the reduced loss)
    if not want_grad:
        return torch.from_numpy(value)
    return _apply(x, (value, grad, reduced))


@functools.lru_cache(maxsize=256, typed=True)
def _plan(
    label_smoothing: Any,
    spread: Any,
    ignore_index: Any,
    z_loss: Any,
    normalize: Any,
    reduction: Any,
    empty_mean: Any,
    k: int,
) -> tuple[spec.Options, np.ndarray, int, Any, bool, bool, float] | None:
    """(options, the kernel's row coefficients and settings, ignore_index as an int (0 when there is none), the
    kernels' module, whether the loss is reduced, whether by the mean, an empty mean's value) for one set of option
    values and class count; None when this path does not serve it (Numba missing, a massless target, an error
    the general path reports with the call's other checks).
    ``typed`` keeps apart values that compare equal but resolve differently (``True`` and ``1``)."""
    kernels = _numba_engine._kernels()
    if kernels is None:
        return None
    try:
        opts = spec.resolve_options(
            None,
            label_smoothing=label_smoothing,
            spread=spread,
            ignore_index=ignore_index,
            z_loss=z_loss,
            normalize=normalize,
            reduction=reduction,
            empty_mean=empty_mean,
        )
        spec.check_class_count(k, opts)
    except (TypeError, ValueError):
        return None
    params = kernels.plain_params(opts, k)
    if params is None:
        return None
    has_ignore = opts.ignore_index is not None  # (the spec keeps it within int64)
    mean = opts.reduction == "mean"
    empty = np.nan if opts.empty_mean == "nan" else 0.0
    settings = kernels.plain_settings(params, has_ignore, mean, opts.reduction, empty)
    ignore = int(opts.ignore_index) if has_ignore else 0
    return opts, settings, ignore, kernels, opts.reduction != "none", mean, empty


_sum = np.add.reduce  # (ndarray.sum's reduction, without its Python wrapper)
# the latest call's option objects, class count and plan (held, so no other object can take their identities)
_latest: tuple[Any, ...] = (*[object()] * 7, -1, None)
# a placeholder of the kernel's type when no gradient is asked for (never written)
_NO_GRAD = {dtype: np.empty((0, 0), dtype) for dtype in (np.float32, np.float64)}


class _Plain(torch.autograd.Function):
    """One autograd node: the value out, the gradient (already scaled by the reduction) saved for backward."""

    @staticmethod
    def forward(ctx, x, results):
        value, grad, reduced = results  # (one argument: Function.apply inspects each)
        ctx.reduced = reduced
        ctx.save_for_backward(torch.from_numpy(grad))
        return torch.from_numpy(value)

    @staticmethod
    def backward(ctx, grad_value):
        if grad_value is None:
            return None, None
        if _grad_enabled():
            raise RuntimeError(_function.FIRST_ORDER_ONLY)
        (grad,) = ctx.saved_tensors
        scale = grad_value if grad_value.dtype == grad.dtype else grad_value.to(grad.dtype)
        if not ctx.reduced:
            scale = scale.reshape(-1, 1)
        if type(scale) is not torch.Tensor or _keep_graph is None or _keep_graph():  # the buffer serves later passes
            # (retain_graph=True; or a torch that cannot say): a new tensor
            return grad * scale, None
        # released after this call: the buffer itself becomes the input's gradient (no copy)
        if ctx.reduced and scale.is_cpu and scale.item() == 1.0:
            return grad, None
        return grad.mul_(scale), None


# ``Function.apply`` without its unwrapping of dead functorch wrappers (checked above: there are none)
_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, _Plain)
# The engine runs a node by calling its ``apply``: torch's looks the user's backward up on every call; this node
# has one, so it is called directly
_Plain._backward_cls.apply = _Plain.backward
