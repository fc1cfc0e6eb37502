"""Fused linear + loss for PyTorch: the exact lsx loss of ``input @ linear_weight.T + linear_bias`` without
ever holding the (N, V) logits.

The rows are processed in chunks. For each chunk the logits ``h_c @ W.T + b`` are computed in the compute
dtype (float64 for float64 inputs, float32 otherwise), the fused engine of :mod:`lsx.torch._function` turns
them into the per-element losses and ∂Σloss/∂logits (the Numba row kernel on CPU float32/float64, plain
torch ops elsewhere), and the chunk's gradient is pushed through the projection at once:
``grad_h_c = g_c @ W``, ``grad_W += g_c.T @ h_c``, ``grad_b += Σ_rows g_c``. Only statistics (per-element
losses) cross chunk boundaries; the chunk's logits are dropped before the next one.

- ``reduction="mean"``/``"sum"``: the gradients are computed in the forward pass (one matmul for the logits,
  two for the gradients, as for the materialised path) and the backward pass scales them by the upstream
  scalar.
- ``reduction="none"``: the upstream gradient is a vector, known only in the backward pass, which
  recomputes each chunk's logits and scales each row by its upstream entry (never an all-ones assumption).

``sample_weight`` and the mean's denominator are applied outside the custom ops with plain torch ops, so
autograd differentiates them too (``∂mean/∂sw_j = (ℓ_j − mean·w_{y_j})/D``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd import forward_ad

from lsx import spec
from lsx.spec import default
from lsx.torch import _engines
from lsx.torch import _function as _torch_function
from lsx.torch._engines import numba as _numba

__all__ = ["LinearCrossEntropyLoss", "linear_loss"]


def linear_loss(
    input: torch.Tensor,
    linear_weight: torch.Tensor,
    target: torch.Tensor,
    *,
    linear_bias: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    reduction: str = default("mean"),
    ignore_index: int | None = None,
    label_smoothing: float = default(0.0),
    options: Any = None,
    spread: spec.Spread = default("all"),
    z_loss: float = default(0.0),
    normalize: bool = default(False),
    class_mask: Any = None,
    empty_mean: spec.EmptyMean = default("nan"),
    softcap: float | None = None,
    sample_weight: torch.Tensor | None = None,
    denominator: Any = None,
    convention: str | None = None,
    chunk_size: int | None = None,
    process_group: Any = None,
) -> torch.Tensor:
    given: dict[str, Any] = dict(
        label_smoothing=label_smoothing,
        spread=spread,
        z_loss=z_loss,
        normalize=normalize,
        reduction=reduction,
        empty_mean=empty_mean,
        softcap=softcap,
        denominator=denominator,
    )
    if ignore_index is not None:  # None is torch's "−100 for labels" (or the convention's choice)
        given["ignore_index"] = ignore_index
    opts = spec.resolve_options(convention, **given)
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    resolve = _torch_function.resolve_neg  # (lazily negated views: the kernels read memory)
    input, linear_weight, target = resolve(input), resolve(linear_weight), resolve(target)
    linear_bias, weight, sample_weight = resolve(linear_bias), resolve(weight), resolve(sample_weight)
    if process_group is not None:
        from lsx.torch import _parallel

        if isinstance(input, torch.Tensor):
            spec.check_softcap(opts.softcap, input.dtype)
        return _parallel.linear_cross_entropy(
            input,
            linear_weight,
            target,
            linear_bias,
            weight,
            class_mask,
            sample_weight,
            opts,
            process_group,
            chunk_size,
        )
    return _linear_loss(input, linear_weight, target, linear_bias, weight, class_mask, sample_weight, opts, chunk_size)


linear_loss.__doc__ = """Label-smoothed cross-entropy of ``input @ linear_weight.T + linear_bias``, computed in row
chunks so that the (N, V) logits are never held; a drop-in for ``torch.nn.functional.linear_cross_entropy``.

Same names, order and defaults as torch's function, plus the lsx options keyword-only; equal to
``lsx.torch.loss(torch.nn.functional.linear(input, linear_weight, linear_bias), target, ...)`` (the
definition and every option are those of :mod:`lsx.spec`), loss and gradients, for every option.

Args:
    input: (..., H) or (H,) floating tensor (float64, float32, float16 or bfloat16; the last two are computed
        and accumulated in float32, the weight gradient included).
    linear_weight: (V, H), the input's dtype.
    target: integer labels shaped like ``input.shape[:-1]`` (any integer dtype), or probabilities shaped
        ``input.shape[:-1] + (V,)``.
    linear_bias: (V,) or None.
    weight, reduction, label_smoothing: as in torch (class weights (V,); ``"mean"``, ``"sum"`` or ``"none"``).
    ignore_index: None (default) means torch's −100 for labels, or the convention's choice (``None`` for
        ``"keras"``); an int sets it.
    options: a ``torch.nn.LinearCrossEntropyOptions``, accepted for compatibility: lsx always chunks; its
        ``batch_chunk_size``, when set, is used as ``chunk_size`` unless ``chunk_size`` is given.
    spread, z_loss, normalize, class_mask, empty_mean, softcap, sample_weight, denominator, convention: the lsx
        options (keyword-only), as in :func:`lsx.torch.loss`. ``sample_weight`` has the per-element loss's
        shape (``input.shape[:-1]``) and is differentiated; ``denominator`` may be a number or a 0-d tensor
        (kept on its device).
    chunk_size: rows per chunk. None (default) picks ``max(1, 2**22 // V)`` rows (a chunk of logits holds
        at most 2**22 elements, 16 MiB in float32, or one row when V > 2**22; on CUDA ``2**27 // V``, so
        the matmuls run near the GPU's peak), then evens the chunks out:
        with ``n = ceil(N / rows)`` chunks, each holds ``ceil(N / n)`` rows. A positive int wins.
    process_group: a ``torch.distributed`` group over which the vocabulary is split, in rank order:
        ``linear_weight``/``linear_bias`` (and ``weight``, ``class_mask``, probability targets) are this rank's
        rows (the tensor-parallel LM head); labels are global. Equal to the single-device loss (see
        ``lsx.torch.loss``'s ``process_group``); ``linear_weight``'s gradient is this rank's rows, and
        ``input``'s is the full gradient on every rank, already summed over the group (do not reduce it
        again). Fused as without a group: this rank's (N, V_r) logits are never held (two passes over row
        chunks of ``chunk_size`` rows, the second in the backward); per call, a fixed-size header and 48
        bytes per row are all-gathered, and the backward all-reduces the (N, H) input gradient. Eager calls
        only; ``sample_weight`` is not differentiated with a group.

