"""The Triton engine of :mod:`lsx.torch`: a block of rows of logits → per-row statistics, and the gradient.

Two kernels per target kind, each one read of the logits block (and one write for the gradient), one program
per row looping over blocks of classes:

- :func:`statistics` writes the six per-row statistics of ``_parallel._Call.statistics`` (row maximum, Σ exp,
  target terms, shifted weighted sums, a flag), taken relative to the row's own maximum m over the valid
  classes; they merge across row chunks and class slices with ``spec.merge_max`` / ``spec.reshift``, and
  ``spec.label_row`` / ``spec.probability_row`` turn them into the loss and the gradient's row coefficient.
  The maximum is taken online: each block's sums are rescaled to the new running maximum.
- :func:`gradient` writes ``exp(x − m)·p_scale − row_scale·w∘q`` (× the soft-cap's chain factor) into a
  buffer of the logits' shape, which may be the logits themselves.

Everything data-dependent stays on the device (labels, ``ignore_index``, a bad label or probability mass on a
masked class become NaN rows in the kernel); the wrappers only check shapes, dtypes and strides. Statistics
accumulate in float32 (float64 for float64 logits). With ``TRITON_INTERPRET=1`` set before this module is
imported, the same kernels run on CPU tensors in Triton's interpreter.

Every launch is recorded (:func:`launched`), so the specialisations a process used can be compiled ahead of
time for a GPU target with ``triton.compile(triton.compiler.ASTSource(...))``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

__all__ = [
    "INTERPRETER_MAX_BLOCK",
    "MAX_BLOCK",
    "Launch",
    "gradient",
    "interpreted",
    "launch_count",
    "launched",
    "statistics",
]

#: the largest block of classes a program holds at once on a GPU (rows longer than this loop over blocks)
MAX_BLOCK = 4096
#: the same under Triton's interpreter (CPU tensors), kept small so that short rows still span several blocks
INTERPRETER_MAX_BLOCK = 16

_TORCH_TO_TRITON = {
    torch.float64: "fp64",
    torch.float32: "fp32",
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.bool: "i1",
}
_LOGITS_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- device helpers (triton.jit, called from the kernels) -------------------------------------------------
@triton.jit
def _scalar(hi, lo, coef_ptr, index, DT: tl.constexpr):
    """A coefficient in the compute dtype: coef_ptr[index] when the caller's coefficients are device tensors,
    else hi + lo (a float split into two float32 values, exact to ~48 bits in float64)."""
    if coef_ptr is not None:
        value = tl.load(coef_ptr + index).to(DT)
    else:
        value = (hi + tl.zeros((), DT)) + lo
    return value


@triton.jit
def _tanh(z):
    """tanh in z's dtype, accurate to a few ulp in float32 and float64 (no libdevice: runs in the interpreter)."""
    a = tl.abs(z)
    e = tl.exp(-2.0 * a)
    large = (1.0 - e) / (1.0 + e)  # no cancellation for |z| >= 1/4
    z2 = z * z
    if z.dtype == tl.float64:  # Taylor series to z^23: < 3e-16 relative on |z| < 1/4
        p = -3.927832388331683e-05
        p = p * z2 + 9.691537956929451e-05
        p = p * z2 - 0.00023912911424355248
        p = p * z2 + 0.000590027440945586
        p = p * z2 - 0.0014558343870513183
        p = p * z2 + 0.003592128036572481
        p = p * z2 - 0.008863235529902197
        p = p * z2 + 0.021869488536155203
        p = p * z2 - 0.05396825396825397
        p = p * z2 + 0.13333333333333333
        p = p * z2 - 0.3333333333333333
    else:  # to z^11: < 3e-10 relative on |z| < 1/4
        p = -0.008863235529902197
        p = p * z2 + 0.021869488536155203
        p = p * z2 - 0.05396825396825397
        p = p * z2 + 0.13333333333333333
        p = p * z2 - 0.3333333333333333
    small = z + z * (z2 * p)
    signed = tl.where(z < 0, -large, large)
    return tl.where(a < 0.25, small, signed)


