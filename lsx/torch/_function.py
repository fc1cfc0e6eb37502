"""The fused engine behind :mod:`lsx.torch`: the loss and its gradient from one forward pass.

The forward pass computes the log-sum-exp once and writes ``(Σ w q + 2 s w_y L)·p − w∘q`` (already divided
by the mean's denominator) into one logits-sized buffer; autograd saves only that buffer and the backward
pass scales it by the incoming gradient. Forward-mode AD needs nothing more: the tangent is Σ grad·dx.

Two front doors share that body (:func:`_fused_impl`):

- :class:`_Fused`, an ``autograd.Function`` for eager calls: plain tensors, ``torch.func`` transforms
  (``grad``, ``vjp``, ``jacrev``, ``jvp``, ``vmap``) and ``torch.autograd.forward_ad``;
- the custom op ``lsx::fused_cross_entropy`` (``torch.library.custom_op``), which ``torch.compile``
  (``fullgraph=True``), fake/meta tracing, tensor subclasses and torch-function modes treat as one opaque
  node. Under ``torch.compile`` the numeric options travel into the op as values (``label_smoothing``,
  ``z_loss`` and ``softcap`` as one float64 tensor built in the graph, ``ignore_index`` as an int), so a
  schedule or a changed module attribute gives the right loss without a trace-time constant (and recompiles
  at most once); the string and bool options are compile-time constants.

Engines, chosen per call by :func:`lsx.torch._engines.choose` (``LSX_TORCH_ENGINE`` forces one):

- CPU, contiguous float32/float64 logits and Numba installed: the fused Numba kernel of :mod:`lsx.numpy`,
  on zero-copy NumPy views of the tensors (:mod:`lsx.torch._engines.numba`).
- CUDA logits when Triton imports: the Triton kernels (:mod:`lsx.torch._engines.triton`), statistics then
  gradient, launched directly in eager calls and behind the custom op under ``torch.compile``.
- everything else (meta, CPU float16/bfloat16, strided logits, no Numba): the plain-torch engine
  (:mod:`lsx.torch._engines.ops`).

Value checks (labels in range, weight finite and >= 0, class_mask) run on CPU tensors and raise
``ValueError``. On other devices they would synchronise the device, so they are skipped: an out-of-range
label gives NaN for its element (and its gradient row) instead of an error.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.autograd import forward_ad

from lsx import spec
from lsx.torch import _engines
from lsx.torch._engines import numba as _numba
from lsx.torch._engines import ops as _ops

__all__ = ["TracedOptions", "cross_entropy", "traced_options"]

_OP_NAME = "lsx::fused_cross_entropy"
#: the error of a double backward (create_graph=True) through the loss
FIRST_ORDER_ONLY = (
    "lsx.torch.loss supports first-order gradients only (its gradient is computed in the forward pass); "
    "double backward / create_graph=True is not supported"
)
#: the options that reach the op as (possibly symbolic) numbers under torch.compile
_NUMERIC = ("label_smoothing", "z_loss", "ignore_index", "softcap")


class TracedOptions(NamedTuple):
    """Options under ``torch.compile``: the string and bool ones resolved at trace time (``static``), the
    numeric ones as the values passed (``explicit`` names those passed; the others come from the convention
    or the defaults), resolved when the op runs."""

    static: spec.Options
    convention: str | None
    explicit: str
    label_smoothing: Any
    z_loss: Any
    ignore_index: Any
    softcap: Any = None


def traced_options(convention: str | None, given: dict[str, Any]) -> TracedOptions:
    """Split the options for a traced call (see :class:`TracedOptions`); validates what is constant."""
    constant = []
    numeric = {name: getattr(spec.Options, name) for name in _NUMERIC}
    explicit = []
    for name, value in given.items():
        if spec.is_default(value):
            continue
        if name in _NUMERIC and value is not None and not isinstance(value, (bool, str)):
            numeric[name] = value
            explicit.append(name)
        else:  # strings, bools, None (and wrong types, for the spec's error)
            constant.append((name, value))
            if name in _NUMERIC:
                explicit.append(name)
                numeric[name] = None if value is None else getattr(spec.Options, name)
    static = _resolve_constant(convention, tuple(constant))
    return TracedOptions(static, None if convention is None else str(convention), ",".join(explicit), **numeric)


def _resolve_constant(convention: str | None, constant: tuple[tuple[str, Any], ...]) -> spec.Options:
    return spec.resolve_options(convention, **dict(constant))


# ``torch.compiler.assume_constant_result`` without its import of torch._dynamo (a large share of the import
# time of lsx.torch): the decorator only sets this mark, which dynamo reads when it traces the call.
_resolve_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]


@functools.lru_cache(maxsize=256)
def _op_options(
    convention: str | None,
    explicit: str,
    label_smoothing: float,
    spread: str,
    ignore_index: int | None,
    z_loss: float,
    normalize: bool,
    reduction: str,
    empty_mean: str,
    softcap: float | None = None,
) -> spec.Options:
    """The op's options from its arguments: the constant ones as given, the numeric ones named in
    ``explicit`` as given, the others from the convention (or the defaults)."""
    numbers = dict(label_smoothing=label_smoothing, z_loss=z_loss, ignore_index=ignore_index, softcap=softcap)
    given = {name: numbers[name] for name in explicit.split(",") if name}
    return spec.resolve_options(
        convention, spread=spread, normalize=normalize, reduction=reduction, empty_mean=empty_mean, **given
    )


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    opts: spec.Options | TracedOptions,
    axis: int | None,
    weight: Any,
    class_mask: Any,
    sample_weight: Any = None,
    denominator: Any = None,
) -> torch.Tensor:
    """The loss of ``logits`` against ``target`` under ``opts``; differentiable in ``logits`` and in
    ``sample_weight`` and ``denominator`` when they are tensors that require it.

    ``weight``, ``class_mask`` and ``sample_weight`` are tensors (or array-likes), ``denominator`` a number or
    a 0-d tensor; all are checked by value on the CPU (when the op runs).
    """
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {_describe(logits)}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {_describe(target)}")
    logits, target = resolve_neg(logits), resolve_neg(target)
    kind = _target_kind(target.dtype)
    if kind == "probs" and target.requires_grad and torch.is_grad_enabled():
        raise ValueError("lsx.torch.loss does not differentiate the target probabilities; pass target.detach()")
    if axis is None:  # torch's rule: classes on dim 1, or dim 0 for a single (C,) row
        axis = 1 if logits.dim() >= 2 else 0
    weight = _as_tensor(weight, "weight", logits.device)
    class_mask = _as_tensor(class_mask, "class_mask", None)
    traced = isinstance(opts, TracedOptions)
    static = opts.static if traced else opts
    if sample_weight is not None:
        sample_weight = _as_weight_tensor(sample_weight, logits.device)
    if denominator is not None:
        denominator = _denominator_tensor(denominator, static.reduction, logits.device)
    layout = spec.check_layout(
        tuple(logits.shape),
        tuple(target.shape),
        kind,
        static,
        axis=axis,
        weight_shape=None if weight is None else tuple(weight.shape),
        class_mask_shape=None if class_mask is None else tuple(class_mask.shape),
        sample_weight_shape=None if sample_weight is None else tuple(sample_weight.shape),
    )
    k = layout.num_classes
    if logits.dim() == 2 and layout.axis == 1:  # already (N, K): no views to make
        x2, t2, lead_shape = logits, target, logits.shape[:1]
    else:
        moved = logits.movedim(layout.axis, -1)
        lead_shape = moved.shape[:-1]
        x2 = moved.reshape(-1, k)
        t2 = target.reshape(-1) if kind == "index" else target.movedim(layout.axis, -1).reshape(-1, k)
    extra = (sample_weight, denominator)
    route = "op" if traced else _route(x2, t2, weight, class_mask, *extra)
    # which of sample_weight and denominator get a derivative (∂value/∂sample_weight is an N-sized output)
    needs = (False, False)
    if route != "direct":
        forward = route == "transform" or forward_ad._current_level >= 0
        needs = tuple(t is not None and (forward or t.requires_grad) for t in extra)  # type: ignore[assignment]
    if route == "function":
        if weight is None and class_mask is None and sample_weight is None and denominator is None:
            value = _EagerPlain.apply(x2, t2, opts)  # the usual call: fewer arguments for autograd to bind
        else:
            value = _EagerFused.apply(x2, t2, weight, class_mask, opts, *extra, needs)
    elif route == "transform":
        value, *_ = _Fused.apply(x2, t2, weight, class_mask, opts, *extra, needs)
    elif route == "direct":  # nothing to differentiate: no autograd bookkeeping
        value, *_ = _fused_full(x2, t2, weight, class_mask, opts, *extra)
    elif traced:
        value, *_ = _fused(
            x2,
            t2,
            weight,
            class_mask,
            _numbers(opts.label_smoothing, opts.z_loss, opts.softcap),
            static.spread,
            opts.ignore_index,
            static.normalize,
            static.reduction,
            static.empty_mean,
            opts.convention,
            opts.explicit,
            *extra,
            opts.softcap is not None,
            *needs,
        )
    else:
        value, *_ = _fused(
            x2,
            t2,
            weight,
            class_mask,
            _numbers(opts.label_smoothing, opts.z_loss, opts.softcap),
            opts.spread,
            opts.ignore_index,
            opts.normalize,
            opts.reduction,
            opts.empty_mean,
            None,
            ",".join(_NUMERIC),
            *extra,
            opts.softcap is not None,
            *needs,
        )
    return value.reshape(lead_shape) if static.reduction == "none" else value


def _numbers(label_smoothing: Any, z_loss: Any, softcap: Any) -> torch.Tensor:
    """The float options as one float64 tensor (softcap 0 for None): under ``torch.compile`` a float argument
    of the custom op would be a trace-time constant (a new graph for every value of a schedule), a tensor
    built in the graph from the (symbolic) numbers is not."""
    return torch.tensor([label_smoothing, z_loss, 0.0 if softcap is None else softcap], dtype=torch.float64)


_TARGET_KINDS: dict[torch.dtype, str] = {}


def _target_kind(dtype: torch.dtype) -> str:
    kind = _TARGET_KINDS.get(dtype)
    if kind is None:
        kind = _TARGET_KINDS[dtype] = spec.target_kind(dtype)
    return kind


def _route(x2: torch.Tensor, *others: torch.Tensor | None) -> str:
    """How an eager call runs: ``"direct"`` (nothing to differentiate), ``"function"`` (:class:`_EagerFused`:
    plain tensors with autograd or forward-mode AD), ``"transform"`` (:class:`_Fused`, under ``torch.func``
    transforms) or ``"op"`` (the custom op: under ``torch.compile``, fake tensors, tensor subclasses and
    dispatch/function modes, which know how to handle it). The custom op's dispatch costs about half of a
    small call, and ``_Fused.apply`` binds its arguments with ``inspect.signature``, hence the others."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return "op"
    if torch._C._len_torch_dispatch_stack():
        return "op"
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    transformed = False
    for tensor in (x2, *others):
        if tensor is None:
            continue
        if wrapped(tensor):
            transformed = True
        elif type(tensor) is not torch.Tensor:
            return "op"
    if transformed or torch._C._are_functorch_transforms_active():
        return "transform"
    differentiated = x2.requires_grad or any(t is not None and t.requires_grad for t in others)
    if forward_ad._current_level >= 0 or (differentiated and torch.is_grad_enabled()):
        return "function"
    return "direct"