Returns:
    The loss in the input's dtype: a scalar, or ``input.shape[:-1]`` for ``reduction="none"``.
    Differentiable once in ``input``, ``linear_weight``, ``linear_bias`` and ``sample_weight`` (with every
    reduction, ``"none"`` with any upstream gradient; a second derivative, ``create_graph=True``, raises);
    forward-mode AD (``torch.func.jvp``, ``torch.autograd.forward_ad``) gives the directional derivative;
    ``torch.func.grad``/``vjp``/``functional_call`` work; works under ``torch.compile``.

Raises:
    ValueError: a bad ``chunk_size``, an ``input`` whose last dim is not ``linear_weight``'s H, a
        ``linear_weight``/``linear_bias``/``weight``/``class_mask``/``sample_weight``/``target`` of the wrong
        shape, a label outside [0, V) (CPU tensors; elsewhere its element is NaN), or an invalid option.

Example:
    >>> import torch, lsx.torch
    >>> h, w = torch.randn(6, 4, dtype=torch.float64), torch.randn(10, 4, dtype=torch.float64)
    >>> y = torch.tensor([1, 2, 3, 4, 5, 6])
    >>> fused = lsx.torch.linear_loss(h, w, y, label_smoothing=0.1, spread="others", chunk_size=4)
    >>> bool(torch.isclose(fused, lsx.torch.loss(h @ w.T, y, label_smoothing=0.1, spread="others")))
    True