@triton.jit
def _is_finite(v):
    return tl.abs(v) < float("inf")


@triton.jit
def _xlogx(q):
    """q·log q, 0 at q = 0, NaN for q < 0 or NaN (``spec.xlogx``)."""
    safe = tl.where(q > 0, q, 1.0)
    value = q * tl.log(safe) + tl.where(q < 0, float("nan"), 0.0)
    return tl.where(q == 0, 0.0, value)


@triton.jit
def _label_facts(labels_ptr, weight_ptr, mask_ptr, row, k, offset, num_classes, ignore_index, DT: tl.constexpr):
    """(active, invalid, owned, on a masked class, the label's local index (0 unless owned), w_y (0 unless
    owned)) of one row's integer label."""
    label = tl.load(labels_ptr + row)
    if ignore_index is not None:
        active = label != ignore_index
    else:
        active = label == label
    invalid = active & ((label < 0) | (label >= num_classes))
    local = label - offset
    owned = active & (label >= 0) & (label < num_classes) & (local >= 0) & (local < k)
    local = tl.where(owned, local, 0)
    if mask_ptr is not None:
        on_masked = owned & (tl.load(mask_ptr + local, mask=owned, other=1).to(tl.int32) == 0)
    else:
        on_masked = owned & (label != label)
    if weight_ptr is not None:
        w_y = tl.load(weight_ptr + local, mask=owned & ~on_masked, other=0.0).to(DT)
    else:
        w_y = tl.where(owned, 1.0, 0.0).to(DT)
    return active, invalid, owned, on_masked, local, w_y