def resolve_neg(tensor: Any) -> Any:
    """``tensor`` with a lazy negation (a view with torch's negative bit, e.g. from ``torch._neg_view``)
    applied, differentiably: the engines read the tensor's memory, where the values are not yet negated."""
    if not isinstance(tensor, torch.Tensor):
        return tensor
    if torch.compiler.is_compiling():  # (traced: ``is_neg`` is not, and the op costs nothing on a plain tensor)
        return tensor.resolve_neg()
    return tensor.resolve_neg() if tensor.is_neg() else tensor


def _as_weight_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """``sample_weight`` as a real tensor (kept differentiable)."""
    tensor = resolve_neg(value) if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if tensor.dtype == torch.bool or tensor.is_complex():
        raise TypeError(f"sample_weight must be a real tensor, got dtype {tensor.dtype}")
    return tensor if tensor.device == device else tensor.to(device)


def _denominator_tensor(value: Any, reduction: str, device: torch.device) -> torch.Tensor:
    """``denominator`` as a 0-d tensor on the logits' device (a number is checked here, a tensor by value on
    the CPU when the op runs; a device tensor is never read on the host)."""
    if reduction != "mean":
        raise ValueError(f'denominator is only for reduction="mean", got reduction={reduction!r}')
    if isinstance(value, torch.Tensor):
        value = resolve_neg(value)
        if value.dim() != 0:
            raise ValueError(
                f"denominator must be a number or a 0-d tensor, got a tensor of shape {tuple(value.shape)}"
            )
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"denominator must be a real number or a 0-d real tensor, got dtype {value.dtype}")
        return value if value.device == device else value.to(device)
    if isinstance(value, bool):
        raise ValueError(f"denominator must be a number or a 0-d array, got {value!r}")
    if isinstance(value, (torch.SymFloat, torch.SymInt)):  # traced: trusted
        return torch.full((), value, dtype=torch.float64, device=device)
    if isinstance(value, (int, float)):  # plain arithmetic (NumPy does not trace under torch.compile)
        number = float(value)
        # under torch.compile the op checks it when it runs (an error raised while tracing would not be a
        # ValueError under fullgraph=True)
        if not torch.compiler.is_compiling() and (not math.isfinite(number) or number < 0):
            raise ValueError(f"denominator must be finite and >= 0, got denominator={number!r}")
        return torch.full((), number, dtype=torch.float64, device=device)
    if np.ndim(value) != 0:
        raise ValueError(f"denominator must be a number or a 0-d array, got {spec._describe_value(value)}")
    return torch.full((), spec.check_denominator(value), dtype=torch.float64, device=device)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor of dtype {value.dtype}"
    return type(value).__name__