"""


# --------------------------------------------------------------------------------------------------------
# Validation and the autograd-visible composition
# --------------------------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _linear_loss(input, linear_weight, target, linear_bias, weight, class_mask, sample_weight, opts, chunk_size):
    chunk_size = _engines.check_chunk_size(chunk_size)
    if not isinstance(input, torch.Tensor) or not input.is_floating_point():
        raise TypeError(f"input must be a floating-point tensor, got {_torch_function._describe(input)}")
    if input.dim() < 1:
        raise ValueError(f"input must have shape (..., H), got a tensor of shape {tuple(input.shape)}")
    if not isinstance(linear_weight, torch.Tensor) or linear_weight.dim() != 2:
        shape = tuple(linear_weight.shape) if isinstance(linear_weight, torch.Tensor) else type(linear_weight)
        raise ValueError(f"linear_weight must be a (V, H) tensor, got {shape}")
    v, h = linear_weight.shape
    if input.shape[-1] != h:
        raise ValueError(
            f"input's last dim ({input.shape[-1]}) must equal linear_weight's H: linear_weight has shape "
            f"{tuple(linear_weight.shape)} (V, H), input has shape {tuple(input.shape)}"
        )
    if linear_weight.dtype != input.dtype:
        raise TypeError(f"linear_weight must have the input's dtype {input.dtype}, got {linear_weight.dtype}")
    if linear_bias is not None:
        if not isinstance(linear_bias, torch.Tensor) or tuple(linear_bias.shape) != (v,):
            shape = tuple(linear_bias.shape) if isinstance(linear_bias, torch.Tensor) else type(linear_bias)
            raise ValueError(f"linear_bias must have shape ({v},) (one entry per class), got {shape}")
        if linear_bias.dtype != input.dtype:
            raise TypeError(f"linear_bias must have the input's dtype {input.dtype}, got {linear_bias.dtype}")
    if v == 0:
        raise ValueError("linear_weight has no classes (V = 0)")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor, got {_torch_function._describe(target)}")
    kind = _torch_function._target_kind(target.dtype)
    if kind == "probs" and target.requires_grad and torch.is_grad_enabled():
        raise ValueError("lsx.torch.linear_loss does not differentiate the target probabilities; pass target.detach()")
    lead = tuple(input.shape[:-1])
    device = input.device
    weight = _torch_function._as_tensor(weight, "weight", device)
    class_mask = _torch_function._as_tensor(class_mask, "class_mask", None)
    if sample_weight is not None:
        if not isinstance(sample_weight, torch.Tensor):
            sample_weight = torch.as_tensor(np.asarray(sample_weight))
        if sample_weight.dtype == torch.bool or sample_weight.is_complex():
            raise TypeError(f"sample_weight must be a real tensor, got dtype {sample_weight.dtype}")
    spec.check_layout(
        lead + (v,),
        tuple(target.shape),
        kind,
        opts,
        axis=-1,
        weight_shape=None if weight is None else tuple(weight.shape),
        class_mask_shape=None if class_mask is None else tuple(class_mask.shape),
        sample_weight_shape=None if sample_weight is None else tuple(sample_weight.shape),
    )
    spec.check_softcap(opts.softcap, input.dtype)
    compiling = torch.compiler.is_compiling()
    sw_np = weight_np = None
    if sample_weight is not None and sample_weight.device.type == "cpu" and not compiling:
        if not _torch_function._is_traced(sample_weight):
            sw_np = spec.check_sample_weight(sample_weight.detach().to(torch.float64).numpy(), lead)
    if weight is not None and weight.device.type == "cpu" and not compiling and not _torch_function._is_traced(weight):
        weight_np = spec.check_weight(weight.to(torch.float64).numpy(), v)
    if weight_np is not None or sw_np is not None:
        spec.check_weight_range(input.dtype, weight=weight_np, sample_weight=sw_np, num_elements=math.prod(lead))
    denominator = opts.denominator
    if isinstance(denominator, torch.Tensor) and denominator.device.type == "cpu" and not compiling:
        if not _torch_function._is_traced(denominator):
            spec.check_denominator(denominator.detach().to(torch.float64).numpy())
    if compiling:  # the values are checked when the graph runs, as lsx.torch.loss's op does
        if sample_weight is not None:
            sample_weight = _checked(sample_weight, "sample_weight", str(input.dtype).removeprefix("torch."))
        if isinstance(denominator, torch.Tensor):
            denominator = _checked(denominator, "denominator", "")

    compute = _compute_dtype(input.dtype)
    n = math.prod(lead)
    h2 = input.reshape(n, h)
    t2 = target.reshape(n) if kind == "index" else target.reshape(n, v)
    sw2 = None if sample_weight is None else sample_weight.to(device=device, dtype=compute).reshape(n)
    rows = _engines.rows_per_chunk(n, v, chunk_size, input.device)
    scalars = (opts.label_smoothing, opts.spread, opts.ignore_index, opts.z_loss, opts.normalize, opts.softcap)
    grad_on = torch.is_grad_enabled()
    eager = _eager(h2, linear_weight, linear_bias, t2, sw2)
    # forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) takes its tangent from the gradients
    forward = eager and (forward_ad._current_level >= 0 or torch._C._are_functorch_transforms_active())
    need = (
        forward or (grad_on and input.requires_grad),
        forward or (grad_on and linear_weight.requires_grad),
        linear_bias is not None and (forward or (grad_on and linear_bias.requires_grad)),
    )

    if opts.reduction == "none":
        none = _LinearNone.apply if eager else _linear_none
        per_element = none(h2, linear_weight, linear_bias, t2, weight, class_mask, *scalars, rows)
        if sw2 is not None:
            per_element = per_element * sw2
        return per_element.to(input.dtype).reshape(lead)

    total_sum = _LinearSum.apply if eager else _linear_sum
    total, *_ = total_sum(h2, linear_weight, linear_bias, t2, weight, class_mask, sw2, *scalars, rows, *need)
    if opts.reduction == "mean":
        if denominator is not None:
            d = denominator.to(device=device, dtype=compute) if isinstance(denominator, torch.Tensor) else denominator
        else:
            d = _denominator(t2, kind, weight, sw2, opts.ignore_index, v, n, compute, device)
        if not isinstance(d, torch.Tensor):
            d = torch.full((), float(d), dtype=compute, device=device)
        total = spec.reduce_total("mean", total, d, opts.empty_mean, where=torch.where)
    return total.to(input.dtype)


def _denominator(t2, kind, weight, sw2, ignore_index, v, n, compute, device):
    """The mean's D: Σ sample_weight·w_y over the non-ignored elements (labels), Σ sample_weight (probabilities)."""
    if kind == "probs":
        return n if sw2 is None else sw2.sum()
    labels, too_big = _engines.labels_as_int64(t2.detach().to(device))
    active = torch.ones_like(labels, dtype=torch.bool) if ignore_index is None else labels != ignore_index
    if too_big is not None:
        active = active | too_big
    if weight is None:
        w_y = active.to(compute)
    else:
        in_range = (labels >= 0) & (labels < v)
        if too_big is not None:
            in_range = in_range & ~too_big
        y = torch.where(in_range, labels, torch.zeros_like(labels))
        w_y = torch.where(active, weight.to(device=device, dtype=compute)[y], 0.0)
    if sw2 is not None:
        w_y = w_y * sw2
    return w_y.sum()


# --------------------------------------------------------------------------------------------------------
# The chunked body
# --------------------------------------------------------------------------------------------------------
def _engine_options(label_smoothing, spread, ignore_index, z_loss, normalize) -> spec.Options:
    """The engine's options: per-element losses (``reduction="none"``), no soft-capping: it is applied once,
    by :func:`_chunk` around the plain-torch engine or inside the Numba kernel's sweep (``_numba_for``), never
    by the engine as well."""
    opts = _torch_function._op_options(
        None,
        "label_smoothing,z_loss,ignore_index",
        label_smoothing,
        spread,
        ignore_index,
        z_loss,
        normalize,
        "none",
        "nan",
    )
    return opts if opts.softcap is None else dataclasses.replace(opts, softcap=None)


def _numba_for(h2, t2, weight, class_mask, opts, softcap) -> _numba.Prepared | str | None:
    """The chunks' engine: the fused Numba kernel (CPU; the chunks' logits are float32 or float64), ``"triton"``
    (the two steps in place, CUDA), or None: every chunk through ``_fused_impl`` (the plain-torch engine)."""
    if _torch_function._is_traced(h2):
        return None
    engine = _engines.choose(h2, dtype=_compute_dtype(h2.dtype))
    if engine == "triton":
        return engine
    if engine != "numba":
        return None
    return _numba.prepare(h2.dtype, t2, weight, class_mask, opts, softcap)