# ---- statistics ------------------------------------------------------------------------------------------
@triton.jit
def _label_statistics(
    x_ptr,
    out_ptr,
    labels_ptr,
    weight_ptr,
    mask_ptr,
    k,
    x_stride,
    out_stride,
    offset,
    num_classes,
    ignore_index,
    cap_hi,
    cap_lo,
    SMOOTHING: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    DT = out_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * x_stride
    if cap_hi is not None:
        cap = _scalar(cap_hi, cap_lo, None, 0, DT)
        inv_cap = 1.0 / cap
    raw_max = tl.full((), float("-inf"), DT)
    ref = tl.zeros((), DT)  # the running maximum where finite, else 0: the statistics' shift
    sum_exp = tl.zeros((), DT)
    shifted = tl.zeros((), DT)  # Σ w_c (x_c − ref) over the valid classes with w_c ≠ 0
    linear_total = tl.zeros((), DT)  # Σ w_c over the same classes
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        inside = cols < k
        x = tl.load(base + cols, mask=inside, other=0.0).to(DT)
        if cap_hi is not None:
            x = cap * _tanh(x * inv_cap)
        valid = inside
        if mask_ptr is not None:
            valid = valid & (tl.load(mask_ptr + cols, mask=inside, other=0).to(tl.int32) != 0)
        x_valid = tl.where(valid, x, float("-inf"))
        raw_max = tl.maximum(raw_max, tl.max(x_valid, 0))
        new_ref = tl.where(_is_finite(raw_max), raw_max, 0.0)
        sum_exp = sum_exp * tl.exp(ref - new_ref) + tl.sum(tl.exp(x_valid - new_ref), 0)
        if SMOOTHING:
            if weight_ptr is not None:
                w = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(DT)
                linear = valid & (w != 0)
                shifted += linear_total * (ref - new_ref) + tl.sum(tl.where(linear, w * (x - new_ref), 0.0), 0)
                linear_total += tl.sum(tl.where(linear, w, 0.0), 0)
            else:
                shifted += linear_total * (ref - new_ref) + tl.sum(tl.where(valid, x - new_ref, 0.0), 0)
                if mask_ptr is not None:
                    linear_total += tl.sum(valid.to(DT), 0)
                else:  # every class of the block is valid: no reduction needed
                    linear_total += tl.minimum(k - start, BLOCK_K).to(DT)
        ref = new_ref
    _, _, owned, on_masked, local, w_y = _label_facts(
        labels_ptr, weight_ptr, mask_ptr, row, k, offset, num_classes, ignore_index, DT
    )
    x_y = tl.load(base + local, mask=owned, other=0.0).to(DT)
    if cap_hi is not None:
        x_y = cap * _tanh(x_y * inv_cap)
    x_y = tl.where(owned, x_y - ref, 0.0)
    x_y = tl.where(on_masked, float("nan"), x_y)
    flag = tl.where(on_masked, 2.0, tl.where(owned, 1.0, 0.0))
    out = out_ptr + row
    tl.store(out, raw_max)
    tl.store(out + out_stride, sum_exp)
    tl.store(out + 2 * out_stride, x_y)
    tl.store(out + 3 * out_stride, w_y)
    tl.store(out + 4 * out_stride, shifted)
    tl.store(out + 5 * out_stride, flag.to(DT))


@triton.jit
def _probability_statistics(
    x_ptr,
    out_ptr,
    t_ptr,
    weight_ptr,
    mask_ptr,
    coef_ptr,
    k,
    x_stride,
    t_stride,
    out_stride,
    a_hi,
    a_lo,
    b_hi,
    b_lo,
    cap_hi,
    cap_lo,
    NORMALIZE: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    DT = out_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * x_stride
    t_base = t_ptr + row * t_stride
    a = _scalar(a_hi, a_lo, coef_ptr, 0, DT)
    b = _scalar(b_hi, b_lo, coef_ptr, 1, DT)
    if cap_hi is not None:
        cap = _scalar(cap_hi, cap_lo, None, 0, DT)
        inv_cap = 1.0 / cap
    raw_max = tl.full((), float("-inf"), DT)
    ref = tl.zeros((), DT)
    sum_exp = tl.zeros((), DT)
    mass = tl.zeros((), DT)  # Σ w q
    shifted = tl.zeros((), DT)  # Σ w q (x − ref) over the contributing classes (w q ≠ 0)
    entropy = tl.zeros((), DT)  # Σ w·xlogx(q) over the same classes
    masked_mass = tl.zeros((), tl.int32)  # 1 where t is nonzero on a masked class
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        inside = cols < k
        x = tl.load(base + cols, mask=inside, other=0.0).to(DT)
        if cap_hi is not None:
            x = cap * _tanh(x * inv_cap)
        t = tl.load(t_base + cols, mask=inside, other=0.0).to(DT)
        valid = inside
        if mask_ptr is not None:
            valid = valid & (tl.load(mask_ptr + cols, mask=inside, other=0).to(tl.int32) != 0)
            masked_mass = tl.maximum(masked_mass, tl.max((inside & ~valid & (t != 0)).to(tl.int32), 0))
        q = tl.where(valid, a * t + b, 0.0)
        if weight_ptr is not None:
            w = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(DT)
            wq = w * q
        else:
            wq = q
        contributes = wq != 0
        x_valid = tl.where(valid, x, float("-inf"))
        raw_max = tl.maximum(raw_max, tl.max(x_valid, 0))
        new_ref = tl.where(_is_finite(raw_max), raw_max, 0.0)
        sum_exp = sum_exp * tl.exp(ref - new_ref) + tl.sum(tl.exp(x_valid - new_ref), 0)
        shifted += mass * (ref - new_ref) + tl.sum(tl.where(contributes, wq * (x - new_ref), 0.0), 0)
        mass += tl.sum(wq, 0)
        if NORMALIZE:
            h = _xlogx(q)
            if weight_ptr is not None:
                h = w * h
            entropy += tl.sum(tl.where(contributes, h, 0.0), 0)
        ref = new_ref
    out = out_ptr + row
    tl.store(out, raw_max)
    tl.store(out + out_stride, sum_exp)
    tl.store(out + 2 * out_stride, mass)
    tl.store(out + 3 * out_stride, shifted)
    tl.store(out + 4 * out_stride, entropy)
    tl.store(out + 5 * out_stride, masked_mass.to(DT))


# ---- gradients -------------------------------------------------------------------------------------------
@triton.jit
def _label_gradient(
    x_ptr,
    g_ptr,
    labels_ptr,
    weight_ptr,
    mask_ptr,
    nan_ptr,
    local_max_ptr,
    p_scale_ptr,
    row_scale_ptr,
    coef_ptr,
    k,
    x_stride,
    g_stride,
    offset,
    num_classes,
    ignore_index,
    a_hi,
    a_lo,
    b_hi,
    b_lo,
    cap_hi,
    cap_lo,
    SMOOTHING: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    DT = local_max_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * x_stride
    g_base = g_ptr + row * g_stride
    if cap_hi is not None:
        cap = _scalar(cap_hi, cap_lo, None, 0, DT)
        inv_cap = 1.0 / cap
    local_max = tl.load(local_max_ptr + row).to(DT)
    p_scale = tl.load(p_scale_ptr + row).to(DT)
    row_scale = tl.load(row_scale_ptr + row).to(DT)
    active, invalid, owned, on_masked, local, w_y = _label_facts(
        labels_ptr, weight_ptr, mask_ptr, row, k, offset, num_classes, ignore_index, DT
    )
    nan_row = invalid | on_masked
    if nan_ptr is not None:
        nan_row = nan_row | (tl.load(nan_ptr + row).to(tl.int32) != 0)
    a = _scalar(a_hi, a_lo, coef_ptr, 0, DT)
    target_part = tl.where(owned & (a != 0), a * w_y * row_scale, 0.0)
    if SMOOTHING:
        b = _scalar(b_hi, b_lo, coef_ptr, 1, DT)
        smooth_part = b * row_scale
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        inside = cols < k
        x = tl.load(base + cols, mask=inside, other=0.0).to(DT)
        if cap_hi is not None:
            tanh = _tanh(x * inv_cap)
            x = cap * tanh
        valid = inside
        if mask_ptr is not None:
            valid = valid & (tl.load(mask_ptr + cols, mask=inside, other=0).to(tl.int32) != 0)
        g = tl.exp(tl.where(valid, x, float("-inf")) - local_max) * p_scale
        if SMOOTHING:
            if weight_ptr is not None:
                w = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(DT)
                g -= smooth_part * w
            else:
                g -= smooth_part
        g = tl.where(cols == local, g - target_part, g)
        g = tl.where(active, g, 0.0)
        g = tl.where(nan_row, float("nan"), g)
        if cap_hi is not None:
            g = g * (1.0 - tanh * tanh)
        g = tl.where(valid, g, 0.0)
        tl.store(g_base + cols, g.to(g_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _probability_gradient(
    x_ptr,
    g_ptr,
    t_ptr,
    weight_ptr,
    mask_ptr,
    nan_ptr,
    local_max_ptr,
    p_scale_ptr,
    row_scale_ptr,
    coef_ptr,
    k,
    x_stride,
    g_stride,
    t_stride,
    a_hi,
    a_lo,
    b_hi,
    b_lo,
    cap_hi,
    cap_lo,
    BLOCK_K: tl.constexpr,
):
    DT = local_max_ptr.dtype.element_ty
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * x_stride
    g_base = g_ptr + row * g_stride
    t_base = t_ptr + row * t_stride
    a = _scalar(a_hi, a_lo, coef_ptr, 0, DT)
    b = _scalar(b_hi, b_lo, coef_ptr, 1, DT)
    if cap_hi is not None:
        cap = _scalar(cap_hi, cap_lo, None, 0, DT)
        inv_cap = 1.0 / cap
    local_max = tl.load(local_max_ptr + row).to(DT)
    p_scale = tl.load(p_scale_ptr + row).to(DT)
    row_scale = tl.load(row_scale_ptr + row).to(DT)
    nan_row = row < 0
    if nan_ptr is not None:
        nan_row = tl.load(nan_ptr + row).to(tl.int32) != 0
    masked_mass = tl.zeros((), tl.int32)
    for start in range(0, k, BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        inside = cols < k
        x = tl.load(base + cols, mask=inside, other=0.0).to(DT)
        if cap_hi is not None:
            tanh = _tanh(x * inv_cap)
            x = cap * tanh
        t = tl.load(t_base + cols, mask=inside, other=0.0).to(DT)
        valid = inside
        if mask_ptr is not None:
            valid = valid & (tl.load(mask_ptr + cols, mask=inside, other=0).to(tl.int32) != 0)
            masked_mass = tl.maximum(masked_mass, tl.max((inside & ~valid & (t != 0)).to(tl.int32), 0))
        wq = tl.where(valid, a * t + b, 0.0)
        if weight_ptr is not None:
            wq = wq * tl.load(weight_ptr + cols, mask=inside, other=0.0).to(DT)
        g = tl.exp(tl.where(valid, x, float("-inf")) - local_max) * p_scale - row_scale * wq
        g = tl.where(nan_row, float("nan"), g)
        if cap_hi is not None:
            g = g * (1.0 - tanh * tanh)
        g = tl.where(valid, g, 0.0)
        tl.store(g_base + cols, g.to(g_ptr.dtype.element_ty), mask=inside)
    if mask_ptr is not None:
        # probability mass on a masked class, seen only once the row is read: the row becomes NaN after all
        # (a rare, invalid input; its valid classes are written a second time)
        if masked_mass != 0:
            for start in range(0, k, BLOCK_K):
                cols = start + tl.arange(0, BLOCK_K)
                inside = cols < k
                valid = tl.load(mask_ptr + cols, mask=inside, other=0).to(tl.int32) != 0
                tl.store(g_base + cols, tl.where(valid, float("nan"), 0.0).to(g_ptr.dtype.element_ty), mask=inside)


@triton.jit
def _loop_probe(out_ptr, n):
    """A loop over a runtime bound: what every kernel above needs of the interpreter."""
    total = tl.zeros((), tl.int32)
    for _ in range(0, n, 1):
        total += 1
    tl.store(out_ptr, total)


_PROBED: list[bool] = []


def _check_interpreter() -> None:
    """Under the interpreter, once: raise a clear error where this Triton's interpreter cannot run a loop over a
    runtime bound (Triton 3.6's calls ``int()`` on a 1-element array, which NumPy >= 2.4 refuses)."""
    if _PROBED:
        return
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _loop_probe[(1,)](out, 3)
    except Exception as error:
        raise RuntimeError(
            f"Triton {triton.__version__}'s interpreter (TRITON_INTERPRET=1) cannot run lsx's kernels with NumPy "
            f"{np.__version__}: a loop over a runtime bound fails ({type(error).__name__}: {error}). Use a newer "
            "Triton (3.9 works) or NumPy < 2.4 to run them in the interpreter; compiled GPU kernels are not affected"
        ) from error
    _PROBED.append(int(out[0]) == 3)
    if not _PROBED[0]:
        raise RuntimeError(f"Triton {triton.__version__}'s interpreter ran a 3-step loop {int(out[0])} times")


# ---- launches and their record ---------------------------------------------------------------------------
class Launch(NamedTuple):
    """One specialisation launched in this process: enough to compile it again for another target with
    ``triton.compile(triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
    target=..., options=options)``."""

    kernel: Any  # the module-level triton.jit function (``kernel.fn`` under the interpreter)
    name: str  # its name in this module
    signature: dict[str, str]
    constexprs: dict[str, Any]
    options: dict[str, Any]


_LAUNCHED: dict[tuple, Launch] = {}
_COUNT = [0]


def launched() -> list[Launch]:
    """The distinct kernel specialisations this process has launched, in first-launch order."""
    return list(_LAUNCHED.values())


def launch_count() -> int:
    """How many kernel launches this process has made (every launch, not only new specialisations)."""
    return _COUNT[0]


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (``TRITON_INTERPRET=1`` when this module was imported)."""
    return type(_label_statistics).__name__ == "InterpretedFunction"


def _type_of(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"cannot pass {type(value).__name__} to a Triton kernel")


def _launch(kernel: Any, rows: int, args: dict[str, Any], constexprs: dict[str, Any], num_warps: int) -> None:
    name, parameters = _names(kernel)
    signature: dict[str, str] = {}
    fixed: dict[str, Any] = {}
    for parameter in parameters:
        value = constexprs[parameter] if parameter in constexprs else args[parameter]
        if parameter in constexprs or value is None:
            signature[parameter] = "constexpr"
            fixed[parameter] = value
        else:
            signature[parameter] = _type_of(value)
    if interpreted():
        _check_interpreter()
    key = (name, tuple(signature.items()), tuple(fixed.items()), num_warps)
    if key not in _LAUNCHED:
        _LAUNCHED[key] = Launch(kernel, name, signature, fixed, {"num_warps": num_warps})
    kernel[(rows,)](**args, **constexprs, num_warps=num_warps)
    _COUNT[0] += 1


def _python_function(kernel: Any) -> Any:
    """The Python function under a JITFunction (or an interpreter's wrapper of one)."""
    fn = kernel
    while hasattr(fn, "fn"):
        fn = fn.fn
    return fn


_NAMES: dict[int, tuple[str, list[str]]] = {}


def _names(kernel: Any) -> tuple[str, list[str]]:
    """(the kernel's name, its parameters' names), looked up once per kernel."""
    found = _NAMES.get(id(kernel))
    if found is None:
        fn = _python_function(kernel)
        found = _NAMES[id(kernel)] = (fn.__name__, list(inspect.signature(fn).parameters))
    return found


# ---- the wrappers ----------------------------------------------------------------------------------------
def _split(value: float | None) -> tuple[float | None, float | None]:
    """A Python float as two float32-representable floats hi + lo (None stays None): the kernels add them in
    the compute dtype, so float64 runs keep ~48 bits of a coefficient that a float32 argument would round."""
    if value is None:
        return None, None
    value = float(value)
    with np.errstate(over="ignore"):
        hi = float(np.float32(value))
    if not math.isfinite(hi):
        return value, 0.0
    return hi, float(np.float32(value - hi))


def _coefficients(a: Any, b: Any, compute: torch.dtype, device: torch.device) -> tuple[Any, ...]:
    """(a_hi, a_lo, b_hi, b_lo, coef tensor or None): device tensors travel as a (2,) tensor (no host read)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        parts = [
            (
                v.detach().to(device=device, dtype=compute)
                if isinstance(v, torch.Tensor)
                else torch.full((), float(v), dtype=compute, device=device)
            ).reshape(())
            for v in (a, b)
        ]
        return 0.0, 0.0, 0.0, 0.0, torch.stack(parts)
    return (*_split(a), *_split(b), None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _block(k: int, x: torch.Tensor) -> tuple[int, int]:
    """(BLOCK_K, num_warps) for rows of k classes."""
    limit = MAX_BLOCK if x.device.type == "cuda" else INTERPRETER_MAX_BLOCK
    block = min(limit, max(16, triton.next_power_of_2(max(k, 1))))
    return block, (8 if block >= 2048 else 4 if block >= 512 else 2 if block >= 128 else 1)


def _check_rows(name: str, tensor: Any, n: int, device: torch.device, dtypes: tuple = ()) -> None:
    if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (n,):
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"{name} must be a ({n},) tensor, got {shape}")
    if n > 1 and tensor.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {tensor.stride()}")
    if tensor.device != device:
        raise ValueError(f"{name} must be on the logits' device {device}, got {tensor.device}")
    if dtypes and tensor.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {' or '.join(map(str, dtypes))}, got {tensor.dtype}")


def _check_common(x: Any, labels: Any, probs: Any, weight: Any, class_mask: Any, softcap: Any) -> tuple[int, int]:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be an (n, k) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if x.dtype not in _LOGITS_DTYPES:
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    n, k = x.shape
    if k > 1 and x.stride(1) != 1:
        raise ValueError(f"x must have unit column stride, got strides {x.stride()}")
    if x.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"the Triton engine needs CUDA tensors (or TRITON_INTERPRET=1 set before lsx is imported), got x on {x.device}"
        )
    compute = _compute_dtype(x)
    if (labels is None) == (probs is None):
        raise ValueError("pass exactly one of labels and probs")
    if labels is not None:
        _check_rows("labels", labels, n, x.device, (torch.int64,))
    else:
        if not isinstance(probs, torch.Tensor) or tuple(probs.shape) != (n, k):
            raise ValueError(f"probs must be an ({n}, {k}) tensor, got {getattr(probs, 'shape', type(probs).__name__)}")
        if not probs.is_floating_point() or probs.device != x.device:
            raise TypeError(f"probs must be a floating-point tensor on {x.device}, got {probs.dtype} on {probs.device}")
        if k > 1 and probs.stride(1) != 1:
            raise ValueError(f"probs must have unit column stride, got strides {probs.stride()}")
    if weight is not None:
        _check_rows("weight", weight, k, x.device, (compute,))
    if class_mask is not None:
        _check_rows("class_mask", class_mask, k, x.device, (torch.bool,))
    if softcap is not None and not (isinstance(softcap, (int, float)) and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive finite number or None, got {softcap!r}")
    return n, k


def statistics(
    x: torch.Tensor,
    out: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    class_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    a: Any = 1.0,
    b: Any = 0.0,
    smoothing: bool = False,
    normalize: bool = False,
    offset: int = 0,
    num_classes: int | None = None,
    ignore_index: int | None = None,
) -> None:
    """Write the six per-row statistics of the logits block ``x`` (n, k) into ``out`` (6, n).

    ``x`` holds the classes [offset, offset + k) of ``num_classes`` (default k); ``out`` has the compute dtype
    (float32, float64 for float64 logits) and unit column stride. With x' the soft-capped logits, m the raw
    maximum over the valid classes where finite (else 0), the rows of ``out`` are:

    - labels (int64 global class ids): raw max; Σ exp(x' − m); x'_y − m where this block owns y (NaN on a
      masked class, else 0); w_y where owned (else 0); Σ_{valid, w ≠ 0} w (x' − m) with ``smoothing`` (else 0);
      the ownership flag (0, 1, or 2 on a masked class);
    - probabilities (q = a·t + b on the valid classes, 0 elsewhere): raw max; Σ exp(x' − m); Σ w q;
      Σ_{w q ≠ 0} w q (x' − m); Σ_{w q ≠ 0} w·xlogx(q) with ``normalize`` (else 0); 1 where t has mass on a
      masked class (else 0).
    """
    n, k = _check_common(x, labels, probs, weight, class_mask, softcap)
    compute = _compute_dtype(x)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (6, n) or out.dtype != compute:
        raise ValueError(
            f"out must be a (6, {n}) {compute} tensor, got {getattr(out, 'shape', out)} {getattr(out, 'dtype', '')}"
        )
    if n > 1 and out.stride(1) != 1:
        raise ValueError(f"out must have unit column stride, got strides {out.stride()}")
    if n == 0:
        return
    block, warps = _block(k, x)
    cap_hi, cap_lo = _split(softcap)
    common = dict(
        x_ptr=x,
        out_ptr=out,
        weight_ptr=weight,
        mask_ptr=class_mask,
        k=k,
        x_stride=x.stride(0),
        out_stride=out.stride(0),
        cap_hi=cap_hi,
        cap_lo=cap_lo,
    )
    if labels is not None:
        common.update(
            labels_ptr=labels,
            offset=int(offset),
            num_classes=k if num_classes is None else int(num_classes),
            ignore_index=None if ignore_index is None else int(ignore_index),
        )
        _launch(_label_statistics, n, common, dict(SMOOTHING=bool(smoothing), BLOCK_K=block), warps)
    else:
        a_hi, a_lo, b_hi, b_lo, coef = _coefficients(a, b, compute, x.device)
        common.update(
            t_ptr=probs, coef_ptr=coef, t_stride=probs.stride(0), a_hi=a_hi, a_lo=a_lo, b_hi=b_hi, b_lo=b_lo
        )
        _launch(_probability_statistics, n, common, dict(NORMALIZE=bool(normalize), BLOCK_K=block), warps)


def gradient(
    x: torch.Tensor,
    grad: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    probs: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    class_mask: torch.Tensor | None = None,
    softcap: float | None = None,
    a: Any = 1.0,
    b: Any = 0.0,
    smoothing: bool = False,
    offset: int = 0,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    local_max: torch.Tensor,
    p_scale: torch.Tensor,
    row_scale: torch.Tensor,
    nan_rows: torch.Tensor | None = None,
) -> None:
    """Write the gradient of the logits block ``x`` (n, k) into ``grad`` (x's shape; may be ``x`` itself).

    Per row r and class c: exp(x'_rc − local_max_r)·p_scale_r − row_scale_r·w_c·q_rc, with w∘q for labels
    b·w_c (with ``smoothing``) plus a·w_y on the label's class where this block owns it. Then: rows whose label
    is ``ignore_index`` are 0; rows flagged in ``nan_rows``, rows whose label is outside [0, num_classes) or on
    a masked class, and rows whose probabilities put mass on a masked class are NaN; × (1 − tanh²(x/softcap))
    with ``softcap``; masked classes are 0. ``local_max``, ``p_scale``, ``row_scale``: (n,) in the compute dtype.
    """
    n, k = _check_common(x, labels, probs, weight, class_mask, softcap)
    compute = _compute_dtype(x)
    if not isinstance(grad, torch.Tensor) or grad.shape != x.shape or grad.device != x.device:
        raise ValueError(f"grad must be a tensor of x's shape {tuple(x.shape)} on {x.device}")
    if grad.dtype not in (x.dtype, torch.float32):
        raise TypeError(f"grad must have x's dtype {x.dtype} or float32, got {grad.dtype}")
    if k > 1 and grad.stride(1) != 1:
        raise ValueError(f"grad must have unit column stride, got strides {grad.stride()}")
    for name, tensor in (("local_max", local_max), ("p_scale", p_scale), ("row_scale", row_scale)):
        _check_rows(name, tensor, n, x.device, (compute,))
    if nan_rows is not None:
        _check_rows("nan_rows", nan_rows, n, x.device, (torch.bool,))
    if n == 0:
        return
    block, warps = _block(k, x)
    cap_hi, cap_lo = _split(softcap)
    a_hi, a_lo, b_hi, b_lo, coef = _coefficients(a, b, compute, x.device)
    common = dict(
        x_ptr=x,
        g_ptr=grad,
        weight_ptr=weight,
        mask_ptr=class_mask,
        nan_ptr=nan_rows,
        local_max_ptr=local_max,
        p_scale_ptr=p_scale,
        row_scale_ptr=row_scale,
        coef_ptr=coef,
        k=k,
        x_stride=x.stride(0),
        g_stride=grad.stride(0),
        a_hi=a_hi,
        a_lo=a_lo,
        b_hi=b_hi,
        b_lo=b_lo,
        cap_hi=cap_hi,
        cap_lo=cap_lo,
    )
    if labels is not None:
        common.update(
            labels_ptr=labels,
            offset=int(offset),
            num_classes=k if num_classes is None else int(num_classes),
            ignore_index=None if ignore_index is None else int(ignore_index),
        )
        _launch(_label_gradient, n, common, dict(SMOOTHING=bool(smoothing), BLOCK_K=block), warps)
    else:
        common.update(t_ptr=probs, t_stride=probs.stride(0))
        _launch(_probability_gradient, n, common, dict(BLOCK_K=block), warps)