def _as_tensor(value: Any, name: str, device: torch.device | None) -> torch.Tensor | None:
    if value is None:
        return None
    tensor = resolve_neg(value) if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    if name == "weight":
        if tensor.dtype == torch.bool or tensor.is_complex():
            raise TypeError(f"weight must be a real tensor, got dtype {tensor.dtype}")
        return tensor.detach().to(device=device)
    if tensor.dtype != torch.bool:
        raise TypeError(f"class_mask must be a boolean tensor, got dtype {tensor.dtype}")
    return tensor.detach()


# --------------------------------------------------------------------------------------------------------
# The body: (loss, gradient) in one call
# --------------------------------------------------------------------------------------------------------
def _fused_impl(
    x2, t2, weight, class_mask, opts: spec.Options, sample_weight=None, denominator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the reduced loss, or per-element losses, in x2's dtype; the gradient buffer)."""
    value, grad, _, _ = _fused_full(x2, t2, weight, class_mask, opts, sample_weight, denominator)
    return value, grad


def _fused_full(
    x2, t2, weight, class_mask, opts: spec.Options, sample_weight=None, denominator=None, sw_grad=False, den_grad=False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(value, gradient, ∂value/∂sample_weight, ∂value/∂denominator).

    ``sample_weight``: the per-element weights (the per-element loss's shape, N elements in row order) or
    None; ``denominator``: a 0-d tensor or None. The two derivatives are computed only when asked
    (``sw_grad``: shaped like ``sample_weight``; ``den_grad``: 0-d), else they are empty: for ``"none"`` and
    ``"sum"`` ∂value/∂sw_j = ℓ_j; for the mean ℓ_j/d with a given denominator d, else (ℓ_j − mean·w_{y_j})/D,
    and ∂mean/∂d = −mean/d (0 where the denominator is 0).
    """
    kind = "probs" if t2.is_floating_point() else "index"
    k = x2.shape[1]
    on_cpu = x2.device.type == "cpu"
    mask_np = None
    if class_mask is not None and class_mask.device.type == "cpu" and not _is_traced(class_mask):
        mask_np = spec.check_class_mask(class_mask.numpy(), k, opts)
    weight_np = None
    if on_cpu and weight is not None and not _is_traced(weight):
        weight_np = spec.check_weight(weight.to(torch.float64).numpy(), k)
    if on_cpu and t2.device.type == "cpu" and not _is_traced(t2):  # (every tensor read on the host: CPU, concrete)
        if kind == "index":
            _check_labels(t2.numpy(), k, opts, mask_np)
        elif mask_np is not None:
            spec.check_probability_target_mask(t2.to(torch.float64).numpy(), -1, mask_np)
    sw_np = None
    if sample_weight is not None and sample_weight.device.type == "cpu" and not _is_traced(sample_weight):
        concrete = sample_weight.detach().to(torch.float64).numpy()
        sw_np = spec.check_sample_weight(concrete, tuple(sample_weight.shape)).reshape(-1)
    if weight_np is not None or sw_np is not None:  # the concrete ones (a device tensor is trusted)
        spec.check_weight_range(x2.dtype, weight=weight_np, sample_weight=sw_np, num_elements=x2.shape[0])
    den_value = None
    if denominator is not None and denominator.device.type == "cpu" and not _is_traced(denominator):
        den_value = spec.check_denominator(denominator.detach().to(torch.float64).numpy())

    compute = torch.float64 if x2.dtype == torch.float64 else torch.float32
    kernel = None
    engine = _engines.choose(x2, strided=False)
    if engine == "numba":
        kernel = _numba.kernel()
        x2 = x2.contiguous()  # (a strided input reaches here only when the Numba engine is forced)
    if kernel is not None and sample_weight is not None:
        if sw_np is None or "sample_weight" not in _numba.keywords(kernel):
            kernel = None
    if kernel is not None and denominator is not None and den_value is None:
        kernel = None
    if kernel is not None:
        kernel_opts = opts if den_value is None else dataclasses.replace(opts, denominator=den_value)
        per_element_np, local, grad = _numba.run(kernel, x2, t2, kind, kernel_opts, weight_np, mask_np, sw_np)
        if sample_weight is None and not den_grad:  # reduced in NumPy: cheaper than torch ops on scalars
            return _numba.reduce_numpy(per_element_np, local, opts), grad, _NOTHING, _NOTHING
        per_element = torch.from_numpy(per_element_np)
        d: Any = local
    else:
        grad = torch.empty(x2.shape, dtype=x2.dtype, device=x2.device)
        if engine == "triton":  # the two steps with a one-block merge
            per_element, d = _engines.run(engine, x2, t2, kind, opts, weight, class_mask, grad, sample_weight, denominator)
        else:
            per_element, d = _ops.run(x2, t2, kind, opts, weight, class_mask, grad, sample_weight, denominator)
    sw = None if sample_weight is None else sample_weight.detach().to(device=x2.device, dtype=compute).reshape(-1)
    weighted = per_element if sw is None else per_element * sw
    value = _ops.reduce(weighted, d, opts, x2.dtype)
    dsw, dden = _NOTHING, _NOTHING
    if sw_grad or den_grad:
        scale = spec.reduction_scale(opts.reduction, d, where=torch.where)
        if sw_grad:
            dsw = per_element if opts.reduction != "mean" else per_element * scale
            if opts.reduction == "mean" and denominator is None:
                # D = Σ sw·w_y over the non-ignored elements (Σ sw for probabilities) depends on sw too
                total = weighted.sum()
                dsw = dsw - (total * scale * scale) * _denominator_weights(t2, kind, weight, opts, compute)
            dsw = dsw.reshape(sample_weight.shape).to(sample_weight.dtype)
        if den_grad:
            dden = (-(weighted.sum()) * scale * scale).to(denominator.dtype)
    return value, grad, dsw, dden


#: the placeholder for a derivative that was not asked for
_NOTHING = torch.empty(0)


def _denominator_weights(t2, kind, weight, opts, compute) -> torch.Tensor | float:
    """What each element adds to the mean's D per unit of sample weight: w_y over the non-ignored elements
    (0 for the ignored ones), 1 for probability targets."""
    if kind == "probs":
        return 1.0
    labels, too_big = _engines.labels_as_int64(t2.detach())
    active = torch.ones_like(labels, dtype=torch.bool) if opts.ignore_index is None else labels != opts.ignore_index
    if too_big is not None:
        active = active | too_big
    if weight is None:
        return active.to(compute)
    k = weight.shape[0]
    y = torch.where((labels >= 0) & (labels < k), labels, torch.zeros_like(labels))
    return torch.where(active, weight.detach().to(device=labels.device, dtype=compute)[y], 0.0)


# --------------------------------------------------------------------------------------------------------
# The custom op (torch.compile, fake tensors, subclasses, modes)
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op(_OP_NAME, mutates_args=())
def _fused(
    x2: torch.Tensor,
    t2: torch.Tensor,
    weight: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    numbers: torch.Tensor,
    spread: str,
    ignore_index: int | None,
    normalize: bool,
    reduction: str,
    empty_mean: str,
    convention: str | None,
    explicit: str,
    sample_weight: torch.Tensor | None,
    denominator: torch.Tensor | None,
    has_softcap: bool,
    sw_grad: bool,
    den_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # ``numbers``: (label_smoothing, z_loss, softcap) as float64 (see :func:`_numbers`), read here as values
    label_smoothing, z_loss, softcap = numbers.detach().cpu().tolist()
    opts = _op_options(
        convention,
        explicit,
        label_smoothing,
        spread,
        ignore_index,
        z_loss,
        normalize,
        reduction,
        empty_mean,
        softcap if has_softcap else None,
    )
    spec.check_softcap(opts.softcap, x2.dtype)
    # the class count against the options (spread="others" needs two classes when ε > 0), now that the
    # numeric options are known
    spec.check_layout(
        tuple(x2.shape),
        tuple(t2.shape),
        "probs" if t2.is_floating_point() else "index",
        opts,
        axis=1,
        class_mask_shape=None if class_mask is None else tuple(class_mask.shape),
    )
    value, grad, dsw, dden = _fused_full(
        x2, t2, weight, class_mask, opts, sample_weight, denominator, sw_grad, den_grad
    )
    # custom-op outputs are fresh tensors
    return value, grad, x2.new_empty((0,)) if dsw is _NOTHING else dsw, x2.new_empty((0,)) if dden is _NOTHING else dden


@_fused.register_fake
def _(x2, t2, weight, class_mask, numbers, spread, ignore_index, normalize, reduction, *rest):
    _, _, _, sample_weight, denominator, _, sw_grad, den_grad = rest
    value_shape = (x2.shape[0],) if reduction == "none" else ()
    dsw = sample_weight.new_empty(sample_weight.shape) if sw_grad else x2.new_empty((0,))
    dden = denominator.new_empty(()) if den_grad else x2.new_empty((0,))
    return x2.new_empty(value_shape), x2.new_empty(x2.shape), dsw, dden


def _setup_context(ctx, inputs, output) -> None:
    _, grad, dsw, dden = output
    ctx.mark_non_differentiable(grad, dsw, dden)
    ctx.set_materialize_grads(False)  # no logits-sized zeros for the (unused) gradient of ``grad``
    ctx.needs = (inputs[15], inputs[16])
    ctx.save_for_backward(*_to_save(ctx.needs, grad, dsw, dden))
    ctx.per_element = inputs[8] == "none"


def _op_backward(ctx, grad_value, *_):
    x_grad, sw_grad, den_grad = _backward(ctx, grad_value)
    return (x_grad,) + (None,) * 11 + (sw_grad, den_grad, None, None, None)


_fused.register_autograd(_op_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------
# The eager autograd.Function (plain tensors, torch.func transforms, forward-mode AD)
# --------------------------------------------------------------------------------------------------------
class _Fused(torch.autograd.Function):
    """Same body and backward as the op, plus forward-mode AD and a vmap rule, for ``torch.func``."""

    @staticmethod
    def forward(x2, t2, weight, class_mask, opts, sample_weight, denominator, needs):
        return _fused_full(x2, t2, weight, class_mask, opts, sample_weight, denominator, *needs)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, grad, dsw, dden = output
        ctx.mark_non_differentiable(grad, dsw, dden)
        ctx.set_materialize_grads(False)
        ctx.needs = inputs[7]
        saved = _to_save(ctx.needs, grad, dsw, dden)
        if torch._C._functorch.maybe_current_level() is None:
            ctx.save_for_backward(*saved)
        else:  # under torch.func: the inputs too, to tie a refused second derivative to them
            ctx.save_for_backward(*saved, inputs[0], inputs[5], inputs[6])
        ctx.save_for_forward(*saved)
        ctx.per_element = inputs[4].reduction == "none"

    @staticmethod
    def backward(ctx, grad_value, *_):
        x_grad, sw_grad, den_grad = _backward(ctx, grad_value)
        return x_grad, None, None, None, None, sw_grad, den_grad, None

    @staticmethod
    def jvp(ctx, x_tangent, _t, _w, _m, _o, sw_tangent=None, den_tangent=None, *_):
        """The loss's tangent: Σ_c grad_c · dx_c per element (the gradient already carries the mean's 1/D),
        plus ∂value/∂sample_weight · d(sample_weight) and ∂value/∂denominator · d(denominator)."""
        grad, dsw, dden, _ = _unsaved(ctx)
        parts = []
        if x_tangent is not None:
            product = grad * x_tangent.to(grad.dtype)
            parts.append(product.sum(dim=1) if ctx.per_element else product.sum())
        if sw_tangent is not None and ctx.needs[0]:
            product = (dsw * sw_tangent.to(dsw.dtype)).reshape(-1)
            parts.append(product if ctx.per_element else product.sum())
        if den_tangent is not None and ctx.needs[1]:
            parts.append(dden * den_tangent.to(dden.dtype))
        if not parts:
            return None, None, None, None
        tangent = parts[0].to(grad.dtype)
        for part in parts[1:]:
            tangent = tangent + part.to(grad.dtype)
        return tangent, None, None, None

    @staticmethod
    def vmap(info, in_dims, x2, t2, weight, class_mask, opts, sample_weight, denominator, needs):
        """One call per batch entry (each has its own reduction), stacked."""
        outputs = []
        tensors = (x2, t2, weight, class_mask, sample_weight, denominator)
        dims = in_dims[:4] + in_dims[5:7]
        for index in range(info.batch_size):
            picked = [
                tensor if dim is None or tensor is None else tensor.select(dim, index)
                for tensor, dim in zip(tensors, dims)
            ]
            outputs.append(_Fused.apply(*picked[:4], opts, *picked[4:], needs))
        return tuple(torch.stack(column) for column in zip(*outputs)), (0, 0, 0, 0)


class _EagerFused(torch.autograd.Function):
    """:class:`_Fused` for plain tensors: the same body, backward and tangent, at a lower per-call cost."""

    @staticmethod
    def forward(ctx, x2, t2, weight, class_mask, opts, sample_weight, denominator, needs):
        value, grad, dsw, dden = _fused_full(x2, t2, weight, class_mask, opts, sample_weight, denominator, *needs)
        ctx.set_materialize_grads(False)
        ctx.needs = needs
        saved = _to_save(needs, grad, dsw, dden)
        ctx.save_for_backward(*saved)
        if forward_ad._current_level >= 0:
            ctx.save_for_forward(*saved)
        ctx.per_element = opts.reduction == "none"
        return value

    @staticmethod
    def backward(ctx, grad_value):
        x_grad, sw_grad, den_grad = _backward(ctx, grad_value)
        return x_grad, None, None, None, None, sw_grad, den_grad, None

    @staticmethod
    def jvp(ctx, *tangents):
        return _Fused.jvp(ctx, *tangents)[0]


class _EagerPlain(torch.autograd.Function):
    """:class:`_EagerFused` without weight, class_mask, sample_weight and denominator (the usual call): only
    the logits are differentiated, and the backward of a plain ``loss.backward()`` is a short path."""

    @staticmethod
    def forward(ctx, x2, t2, opts):
        value, grad, _, _ = _fused_full(x2, t2, None, None, opts)
        ctx.set_materialize_grads(False)
        ctx.needs = (False, False)
        ctx.save_for_backward(grad)
        if forward_ad._current_level >= 0:
            ctx.save_for_forward(grad)
        ctx.per_element = opts.reduction == "none"
        return value

    @staticmethod
    def backward(ctx, grad_value):
        if grad_value is None or torch.is_grad_enabled() or type(grad_value) is not torch.Tensor or _graph_kept():
            return _backward(ctx, grad_value)[0], None, None
        # released after this call, plain tensors, no create_graph: _input_grad's in-place case
        (grad,) = ctx.saved_tensors
        scale = grad_value if grad_value.dtype == grad.dtype else grad_value.to(grad.dtype)
        if ctx.per_element:
            return grad.mul_(scale.reshape(-1, 1)), None, None
        if grad.device.type == "cpu" and scale.item() == 1.0:
            return grad, None, None
        return grad.mul_(scale), None, None

    @staticmethod
    def jvp(ctx, x_tangent, _t, _o):
        return _Fused.jvp(ctx, x_tangent, None, None, None, None)[0]


def _to_save(needs, grad, dsw, dden) -> tuple[torch.Tensor, ...]:
    """The tensors a backward needs: the gradient, and the derivatives for sample_weight and denominator
    only when they were asked for."""
    return (grad,) + ((dsw,) if needs[0] else ()) + ((dden,) if needs[1] else ())


def _unsaved(ctx) -> tuple[Any, Any, Any, list]:
    """(gradient, ∂value/∂sample_weight or None, ∂value/∂denominator or None, the inputs saved under torch.func)."""
    grad, *rest = ctx.saved_tensors
    dsw = rest.pop(0) if ctx.needs[0] else None
    dden = rest.pop(0) if ctx.needs[1] else None
    return grad, dsw, dden, rest


def _backward(ctx, grad_value: torch.Tensor | None) -> tuple[Any, Any, Any]:
    """(∂/∂logits, ∂/∂sample_weight, ∂/∂denominator) of the upstream gradient times the value."""
    grad, dsw, dden, inputs = _unsaved(ctx)
    x_grad = _input_grad(ctx, grad_value, grad, inputs[0] if inputs else None)
    sw_grad = den_grad = None
    if grad_value is None:
        return x_grad, None, None
    tie = bool(inputs) and torch.is_grad_enabled()  # torch.func's create_graph: refuse a second derivative
    if ctx.needs[0]:
        upstream = grad_value.to(dsw.dtype)
        sw_grad = dsw * (upstream.reshape(dsw.shape) if ctx.per_element else upstream)
        if tie:
            sw_grad = _FirstOrderOnly.apply(sw_grad, inputs[1])
    if ctx.needs[1]:
        den_grad = dden * grad_value.to(dden.dtype)
        if tie:
            den_grad = _FirstOrderOnly.apply(den_grad, inputs[2])
    return x_grad, sw_grad, den_grad


def _input_grad(ctx, grad_value: torch.Tensor | None, grad: torch.Tensor, logits: Any = None) -> torch.Tensor | None:
    """The logits' gradient: the saved one times the upstream gradient."""
    if grad_value is None:
        return None
    traced = torch.compiler.is_compiling() or _is_traced(grad) or _is_traced(grad_value)
    if torch.is_grad_enabled() and not traced:
        raise RuntimeError(FIRST_ORDER_ONLY)
    scale = grad_value.to(grad.dtype)
    scale = scale.reshape(-1, 1) if ctx.per_element else scale
    if traced or _graph_kept():
        product = grad * scale
        if logits is not None and torch.is_grad_enabled():
            # torch.func differentiates with create_graph: a second derivative must fail, not come out zero
            return _FirstOrderOnly.apply(product, logits)
        return product
    # The graph is released after this call: reuse the saved buffer as the result (no copy), so that
    # fwd+bwd holds a single logits-sized buffer. On the CPU, skip the pass for the usual loss.backward();
    # elsewhere reading the scalar would synchronise the device, so the buffer is always scaled.
    if grad.device.type == "cpu" and scale.device.type == "cpu" and scale.numel() == 1 and float(scale) == 1.0:
        return grad
    return grad.mul_(scale)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on a gradient computed under ``torch.func``, tied to the logits, whose derivative is refused."""

    generate_vmap_rule = True

    @staticmethod
    def forward(tensor, logits):
        return tensor.view_as(tensor)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "lsx.torch.loss supports first-order gradients only (its gradient is computed in the forward pass); "
            "second derivatives (double backward, nested torch.func.grad, hessian) are not supported"
        )

    @staticmethod
    def jvp(ctx, *_):
        raise RuntimeError(
            "lsx.torch.loss supports first-order gradients only (its gradient is computed in the forward pass); "
            "second derivatives (double backward, nested torch.func.grad, hessian) are not supported"
        )


_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _graph_kept() -> bool:
    """Whether this backward runs with retain_graph=True (then the saved buffer must stay intact)."""
    return True if _keep_graph is None else bool(_keep_graph())


def _is_traced(tensor: torch.Tensor) -> bool:
    """Fake, meta, subclassed or functorch-wrapped: not a buffer to scale in place or read on the host."""
    return type(tensor) is not torch.Tensor or tensor.is_meta or torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _check_labels(labels: np.ndarray, k: int, opts: spec.Options, mask: np.ndarray | None) -> None:
    """``spec.check_labels``, after a quick pass that settles the usual case (all labels valid) in a few ops.

    Every comparison stays inside the labels' dtype without wrapping: K is only compared with a label when
    the dtype holds K (else every non-negative label is below K), and a signed label is read through the
    unsigned view (negatives become at least 2**(bits − 1) > K) only then.
    """
    if mask is None and labels.dtype.kind in "iu" and labels.size:
        unsigned, low, high = _unsigned_view(labels.dtype)
        if k > high:  # every value the dtype holds is below K: only a negative label can be out of range
            if low == 0 or labels.min() >= 0:
                return
        else:
            as_unsigned = labels if low == 0 else labels.view(unsigned)
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