def _logits_buffer(rows, w) -> torch.Tensor:
    """One (rows, V) buffer in the compute dtype for every chunk's logits (and, in place, their gradient)."""
    return torch.empty((rows, w.shape[0]), dtype=w.dtype, device=w.device)


def _chunk(h2, w, b, t2, weight, class_mask, opts, softcap, start, stop, numba, row_scale, buffer, want_grad=True):
    """(per-element loss, ∂Σ row_scale·loss/∂logits, the chunk's inputs) of rows [start, stop), in the compute
    dtype; ``row_scale`` (rows,) or None. The logits are written into ``buffer``'s leading rows (shared by
    every chunk of the call, so that no chunk allocates a logits-sized tensor); the gradient returned may
    live there too, and is valid until the next chunk."""
    hc, logits = _engines.chunk_logits(h2, w, b, start, stop, buffer)
    tc = t2[start:stop]
    if numba == "triton":  # in place: statistics, a one-block merge, the gradient over the logits
        kind = "probs" if tc.is_floating_point() else "index"
        chunk_opts = dataclasses.replace(opts, softcap=softcap)
        target = logits if want_grad else None
        loss, _ = _engines.run("triton", logits, tc, kind, chunk_opts, weight, class_mask, target, row_scale)
        return loss, target, hc
    if numba is not None:  # in place: the logits' buffer becomes their gradient
        loss, grad = _numba.chunk(numba, logits, tc, row_scale, want_grad)
        return loss, grad, hc
    chain = None
    if softcap is not None:
        tanh = logits.div_(softcap).tanh_()
        logits = tanh * softcap
        chain = tanh.mul_(tanh).neg_().add_(1.0)  # 1 − tanh²(x/c), in the tanh buffer
    loss, grad = _torch_function._fused_impl(logits, tc, weight, class_mask, opts)
    del logits
    if chain is not None:
        grad = grad.mul_(chain)
    if row_scale is not None:
        grad = grad.mul_(row_scale.detach().unsqueeze(1))
    return loss, grad, hc


def _push_back(g, hc, wc, grad_h_rows, grad_w, grad_b, need_b) -> None:
    """The chunk's gradient through the projection, in place: ``grad_h_rows = g @ W``, ``grad_W += g.T @ h_c``,
    ``grad_b += Σ_rows g`` (``grad_h_rows``/``grad_w`` None when not needed)."""
    if grad_h_rows is not None:
        torch.mm(g, wc, out=grad_h_rows)
    if grad_w is not None:
        grad_w.addmm_(g.T, hc)
    if need_b:
        grad_b.add_(g.sum(dim=0))


def _compute_weights(w, b, compute):
    return w.detach().to(compute), None if b is None else b.detach().to(compute)


def _check_labels(t2, v, opts, class_mask):
    """The labels (or the probabilities' mass on removed classes), once for the whole call, on the CPU."""
    if t2.device.type != "cpu" or _torch_function._is_traced(t2):
        return
    # the mask is read only where it lives on the CPU too (a device mask is never read on the host)
    on_cpu = class_mask is not None and class_mask.device.type == "cpu" and not _torch_function._is_traced(class_mask)
    mask_np = class_mask.numpy() if on_cpu else None
    if t2.is_floating_point():
        if mask_np is not None:
            spec.check_probability_target_mask(t2.to(torch.float64).numpy(), -1, mask_np)
    else:
        _torch_function._check_labels(t2.numpy(), v, opts, mask_np)


def _forward_sum(h2, w, b, t2, weight, class_mask, sw, scalars, rows, need_h, need_w, need_b):
    """(Σ sw·ℓ, ℓ, ∂/∂h, ∂/∂W, ∂/∂b) of Σ_i sw_i ℓ_i, gradients in the compute dtype (empty when not needed)."""
    *numeric, softcap = scalars
    opts = _engine_options(*numeric)
    n, v = h2.shape[0], w.shape[0]
    compute = _compute_dtype(h2.dtype)
    _check_labels(t2, v, opts, class_mask)
    numba = _numba_for(h2, t2, weight, class_mask, opts, softcap)
    wc, bc = _compute_weights(w, b, compute)
    h2 = h2.detach()
    want_grad = need_h or need_w or need_b
    per_element = torch.empty(n, dtype=compute, device=h2.device)
    grad_h = torch.empty(h2.shape if need_h else (0,), dtype=compute, device=h2.device)
    grad_w = torch.zeros(wc.shape if need_w else (0,), dtype=compute, device=h2.device)
    grad_b = torch.zeros((v,) if need_b else (0,), dtype=compute, device=h2.device)
    buffer = _logits_buffer(rows, wc)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        scale = None if sw is None else sw[start:stop]
        args = (start, stop, numba, scale, buffer, want_grad)
        loss, g, hc = _chunk(h2, wc, bc, t2, weight, class_mask, opts, softcap, *args)
        per_element[start:stop] = loss
        _push_back(g, hc, wc, grad_h[start:stop] if need_h else None, grad_w if need_w else None, grad_b, need_b)
        del loss, g, hc
    weighted = per_element if sw is None else per_element * sw.detach()
    return weighted.sum(), per_element, grad_h, grad_w, grad_b


def _backward_none(upstream, h2, w, b, t2, weight, class_mask, scalars, rows, need_h, need_w, need_b):
    """(∂/∂h, ∂/∂W, ∂/∂b) of Σ_i upstream_i ℓ_i, in the compute dtype: each chunk's logits recomputed."""
    *numeric, softcap = scalars
    opts = _engine_options(*numeric)
    n, v = h2.shape[0], w.shape[0]
    compute = _compute_dtype(h2.dtype)
    numba = _numba_for(h2, t2, weight, class_mask, opts, softcap)
    wc, bc = _compute_weights(w, b, compute)
    h2 = h2.detach()
    upstream = upstream.to(compute)
    grad_h = torch.empty(h2.shape if need_h else (0,), dtype=compute, device=h2.device)
    grad_w = torch.zeros(wc.shape if need_w else (0,), dtype=compute, device=h2.device)
    grad_b = torch.zeros((v,) if need_b else (0,), dtype=compute, device=h2.device)
    buffer = _logits_buffer(rows, wc)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        args = (start, stop, numba, upstream[start:stop], buffer)
        _, g, hc = _chunk(h2, wc, bc, t2, weight, class_mask, opts, softcap, *args)
        _push_back(g, hc, wc, grad_h[start:stop] if need_h else None, grad_w if need_w else None, grad_b, need_b)
        del g, hc
    return grad_h, grad_w, grad_b


def _forward_none(h2, w, b, t2, weight, class_mask, scalars, rows):
    *numeric, softcap = scalars
    opts = _engine_options(*numeric)
    compute = _compute_dtype(h2.dtype)
    _check_labels(t2, w.shape[0], opts, class_mask)
    numba = _numba_for(h2, t2, weight, class_mask, opts, softcap)
    wc, bc = _compute_weights(w, b, compute)
    h2 = h2.detach()
    n = h2.shape[0]
    per_element = torch.empty(n, dtype=compute, device=h2.device)
    buffer = _logits_buffer(rows, wc)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        chunk = _chunk(
            h2, wc, bc, t2, weight, class_mask, opts, softcap, start, stop, numba, None, buffer, numba is None
        )  # (the plain-torch engine computes the gradient anyway)
        per_element[start:stop] = chunk[0]
        del chunk
    return per_element


# --------------------------------------------------------------------------------------------------------
# Custom ops (eager and torch.compile alike)
# --------------------------------------------------------------------------------------------------------
@torch.library.custom_op("lsx::linear_cross_entropy_sum", mutates_args=())
def _linear_sum(
    h2: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    t2: torch.Tensor,
    weight: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    sw: torch.Tensor | None,
    label_smoothing: float,
    spread: str,
    ignore_index: int | None,
    z_loss: float,
    normalize: bool,
    softcap: float | None,
    rows: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    scalars = (label_smoothing, spread, ignore_index, z_loss, normalize, softcap)
    return _forward_sum(h2, w, b, t2, weight, class_mask, sw, scalars, rows, need_h, need_w, need_b)


@_linear_sum.register_fake
def _(h2, w, b, t2, weight, class_mask, sw, *args):
    need_h, need_w, need_b = args[-3:]
    compute = _compute_dtype(h2.dtype)
    n, v = h2.shape[0], w.shape[0]
    return (
        h2.new_empty((), dtype=compute),
        h2.new_empty((n,), dtype=compute),
        h2.new_empty(h2.shape if need_h else (0,), dtype=compute),
        h2.new_empty(w.shape if need_w else (0,), dtype=compute),
        h2.new_empty((v,) if need_b else (0,), dtype=compute),
    )


def _sum_setup_context(ctx, inputs, output) -> None:
    _, per_element, grad_h, grad_w, grad_b = output
    ctx.mark_non_differentiable(per_element, grad_h, grad_w, grad_b)
    ctx.set_materialize_grads(False)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, None if inputs[2] is None else inputs[2].dtype)
    ctx.has_sw = inputs[6] is not None
    ctx.held = None
    if torch.compiler.is_compiling() or any(map(_torch_function._is_traced, output)):
        ctx.save_for_backward(per_element, grad_h, grad_w, grad_b)
    else:
        # held outside save_for_backward, so that a backward which releases the graph can hand the buffers
        # over as the gradients (AccumulateGrad then keeps them as .grad: no weight-sized copy)
        ctx.held = [per_element, grad_h, grad_w, grad_b]


def _sum_backward(ctx, grad_total, *_unused):
    held, ctx.held = ctx.held, None
    keep = held is not None and _torch_function._graph_kept()
    if keep:
        ctx.held = held
    per_element, grad_h, grad_w, grad_b = (ctx.saved_tensors if held is None else held)[:4]
    del held
    outputs: list[Any] = [None] * 17
    if grad_total is None:
        return tuple(outputs)
    scale = grad_total.to(per_element.dtype)
    traced = torch.compiler.is_compiling() or any(map(_torch_function._is_traced, (scale, per_element)))
    in_place = not traced and not keep and not torch.is_grad_enabled()
    unit = in_place and scale.device.type == "cpu" and per_element.device.type == "cpu" and float(scale) == 1.0
    grads = [grad_h, grad_w, grad_b]
    del grad_h, grad_w, grad_b
    for index, dtype in enumerate(ctx.dtypes):
        grad, grads[index] = grads[index], None
        if dtype is None or not ctx.needs_input_grad[index]:
            continue
        if not unit:
            grad = grad.mul_(scale) if in_place else grad * scale
        outputs[index] = grad.to(dtype)
        del grad
    if ctx.has_sw and ctx.needs_input_grad[6]:
        outputs[6] = per_element * scale
    return tuple(outputs)


_linear_sum.register_autograd(_sum_backward, setup_context=_sum_setup_context)


@torch.library.custom_op("lsx::linear_cross_entropy_none", mutates_args=())
def _linear_none(
    h2: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    t2: torch.Tensor,
    weight: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    label_smoothing: float,
    spread: str,
    ignore_index: int | None,
    z_loss: float,
    normalize: bool,
    softcap: float | None,
    rows: int,
) -> torch.Tensor:
    scalars = (label_smoothing, spread, ignore_index, z_loss, normalize, softcap)
    return _forward_none(h2, w, b, t2, weight, class_mask, scalars, rows)


@_linear_none.register_fake
def _(h2, *_):
    return h2.new_empty((h2.shape[0],), dtype=_compute_dtype(h2.dtype))


@torch.library.custom_op("lsx::linear_cross_entropy_none_backward", mutates_args=())
def _linear_none_backward(
    upstream: torch.Tensor,
    h2: torch.Tensor,
    w: torch.Tensor,
    b: torch.Tensor | None,
    t2: torch.Tensor,
    weight: torch.Tensor | None,
    class_mask: torch.Tensor | None,
    label_smoothing: float,
    spread: str,
    ignore_index: int | None,
    z_loss: float,
    normalize: bool,
    softcap: float | None,
    rows: int,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    scalars = (label_smoothing, spread, ignore_index, z_loss, normalize, softcap)
    return _backward_none(upstream, h2, w, b, t2, weight, class_mask, scalars, rows, need_h, need_w, need_b)


@_linear_none_backward.register_fake
def _(upstream, h2, w, *args):
    need_h, need_w, need_b = args[-3:]
    compute = _compute_dtype(h2.dtype)
    return (
        h2.new_empty(h2.shape if need_h else (0,), dtype=compute),
        h2.new_empty(w.shape if need_w else (0,), dtype=compute),
        h2.new_empty((w.shape[0],) if need_b else (0,), dtype=compute),
    )


def _none_setup_context(ctx, inputs, output) -> None:
    h2, w, b, t2, weight, class_mask, *scalars = inputs
    ctx.save_for_backward(h2, w, b, t2, weight, class_mask)
    ctx.scalars = tuple(scalars)


def _none_backward(ctx, upstream):
    h2, w, b, t2, weight, class_mask = ctx.saved_tensors
    need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    need_b = b is not None and ctx.needs_input_grad[2]
    outputs: list[Any] = [None] * 13
    if upstream is None or not (need_h or need_w or need_b):
        return tuple(outputs)
    grads = _linear_none_backward(upstream, h2, w, b, t2, weight, class_mask, *ctx.scalars, need_h, need_w, need_b)
    for index, (grad, tensor) in enumerate(zip(grads, (h2, w, b))):
        if ctx.needs_input_grad[index] and tensor is not None:
            outputs[index] = grad.to(tensor.dtype)
    return tuple(outputs)


_linear_none.register_autograd(_none_backward, setup_context=_none_setup_context)


@torch.library.custom_op("lsx::linear_checked_values", mutates_args=())
def _checked(tensor: torch.Tensor, name: str, dtype: str) -> torch.Tensor:
    """``tensor`` (a copy) once its values pass their check on the CPU: under torch.compile the sample weights
    (finite, >= 0, not overflowing ``dtype``'s compute dtype) and a tensor denominator (finite, >= 0) are
    known only when the graph runs; a device tensor is not read on the host."""
    if tensor.device.type == "cpu":
        values = tensor.detach().to(torch.float64).numpy()
        if name == "sample_weight":
            spec.check_weight_range(dtype, sample_weight=spec.check_sample_weight(values, tuple(tensor.shape)))
        else:
            spec.check_denominator(values)
    return tensor.clone()


@_checked.register_fake
def _(tensor, name, dtype):
    return torch.empty_like(tensor)


_checked.register_autograd(lambda ctx, grad: (grad, None, None))


# --------------------------------------------------------------------------------------------------------
# Eager calls: the same bodies as autograd.Functions (torch.func transforms, forward-mode AD, a refused
# second derivative)
# --------------------------------------------------------------------------------------------------------
_FIRST_ORDER = (
    "lsx.torch.linear_loss supports first-order gradients only (its gradients are computed in the forward pass, "
    "or by a chunked backward that is not itself differentiated); double backward / create_graph=True "
    "(gradient penalties, torch.autograd.functional.hvp, nested torch.func.grad, hessian) is not supported"
)


class _FirstOrderOnly(_torch_function._FirstOrderOnly):
    """Identity on a gradient computed under ``torch.func``, tied to an input; its derivative is refused."""

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(_FIRST_ORDER)

    @staticmethod
    def jvp(ctx, *_):
        raise RuntimeError(_FIRST_ORDER)


def _eager(*tensors) -> bool:
    """Whether the call runs through the autograd.Functions below (plain tensors, parameters and torch.func's
    wrapped tensors) rather than the custom ops (torch.compile, fake and meta tensors, subclasses, modes)."""
    if torch.compiler.is_compiling() or torch._C._is_torch_function_mode_enabled():
        return False
    if torch._C._len_torch_dispatch_stack():
        return False
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    for tensor in tensors:
        if tensor is None or wrapped(tensor):
            continue
        if type(tensor) not in (torch.Tensor, nn.Parameter) or tensor.is_meta:
            return False
    return True


def _refuse_create_graph(ctx, upstream) -> None:
    """Outside torch.func, a backward that records a graph (create_graph=True) would differentiate gradients
    computed without one: refused, never a silently dropped second-order term."""
    if upstream is not None and torch.is_grad_enabled() and not ctx.transformed:
        raise RuntimeError(_FIRST_ORDER)


def _tie(outputs: list, inputs) -> list:
    """Under torch.func (which differentiates with create_graph): each gradient tied to its input, so that a
    second derivative raises instead of coming out zero."""
    if torch.is_grad_enabled():
        for index, tensor in inputs:
            if outputs[index] is not None and tensor is not None:
                outputs[index] = _FirstOrderOnly.apply(outputs[index], tensor)
    return outputs


class _LinearSum(torch.autograd.Function):
    """``lsx::linear_cross_entropy_sum`` for eager calls: the same body and backward, plus the tangent
    (forward-mode AD): <∂Σ/∂h, dh> + <∂Σ/∂W, dW> + <∂Σ/∂b, db> + <ℓ, d(sample_weight)>."""

    @staticmethod
    def forward(h2, w, b, t2, weight, class_mask, sw, *args):
        return _forward_sum(h2, w, b, t2, weight, class_mask, sw, args[:6], args[6], *args[7:])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.transformed = torch._C._functorch.maybe_current_level() is not None
        forward = forward_ad._current_level >= 0 or ctx.transformed
        if not forward:
            return _sum_setup_context(ctx, inputs, output)
        _, per_element, grad_h, grad_w, grad_b = output
        ctx.mark_non_differentiable(per_element, grad_h, grad_w, grad_b)
        ctx.set_materialize_grads(False)
        ctx.dtypes = (inputs[0].dtype, inputs[1].dtype, None if inputs[2] is None else inputs[2].dtype)
        ctx.has_sw = inputs[6] is not None
        ctx.held = None
        saved = (per_element, grad_h, grad_w, grad_b)
        ctx.save_for_backward(*saved, inputs[0], inputs[1], inputs[2], inputs[6])
        ctx.save_for_forward(*saved)

    @staticmethod
    def backward(ctx, grad_total, *rest):
        _refuse_create_graph(ctx, grad_total)
        outputs = list(_sum_backward(ctx, grad_total, *rest))
        if ctx.transformed:
            h2, w, b, sw = ctx.saved_tensors[4:]
            outputs = _tie(outputs, ((0, h2), (1, w), (2, b), (6, sw)))
        return tuple(outputs)

    @staticmethod
    def jvp(ctx, dh, dw, db, _t, _weight, _mask, dsw, *_):
        per_element, grad_h, grad_w, grad_b = ctx.saved_tensors[:4]
        tangent = None
        for grad, direction in ((grad_h, dh), (grad_w, dw), (grad_b, db), (per_element, dsw)):
            if direction is None:
                continue
            part = (grad * direction.to(grad.dtype).reshape(grad.shape)).sum()
            tangent = part if tangent is None else tangent + part
        return tangent, None, None, None, None


class _LinearNone(torch.autograd.Function):
    """``lsx::linear_cross_entropy_none`` for eager calls: the same body and chunked backward, plus the
    per-element tangent, each chunk's logits recomputed (see :func:`_tangent_none`)."""

    @staticmethod
    def forward(h2, w, b, t2, weight, class_mask, *args):
        return _forward_none(h2, w, b, t2, weight, class_mask, args[:6], args[6])

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.transformed = torch._C._functorch.maybe_current_level() is not None
        _none_setup_context(ctx, inputs, output)
        if forward_ad._current_level >= 0 or ctx.transformed:
            ctx.save_for_forward(*inputs[:6])

    @staticmethod
    def backward(ctx, upstream):
        _refuse_create_graph(ctx, upstream)
        if ctx.transformed:  # the body on the unwrapped tensors (the chunked backward is not traced)
            h2, w, b, t2, weight, class_mask = ctx.saved_tensors
            need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
            need_b = b is not None and ctx.needs_input_grad[2]
            outputs: list[Any] = [None] * 13
            if upstream is None or not (need_h or need_w or need_b):
                return tuple(outputs)
            plain = map(_unwrapped, (upstream, h2, w, b, t2, weight, class_mask))
            with torch._C._DisableFuncTorch():
                grads = _backward_none(*plain, ctx.scalars[:6], ctx.scalars[6], need_h, need_w, need_b)
            for index, (grad, tensor) in enumerate(zip(grads, (h2, w, b))):
                if ctx.needs_input_grad[index] and tensor is not None:
                    outputs[index] = grad.to(tensor.dtype)
            return tuple(_tie(outputs, ((0, h2), (1, w), (2, b))))
        return _none_backward(ctx, upstream)

    @staticmethod
    def jvp(ctx, dh, dw, db, *_):
        h2, w, b, t2, weight, class_mask, dh, dw, db = map(_unwrapped, (*ctx.saved_tensors, dh, dw, db))
        with torch._C._DisableFuncTorch():  # plain arithmetic (Numba reads the chunks on the host)
            return _tangent_none(h2, w, b, t2, weight, class_mask, ctx.scalars[:6], ctx.scalars[6], dh, dw, db)


def _unwrapped(tensor):
    """The plain tensor under torch.func's wrappers (the chunked arithmetic reads it on the host)."""
    while tensor is not None and torch._C._functorch.is_functorch_wrapped_tensor(tensor):
        tensor = torch._C._functorch.get_unwrapped(tensor)
    return tensor


def _tangent_none(h2, w, b, t2, weight, class_mask, scalars, rows, dh, dw, db):
    """Each element's directional derivative, chunk by chunk from the chunk's logit gradient g:
    Σ_c g_ic (dh_i·W_c + h_i·dW_c + db_c) = ((g W)∘dh + (g dW)∘h)·1 + g db."""
    *numeric, softcap = scalars
    opts = _engine_options(*numeric)
    compute = _compute_dtype(h2.dtype)
    numba = _numba_for(h2, t2, weight, class_mask, opts, softcap)
    wc, bc = _compute_weights(w, b, compute)
    h2 = h2.detach()
    n = h2.shape[0]
    tangent = torch.zeros(n, dtype=compute, device=h2.device)
    buffer = _logits_buffer(rows, wc)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        _, g, hc = _chunk(h2, wc, bc, t2, weight, class_mask, opts, softcap, start, stop, numba, None, buffer)
        part = tangent[start:stop]
        if dh is not None:
            part += ((g @ wc) * dh[start:stop].to(compute)).sum(dim=1)
        if dw is not None:
            part += ((g @ dw.to(compute)) * hc).sum(dim=1)
        if db is not None:
            part += g @ db.to(compute)
        del g, hc
    return tangent if dh is not None or dw is not None or db is not None else None


# --------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------
class LinearCrossEntropyLoss(nn.Module):
    """A drop-in for ``torch.nn.LinearCrossEntropyLoss`` computing :func:`linear_loss`.

    Owns the projection as a ``linear`` submodule (``nn.Linear(in_features, num_classes, bias=bias)``) and
    registers ``weight`` as a buffer, as torch does, so state dicts load both ways. Same constructor names,
    order and defaults as torch (``out_features`` must stay ``()``: K-dimensional losses are not supported;
    ``options`` is accepted, its ``batch_chunk_size`` used as ``chunk_size``), plus the lsx options
    keyword-only. ``input`` may be (N, H), (H,) or (..., H), with a target shaped like the leading dims.

    Example:
        >>> import torch, lsx.torch
        >>> criterion = lsx.torch.LinearCrossEntropyLoss(8, 10, label_smoothing=0.1, spread="others")
        >>> criterion(torch.randn(4, 8), torch.tensor([0, 3, 9, 2])).shape
        torch.Size([])
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        out_features: tuple[int, ...] = (),
        bias: bool = False,
        device: Any = None,
        dtype: Any = None,
        reduction: str = default("mean"),
        weight: torch.Tensor | None = None,
        ignore_index: int | None = None,
        label_smoothing: float = default(0.0),
        options: Any = None,
        spread: spec.Spread = default("all"),
        z_loss: float = default(0.0),
        normalize: bool = default(False),
        class_mask: Any = None,
        empty_mean: spec.EmptyMean = default("nan"),
        softcap: float | None = None,
        convention: str | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if tuple(out_features) != ():
            raise ValueError(f"out_features must be () (K-dimensional losses are not supported), got {out_features!r}")
        given: dict[str, Any] = dict(
            label_smoothing=label_smoothing,
            spread=spread,
            z_loss=z_loss,
            normalize=normalize,
            reduction=reduction,
            empty_mean=empty_mean,
            softcap=softcap,
        )
        if ignore_index is not None:
            given["ignore_index"] = ignore_index
        opts = spec.resolve_options(convention, **given)
        if chunk_size is None and options is not None:
            chunk_size = getattr(options, "batch_chunk_size", None)
        self.chunk_size = _engines.check_chunk_size(chunk_size)
        if weight is not None and tuple(torch.as_tensor(weight).shape) != (num_classes,):
            raise ValueError(f"weight must have shape ({num_classes},), got {tuple(torch.as_tensor(weight).shape)}")
        self.num_classes = num_classes
        self.out_features = ()
        self.linear = nn.Linear(in_features, num_classes, bias=bias, device=device, dtype=dtype)
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight))
        self.register_buffer("class_mask", None if class_mask is None else torch.as_tensor(class_mask))
        self.options = options
        self.ignore_index = opts.ignore_index
        self.reduction = opts.reduction
        self.label_smoothing = opts.label_smoothing
        self.spread = opts.spread
        self.z_loss = opts.z_loss
        self.normalize = opts.normalize
        self.empty_mean = opts.empty_mean
        self.softcap = opts.softcap

    def forward(
        self,
        input: torch.Tensor,
        target: torch.Tensor,
        *,
        sample_weight: torch.Tensor | None = None,
        denominator: Any = None,
    ) -> torch.Tensor:
        opts = spec.Options(
            label_smoothing=self.label_smoothing,
            spread=self.spread,
            ignore_index=self.ignore_index,
            z_loss=self.z_loss,
            normalize=self.normalize,
            reduction=self.reduction,
            empty_mean=self.empty_mean,
            softcap=self.softcap,
        )
        if denominator is not None:
            opts = spec.resolve_options(**{**dataclasses.asdict(opts), "denominator": denominator})
        return _linear_loss(
            input,
            self.linear.weight,
            target,
            self.linear.bias,
            self.weight,
            self.class_mask,
            sample_weight,
            opts,
            self.chunk_size,
        )

    def extra_repr(self) -> str:
        shown = [
            f"in_features={self.linear.in_features}",
            f"num_classes={self.num_classes}",
            f"bias={self.linear.bias is not None}",
            f"reduction={self.reduction!r}",
            f"ignore_index={self.ignore_index}",
        ]
        if self.label_smoothing:
            shown.append(f"label_smoothing={self.label_smoothing}")
        for name, plain in (("spread", "all"), ("z_loss", 0.0), ("normalize", False), ("empty_mean", "nan")):
            if getattr(self, name) != plain:
                shown.append(f"{name}={getattr(self, name)!r}")
        if self.softcap is not None:
            shown.append(f"softcap={self.softcap}")
        if self.chunk_size is not None:
            shown.append(f"chunk_size={self.chunk_size}")
        return ", ".join(shown)
