"""Fused Numba kernels: loss and gradient of label-smoothed cross-entropy in one sweep per row.

Imported by :mod:`lsx.numpy` on first use, never by ``import lsx``. ``AVAILABLE`` says whether Numba
imported. :func:`forward_backward` has the contract of :func:`lsx.numpy._engine.forward_backward` (plus ``out2`` and
``scale_mean``).

Rows are spread over the cores with ``prange`` (a serial driver of the same row function serves inputs
under ``_PARALLEL_MIN_ELEMENTS``, where starting threads would dominate). Per row, three passes over data
that stays in L2 cache (a 32768-class float32 row is 128 KiB), so the logits are read from memory once and
the gradient written once:

1. the maximum over the valid classes;
2. ``e = exp(x − max)``, summed, and stored in the gradient row; the running ``Σ w·(x − max)`` for the
   smoothing term (probability targets: ``Σ w·q·(x − max)``);
3. the gradient ``e · coef − w∘q`` rewritten over the stored ``e``.

The gradient row may be the logits row itself (in-place mode): pass 2 reads each element before it
overwrites it, and the target logit is read before pass 2.

``math.exp`` does not vectorise inside Numba loops, so :func:`_exp` is a range-reduced polynomial
(2^k · P(r), Cody–Waite reduction) that LLVM turns into SIMD code: degree 7 for float32 (relative error
under 2e-7), degree 12 for float64 (under 1e-15). Arguments below the smallest normal result give exactly 0 and
NaN propagates. Loops use ``fastmath`` without ``nnan``/``ninf``, so −inf (masked) logits and NaN keep the
spec's behaviour. The row maximum uses ``llvm.maxnum`` (a compare-and-select maximum does not vectorise),
which skips NaN; a NaN logit still makes its row NaN through the sum of exponentials, as in the reference.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lsx import spec

try:
    import numba
    from llvmlite import ir
    from numba import prange, types
    from numba.extending import intrinsic, overload
except ImportError:  # the pure-NumPy engine in lsx.numpy takes over
    AVAILABLE = False
else:
    AVAILABLE = True

__all__ = ["AVAILABLE", "forward_backward"]

_PARALLEL_MIN_ELEMENTS = 1 << 16  # below this, starting threads costs more than it saves
_PLAIN_SETTINGS = 4  # the settings that follow the plain kernels' row coefficients (see plain_settings)
_PAIRWISE_BLOCK = 128  # NumPy's pairwise summation sums up to this many values as one block
_BLOCK = 2048  # partial sums in the compute dtype, accumulated across blocks in float64
_LOOP_FLAGS = {"nsz", "arcp", "contract", "reassoc"}
_MAX_FLAGS = {"nnan", "nsz", "reassoc"}
_EXP_FLAGS = {"contract"}  # no reassociation: Cody–Waite needs its operations in order
# float32 tanh(u) ≈ u·(1 + u²·P(u²)) / (1 + u²·Q(u²)) (coefficients of u^0, u^2, ...; a minimax fit of the
# relative error on [0, 9], rounded to float32) and the smallest float32 where it reaches exactly 1
_TANH32_P = (0.13383980095386505, 0.003498995676636696, 2.0661254893639125e-05, 1.3419812816550802e-08)
_TANH32_Q = (0.4671730101108551, 0.025890205055475235, 0.0003291037573944777, 7.804725328242057e-07)
_TANH32_CLAMP = 7.9969162940979

if AVAILABLE:

    @intrinsic
    def _bits_to_float(typingctx, bits):
        """Reinterpret int32 → float32 or int64 → float64 (a bitcast LLVM can vectorise)."""
        if bits == types.int32:
            sig = types.float32(types.int32)
        elif bits == types.int64:
            sig = types.float64(types.int64)
        else:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    def _exp(d):  # pragma: no cover - replaced by the overload below inside Numba
        return math.exp(d)

    def _to_dtype_of(value, like):  # pragma: no cover - Numba only
        return value

    @overload(_to_dtype_of, inline="always")
    def _to_dtype_of_impl(value, like):
        if like.dtype == types.float32:
            return lambda value, like: np.float32(value)
        return lambda value, like: np.float64(value)

    @overload(_exp, jit_options={"fastmath": _EXP_FLAGS})
    def _exp_impl(d):
        if d == types.float32:

            def exp32(d):
                # exp(−87.3) is just above the smallest normal float32; exp(88) just below the largest
                big = d > np.float32(88.0)
                tiny = d < np.float32(-87.3)
                dc = d if not tiny else np.float32(-87.3)
                dc = dc if not big else np.float32(88.0)
                dk = dc if dc == dc else np.float32(0.0)  # NaN: keep k finite, r carries the NaN
                kf = np.floor(dk * np.float32(1.4426950408889634) + np.float32(0.5))
                r = dc - kf * np.float32(0.693359375)
                r = r - kf * np.float32(-2.12194440e-4)
                p = np.float32(1.0 / 5040.0)
                p = p * r + np.float32(1.0 / 720.0)
                p = p * r + np.float32(1.0 / 120.0)
                p = p * r + np.float32(1.0 / 24.0)
                p = p * r + np.float32(1.0 / 6.0)
                p = p * r + np.float32(0.5)
                p = p * r + np.float32(1.0)
                p = p * r + np.float32(1.0)
                scale = _bits_to_float(
                    np.int32(np.int32(kf + np.float32(127.0)) << 23)
                )  # Numba widens int32 arithmetic
                y = p * scale
                y = y if not tiny else np.float32(0.0)
                return y if not big else np.float32(np.inf)

            return exp32
        if d == types.float64:

            def exp64(d):
                big = d > 709.0
                tiny = d < -708.0
                dc = d if not tiny else -708.0
                dc = dc if not big else 709.0
                dk = dc if dc == dc else 0.0
                kf = np.floor(dk * 1.4426950408889634 + 0.5)
                r = dc - kf * 6.93147180369123816490e-01  # ln 2 split so that kf·hi is exact
                r = r - kf * 1.90821492927058770002e-10
                p = 1.0 / 479001600.0
                p = p * r + 1.0 / 39916800.0
                p = p * r + 1.0 / 3628800.0
                p = p * r + 1.0 / 362880.0
                p = p * r + 1.0 / 40320.0
                p = p * r + 1.0 / 5040.0
                p = p * r + 1.0 / 720.0
                p = p * r + 1.0 / 120.0
                p = p * r + 1.0 / 24.0
                p = p * r + 1.0 / 6.0
                p = p * r + 0.5
                p = p * r + 1.0
                p = p * r + 1.0
                scale = _bits_to_float((np.int64(kf) + np.int64(1023)) << np.int64(52))
                y = p * scale
                y = y if not tiny else 0.0
                return y if not big else np.inf

            return exp64
        return None

    @intrinsic
    def _maxnum(typingctx, left, right):
        """``llvm.maxnum``: the larger operand, ignoring a NaN one; unlike compare-and-select it vectorises."""
        if left != right or left not in (types.float32, types.float64):
            return None
        sig = left(left, right)

        def codegen(context, builder, signature, args):
            ty = args[0].type
            fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
            return builder.call(fn, args)

        return sig, codegen

    @numba.njit(fastmath=_MAX_FLAGS, cache=True)
    def _row_max(xr, valid, has_mask):
        """Max over the valid classes, 0 when it is not finite (like the reference), NaN when it is +inf (the
        row's loss and gradient are then NaN, as in the reference); a NaN logit is skipped here."""
        low = _to_dtype_of(-np.inf, xr)
        m = low
        k = xr.shape[0]
        if has_mask:
            for c in range(k):
                m = _maxnum(m, xr[c] if valid[c] else low)
        else:
            for c in range(k):
                m = _maxnum(m, xr[c])
        if m == np.inf:
            return np.nan
        return np.float64(m) if math.isfinite(m) else 0.0

    # Block helpers: each is one simple loop that LLVM vectorises; partial sums stay in the compute dtype
    # for one block and are accumulated in float64 across blocks.
    @numba.njit(fastmath=_LOOP_FLAGS, inline="always")
    def _block_store(xs, ds, mt):
        sum_e = mt - mt
        sum_x = mt - mt
        for c in range(xs.shape[0]):
            d = xs[c] - mt
            e = _exp(d)
            sum_e += e
            sum_x += d
            ds[c] = e
        return sum_e, sum_x

    @numba.njit(fastmath=_LOOP_FLAGS, inline="always")
    def _block_store_exp(xs, ds, mt):
        """:func:`_block_store` without Σ (x − max)."""
        sum_e = mt - mt
        for c in range(xs.shape[0]):
            e = _exp(xs[c] - mt)
            sum_e += e
            ds[c] = e
        return sum_e

    @numba.njit(fastmath=_LOOP_FLAGS, inline="always")
    def _block_sum_exp(xs, mt):
        """:func:`_block_sum` without Σ (x − max)."""
        sum_e = mt - mt
        for c in range(xs.shape[0]):
            sum_e += _exp(xs[c] - mt)
        return sum_e

    @numba.njit(fastmath=_LOOP_FLAGS, inline="always")
    def _block_inplace(ds, mt):
        """In place: ``ds`` holds the logits on entry (the gradient buffer is the logits' memory)."""
        sum_e = mt - mt
        sum_x = mt - mt
        for c in range(ds.shape[0]):
            d = ds[c] - mt
            e = _exp(d)
            sum_e += e
            sum_x += d
            ds[c] = e
        return sum_e, sum_x

    @numba.njit(fastmath=_LOOP_FLAGS, inline="always")
    def _block_sum(xs, mt):
        sum_e = mt - mt
        sum_x = mt - mt
        for c in range(xs.shape[0]):
            d = xs[c] - mt
            sum_e += _exp(d)
            sum_x += d
        return sum_e, sum_x

    # In the masked/weighted blocks ``ws`` is 0 on the masked classes, and a class of weight 0 adds nothing to
    # Σ w·(x − m), even where x = −inf (no 0·∞).
    @numba.njit(fastmath=_LOOP_FLAGS, inline="always")
    def _block_store_masked(xs, ds, ws, vs, mt):
        zero = mt - mt
        sum_e = zero
        sum_x = zero
        for c in range(xs.shape[0]):
            d = xs[c] - mt
            e = _exp(d) if vs[c] else zero
            sum_e += e
            sum_x += ws[c] * d if ws[c] != zero else zero
            ds[c] = e
        return sum_e, sum_x

    @numba.njit(fastmath=_LOOP_FLAGS, inline="always")
    def _block_sum_masked(xs, ws, vs, mt):
        zero = mt - mt
        sum_e = zero
        sum_x = zero
        for c in range(xs.shape[0]):
            d = xs[c] - mt
            sum_e += _exp(d) if vs[c] else zero
            sum_x += ws[c] * d if ws[c] != zero else zero
        return sum_e, sum_x

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True)
    def _exp_pass(xr, dst, w, valid, plain, m, mode):
        """Σ exp(x − m) and Σ w·(x − m) over the valid classes (``plain``: no weight, no mask).

        ``mode`` 0: sums only; 1: also store exp(x − m) (0 on masked classes) in ``dst``; 2: the same, in place
        (``dst`` is ``xr``'s memory). ``xr`` is only read, so read-only logits need no copy.
        """
        k = xr.shape[0]
        mt = _to_dtype_of(m, xr)
        sum_e = 0.0
        sum_x = 0.0
        for start in range(0, k, _BLOCK):
            stop = min(start + _BLOCK, k)
            xs = xr[start:stop]
            if plain:
                if mode == 0:
                    block_e, block_x = _block_sum(xs, mt)
                elif mode == 1:
                    block_e, block_x = _block_store(xs, dst[start:stop], mt)
                else:
                    block_e, block_x = _block_inplace(dst[start:stop], mt)
            else:
                if mode == 0:
                    block_e, block_x = _block_sum_masked(xs, w[start:stop], valid[start:stop], mt)
                else:
                    ds = dst[start:stop]
                    if mode == 1:
                        block_e, block_x = _block_store_masked(xs, ds, w[start:stop], valid[start:stop], mt)
                    else:
                        block_e, block_x = _block_store_masked(ds, ds, w[start:stop], valid[start:stop], mt)
            sum_e += block_e
            sum_x += block_x
        return sum_e, sum_x

    def _scalar_like(value, like):  # pragma: no cover - Numba only
        return value

    @overload(_scalar_like, inline="always")
    def _scalar_like_impl(value, like):
        if like == types.float32:
            return lambda value, like: np.float32(value)
        return lambda value, like: np.float64(value)

    @intrinsic
    def _select(typingctx, cond, left, right):
        """LLVM ``select``: ``left`` where ``cond`` else ``right`` (one instruction, no control flow)."""
        if cond != types.boolean or left != right or left not in (types.float32, types.float64):
            return None

        def codegen(context, builder, signature, args):
            return builder.select(args[0], args[1], args[2])

        return left(cond, left, right), codegen

    def _tanh(u):  # pragma: no cover - replaced by the overload below inside Numba
        return math.tanh(u)

    @overload(_tanh, jit_options={"fastmath": _EXP_FLAGS, "error_model": "numpy"})
    def _tanh_impl(u):
        """tanh in ``u``'s dtype, vectorisable; its own function so that the scalar and the SIMD copies round alike.

        float32: a rational minimax fit u·(1 + u²·P(u²)) / Q(u²) (P of degree 3, Q of degree 4, no exp) with u
        clamped to ±_TANH32_CLAMP, where it gives exactly ±1 (relative error under 3e-7, ±inf give ±1, NaN stays
        NaN, tiny and subnormal u give u). float64: tanh|u| = (1 − e^{−2|u|}) / (1 + e^{−2|u|}) from :func:`_exp`
        above |u| = 0.01 and the odd Taylor polynomial through u^7 below (relative error under 1e-15). The
        division needs ``error_model="numpy"`` (a Python-style zero-division check would keep loops scalar)."""
        if u == types.float32:

            def tanh32(u):
                x = _select(u > np.float32(_TANH32_CLAMP), np.float32(_TANH32_CLAMP), u)
                x = _select(x < np.float32(-_TANH32_CLAMP), np.float32(-_TANH32_CLAMP), x)
                x2 = x * x
                x3 = x2 * x
                p = np.float32(_TANH32_P[3])
                p = p * x2 + np.float32(_TANH32_P[2])
                p = p * x2 + np.float32(_TANH32_P[1])
                p = p * x2 + np.float32(_TANH32_P[0])
                p = x3 * p + x
                q = np.float32(_TANH32_Q[3])
                q = q * x2 + np.float32(_TANH32_Q[2])
                q = q * x2 + np.float32(_TANH32_Q[1])
                q = q * x2 + np.float32(_TANH32_Q[0])
                q = q * x2 + np.float32(1.0)
                return p / q

            return tanh32
        if u == types.float64:

            def tanh64(u):
                au = abs(u)
                e = _exp(-2.0 * au)
                large = (1.0 - e) / (1.0 + e)
                u2 = au * au
                small = au * (1.0 - u2 * (1.0 / 3.0 - u2 * (2.0 / 15.0 - u2 * (17.0 / 315.0))))
                t = _select(au < 0.01, small, large)
                return _select(u >= 0.0, t, -t)

            return tanh64
        return None

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True, error_model="numpy")
    def _cap_scalar(v, c):
        """c·tanh(v/c) for one value (the label's logit, the row maximum, the probability rows' first sweep),
        rounded as in the blocks below."""
        inv_c = 1.0 / c
        return _scalar_like(c, v) * _tanh(v * _scalar_like(inv_c, v))

    @numba.njit(fastmath=_MAX_FLAGS, cache=True, error_model="numpy")
    def _capped_row_max(xr, valid, has_mask, c, inv_c):
        """The maximum of the capped logits over the valid classes: c·tanh is increasing, so the cap of the raw
        maximum (±inf give ±c: always finite; a NaN logit is skipped here and makes its row NaN later)."""
        low = _to_dtype_of(-np.inf, xr)
        m = low
        k = xr.shape[0]
        if has_mask:
            for j in range(k):
                m = _maxnum(m, xr[j] if valid[j] else low)
        else:
            for j in range(k):
                m = _maxnum(m, xr[j])
        return np.float64(_cap_scalar(m, c))

    # Soft-capped pass 2: each logit x is capped as it is read (x' = c·t, t = tanh(x/c)); e = exp(x' − m) goes
    # to the gradient row (over x itself in place) and the chain factor 1 − t² to a scratch row, so pass 3 is
    # (coef·e − b·w)·(1 − t²) with no transcendental function
    @numba.njit(fastmath=_LOOP_FLAGS, inline="always", error_model="numpy")
    def _block_cap_store(xs, es, ss, ws, vs, mt, c, inv_c):
        zero = mt - mt
        one = zero + _scalar_like(1.0, mt)
        sum_e = zero
        sum_x = zero
        for j in range(xs.shape[0]):
            t = _tanh(xs[j] * inv_c)
            d = c * t - mt
            e = _exp(d) if vs[j] else zero
            sum_e += e
            sum_x += ws[j] * d if ws[j] != zero else zero
            es[j] = e
            ss[j] = one - t * t
        return sum_e, sum_x

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True, error_model="numpy")
    def _cap_pass(xr, dst, chain, w, valid, m, c, mode):
        """:func:`_exp_pass` on the capped logits; modes 1 and 2 also store 1 − tanh²(x/c) in ``chain``.

        Mode 0 stores into a one-block scratch buffer: the same loop as the other modes, so ``loss`` and
        ``loss_and_grad`` agree exactly."""
        k = xr.shape[0]
        scratch = np.empty(2 * min(k, _BLOCK) if mode == 0 else 0, xr.dtype)
        mt = _to_dtype_of(m, xr)
        ct = _to_dtype_of(c, xr)
        inv_c = _to_dtype_of(1.0 / c, xr)
        sum_e = 0.0
        sum_x = 0.0
        for start in range(0, k, _BLOCK):
            stop = min(start + _BLOCK, k)
            size = stop - start
            ws = w[start:stop]
            vs = valid[start:stop]
            if mode == 0:
                block_e, block_x = _block_cap_store(
                    xr[start:stop], scratch[:size], scratch[size : 2 * size], ws, vs, mt, ct, inv_c
                )
            elif mode == 1:
                block_e, block_x = _block_cap_store(
                    xr[start:stop], dst[start:stop], chain[start:stop], ws, vs, mt, ct, inv_c
                )
            else:
                ds = dst[start:stop]
                block_e, block_x = _block_cap_store(ds, ds, chain[start:stop], ws, vs, mt, ct, inv_c)
            sum_e += block_e
            sum_x += block_x
        return sum_e, sum_x

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True, error_model="numpy")
    def _cap_grad(dst, chain, w, valid, coef, bs):
        """Pass 3 under soft-capping: ``dst`` holds exp(x' − m) (0 on the masked classes), ``chain`` 1 − t²;
        writes (coef·exp(x' − m) − bs·w)·(1 − t²) on the valid classes, 0 on the others."""
        zero = coef - coef
        for j in range(dst.shape[0]):
            g = (dst[j] * coef - bs * w[j]) * chain[j]
            dst[j] = g if valid[j] else zero

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True, error_model="numpy")
    def _cap_prob_grad(dst, chain, tr, w, valid, has_w, has_mask, coef, st, at, bt):
        zero = coef - coef
        one = zero + _scalar_like(1.0, coef)
        for j in range(dst.shape[0]):
            ok = valid[j] if has_mask else True
            wq = (at * tr[j] + bt) * (w[j] if has_w else one)
            g = (dst[j] * coef - st * wq) * chain[j]
            dst[j] = g if ok else zero

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True)
    def _index_row(
        i,
        x,
        y,
        w,
        valid,
        has_w,
        has_mask,
        ignore_index,
        has_ignore,
        params,
        sw,
        has_sw,
        want_grad,
        inplace,
        out,
        loss,
        chain,
    ):
        k = x.shape[1]
        a, b, total_w, z, h_target, h_other, normalize, scale = (
            params[0],
            params[1],
            params[2],
            params[3],
            params[4],
            params[5],
            params[6] != 0.0,
            params[7],
        )
        zero = _to_dtype_of(0.0, x)
        xr = x[i]
        dst = out[i]
        label = y[i]
        if has_ignore and label == ignore_index:
            loss[i] = 0.0
            if want_grad:
                for c in range(k):
                    dst[c] = zero
            return
        softcap = params[8]
        capped = softcap != 0.0
        if has_sw:
            scale *= sw[i]
        mode = (2 if inplace else 1) if want_grad else 0
        if capped:
            x_y_t = _cap_scalar(xr[label], softcap)
            x_y = np.float64(x_y_t)
            m = _capped_row_max(xr, valid, has_mask, softcap, 1.0 / softcap)
        else:
            x_y_t = xr[label]
            x_y = np.float64(x_y_t)
            m = _row_max(xr, valid, has_mask)
        # q_y = 0 (ε = 1, spread "others"): the target's logit stays out, even at −inf, so the loss takes
        # Σ_{c≠y} w_c (x_c − m). Summed here, before the pass: in place (mode 2) the pass overwrites the
        # logits with exp(x − m)
        empty_target = params[9] != 0.0
        others = 0.0
        if empty_target and b != 0.0:
            for c in range(k):
                if c != label and valid[c] and (not has_w or w[c] != 0):
                    if capped:
                        xc = np.float64(_cap_scalar(xr[c], softcap))
                    else:
                        xc = np.float64(xr[c])
                    others += (np.float64(w[c]) if has_w else 1.0) * (xc - m)
        if capped:
            sum_e, sum_x = _cap_pass(xr, dst, chain, w, valid, m, softcap, mode)
        else:
            sum_e, sum_x = _exp_pass(xr, dst, w, valid, not has_w, m, mode)
        w_y = np.float64(w[label]) if has_w else 1.0
        lse_shifted = math.log(sum_e)
        lse = m + lse_shifted
        # a term whose coefficient is 0 adds exactly 0: a target of weight 0 at x_y = −inf, a z-loss of 0
        # against an overflowing L² (float64 logits above ~1.3e154)
        value = 0.0
        if empty_target:
            if b != 0.0:
                value += b * ((total_w - w_y) * lse_shifted - others)
        else:
            if a != 0.0 and w_y != 0.0:
                value += a * w_y * (lse - x_y)
            if b != 0.0:
                value += b * (total_w * lse_shifted - sum_x)
        coef = a * w_y + b * total_w
        if z != 0.0:
            value += z * w_y * lse * lse
            coef += 2.0 * z * w_y * lse
        if normalize:
            value += w_y * h_target + h_other * (total_w - w_y)  # + Σ w q log q: the KL form
        loss[i] = value
        if not want_grad:
            return
        coef = _to_dtype_of(scale * coef / sum_e, x)
        bs = _to_dtype_of(scale * b, x)
        if capped:
            _cap_grad(dst, chain, w, valid, coef, bs)
            dst[label] -= _to_dtype_of(scale * a * w_y, x) * chain[label]
            return
        if has_w:
            for c in range(k):
                dst[c] = dst[c] * coef - bs * w[c]
        else:
            for c in range(k):
                dst[c] = dst[c] * coef - bs
        dst[label] -= _to_dtype_of(scale * a * w_y, x)
        if has_mask and lse != lse:  # a NaN row stays NaN on valid classes only
            for c in range(k):
                if not valid[c]:
                    dst[c] = zero

    @numba.njit(cache=True, parallel=True)
    def _index_rows(
        x,
        y,
        w,
        valid,
        has_w,
        has_mask,
        ignore_index,
        has_ignore,
        params,
        sw,
        has_sw,
        want_grad,
        inplace,
        out,
        loss,
        chunks,
    ):
        """``chunks`` ranges of rows, a few per thread (each allocates soft-capping's scratch row once)."""
        n, k = x.shape
        chain_size = k if want_grad and params[8] != 0.0 else 0
        for chunk in prange(chunks):
            chain = np.empty(chain_size, x.dtype)  # soft-capping's per-row scratch, one per chunk of rows
            for i in range(chunk * n // chunks, (chunk + 1) * n // chunks):
                _index_row(
                    i,
                    x,
                    y,
                    w,
                    valid,
                    has_w,
                    has_mask,
                    ignore_index,
                    has_ignore,
                    params,
                    sw,
                    has_sw,
                    want_grad,
                    inplace,
                    out,
                    loss,
                    chain,
                )

    # the same loop without threads, for inputs too small to pay for starting them
    @numba.njit(cache=True)
    def _index_rows_serial(
        x, y, w, valid, has_w, has_mask, ignore_index, has_ignore, params, sw, has_sw, want_grad, inplace, out, loss
    ):
        chain = np.empty(x.shape[1] if want_grad and params[8] != 0.0 else 0, x.dtype)
        for i in range(x.shape[0]):
            _index_row(
                i,
                x,
                y,
                w,
                valid,
                has_w,
                has_mask,
                ignore_index,
                has_ignore,
                params,
                sw,
                has_sw,
                want_grad,
                inplace,
                out,
                loss,
                chain,
            )

    # The plain case (integer labels; no class weight, class mask, soft-cap or sample weight; the target keeps
    # its mass): the row's algebra of :func:`_index_row` with w = 1, in one function called once per range of
    # rows. Rows of up to one block index the 2-D arrays directly, longer ones go through one view per block:
    # the general kernel's per-row calls and views cost about 0.3 µs a row in reference counting, which
    # dominates a small classifier's call.
    @numba.njit(cache=True)
    def _plain_label_count(y, k, ignore_index, has_ignore):
        """The number of rows whose label is not ``ignore_index``, or −1 when a label is outside [0, K)."""
        active = 0
        for i in range(y.shape[0]):
            label = y[i]
            if has_ignore and label == ignore_index:
                continue
            if label < 0 or label >= k:
                return -1
            active += 1
        return active

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True)
    def _plain_range(x, y, params, ignore_index, has_ignore, scale, want_grad, out, loss, first, stop_row):
        """Rows ``first`` to ``stop_row`` of the plain case. One call per range of rows with the row loop inside
        (an inlined per-row function would count references to its array arguments on every row)."""
        k = x.shape[1]
        a, b, total_w, z, h_target, h_other = params[0], params[1], params[2], params[3], params[4], params[5]
        normalize = params[6] != 0.0
        smoothing = b != 0.0  # else Σ (x − max) is not needed: the exponential pass skips it
        zero = _to_dtype_of(0.0, x)
        for i in range(first, stop_row):
            label = y[i]
            if has_ignore and label == ignore_index:
                loss[i] = 0.0
                if want_grad:
                    for c in range(k):
                        out[i, c] = zero
                continue
            m_raw = _to_dtype_of(-np.inf, x)
            for c in range(k):
                m_raw = _maxnum(m_raw, x[i, c])
            if m_raw == np.inf:
                m = np.nan
            else:
                m = np.float64(m_raw) if math.isfinite(m_raw) else 0.0
            x_y = np.float64(x[i, label])  # read before an in-place pass overwrites the row
            mt = _to_dtype_of(m, x)
            if k <= _BLOCK:  # one block, indexed directly: no views
                block_e = mt - mt
                block_x = mt - mt
                if want_grad and smoothing:
                    for c in range(k):
                        d = x[i, c] - mt
                        e = _exp(d)
                        block_e += e
                        block_x += d
                        out[i, c] = e
                elif want_grad:
                    for c in range(k):
                        e = _exp(x[i, c] - mt)
                        block_e += e
                        out[i, c] = e
                elif smoothing:
                    for c in range(k):
                        d = x[i, c] - mt
                        block_e += _exp(d)
                        block_x += d
                else:
                    for c in range(k):
                        block_e += _exp(x[i, c] - mt)
                sum_e = np.float64(block_e)
                sum_x = np.float64(block_x)
            else:
                xr = x[i]
                sum_e = 0.0
                sum_x = 0.0
                for start in range(0, k, _BLOCK):
                    stop = min(start + _BLOCK, k)
                    xs = xr[start:stop]
                    if want_grad and smoothing:
                        block_e, block_x = _block_store(xs, out[i][start:stop], mt)
                    elif want_grad:
                        block_e, block_x = _block_store_exp(xs, out[i][start:stop], mt), mt - mt
                    elif smoothing:
                        block_e, block_x = _block_sum(xs, mt)
                    else:
                        block_e, block_x = _block_sum_exp(xs, mt), mt - mt
                    sum_e += block_e
                    sum_x += block_x
            lse_shifted = math.log(sum_e)
            lse = m + lse_shifted
            value = 0.0
            if a != 0.0:
                value += a * (lse - x_y)
            if b != 0.0:
                value += b * (total_w * lse_shifted - sum_x)
            coef = a + b * total_w
            if z != 0.0:
                value += z * lse * lse
                coef += 2.0 * z * lse
            if normalize:
                value += h_target + h_other * (total_w - 1.0)
            loss[i] = value
            if not want_grad:
                continue
            coef_t = _to_dtype_of(scale * coef / sum_e, x)
            bs = _to_dtype_of(scale * b, x)
            for c in range(k):
                out[i, c] = out[i, c] * coef_t - bs
            out[i, label] -= _to_dtype_of(scale * a, x)

    @numba.njit(cache=True)
    def _plain_scale(y, k, ignore_index, has_ignore, count_scale, params):
        """(the rows counted in the mean, or −1 for a label out of range; the gradient's scale: 1/that count,
        0 for none, when ``count_scale``, else params[7])."""
        active = _plain_label_count(y, k, ignore_index, has_ignore)
        if count_scale:
            return active, 1.0 / active if active > 0 else 0.0
        return active, params[7]

    # The plain kernel's entries take the logits and labels by address: lsx.torch's short path (lsx.torch._plain)
    # makes no NumPy view per call, and every caller (lsx.numpy, each lsx.torch path) runs the same compiled
    # entry, hence the same bits. The short path also reduces in the same call, summed in NumPy's order.
    @intrinsic
    def _pointer_to(typingctx, address, like):
        """``address`` (an integer) as a pointer to ``like``'s dtype (an array's, or a Numba number type)."""
        if not isinstance(address, types.Integer):
            return None
        if isinstance(like, types.Array):
            dtype = like.dtype
        elif isinstance(like, types.NumberClass):
            dtype = like.instance_type
        else:
            return None
        sig = types.CPointer(dtype)(address, like)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(signature.return_type))

        return sig, codegen

    @intrinsic
    def _as_read_only(typingctx, array):
        """The same array typed read-only, so that callers share the kernels' read-only specialisations."""
        if not isinstance(array, types.Array):
            return None
        sig = array.copy(readonly=True)(array)

        def codegen(context, builder, signature, args):
            context.nrt.incref(builder, signature.args[0], args[0])
            return args[0]

        return sig, codegen

    @numba.njit(cache=True)
    def _pairwise_block(values, first, count):
        """Σ of at most ``_PAIRWISE_BLOCK`` values in the order of NumPy's ``add.reduce`` (its pairwise
        summation sums a contiguous run that short as one block: eight running sums, then the rest in order).
        No fastmath: the order is the point."""
        if count < 8:
            total = _to_dtype_of(0.0, values)
            for i in range(first, first + count):
                total += values[i]
            return total
        r0, r1, r2, r3 = values[first], values[first + 1], values[first + 2], values[first + 3]
        r4, r5, r6, r7 = values[first + 4], values[first + 5], values[first + 6], values[first + 7]
        i = first + 8
        stop = first + count - count % 8
        while i < stop:
            r0 += values[i]
            r1 += values[i + 1]
            r2 += values[i + 2]
            r3 += values[i + 3]
            r4 += values[i + 4]
            r5 += values[i + 5]
            r6 += values[i + 6]
            r7 += values[i + 7]
            i += 8
        total = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
        while i < first + count:
            total += values[i]
            i += 1
        return total

    @numba.njit(cache=True)
    def _addresses(x, y):
        """The data addresses of two arrays (``ndarray.ctypes.data`` costs more from Python)."""
        return x.ctypes.data, y.ctypes.data

    @numba.njit(cache=True, inline="always")
    def _plain_reduce(params, n, active, loss):
        """With a reduction (settings, below) and at most ``_PAIRWISE_BLOCK`` rows, the reduced loss into
        ``loss[n]``: NumPy's ``add.reduce`` of the rows' losses in their dtype (the same bits), divided by the
        rows counted for the mean (an empty mean's value if none). More rows are left to the caller's NumPy."""
        settings = params.shape[0] - _PLAIN_SETTINGS
        reduction = params[settings + 2]
        if active >= 0 and reduction != 0.0 and n <= _PAIRWISE_BLOCK:
            total = _to_dtype_of(0.0, loss) + _pairwise_block(loss, 0, n)  # (add.reduce starts from 0)
            if reduction == 2.0:
                total = total / _to_dtype_of(active, loss) if active > 0 else _to_dtype_of(params[settings + 3], loss)
            loss[n] = total
        return active

    @numba.njit(cache=True, inline="always")
    def _plain_inputs(x_address, y_address, n, k, params, ignore_index, out):
        """(logits, labels, whether ``ignore_index`` applies, the rows counted or −1, the gradient's scale): the
        two entries' common start (see :func:`_plain_at`)."""
        x = _as_read_only(numba.carray(_pointer_to(x_address, out), (n, k)))
        y = _as_read_only(numba.carray(_pointer_to(y_address, numba.int64), n))
        settings = params.shape[0] - _PLAIN_SETTINGS
        has_ignore, count_scale = params[settings] != 0.0, params[settings + 1] != 0.0
        active, scale = _plain_scale(y, k, ignore_index, has_ignore, count_scale, params)
        return x, y, has_ignore, active, scale

    @numba.njit(cache=True)
    def _plain_at(x_address, y_address, n, k, params, ignore_index, want_grad, out, loss):
        """The plain kernel, serially, on C-contiguous (N, K) logits and N int64 labels at the given addresses
        (memory the caller keeps alive and unchanged for the call). ``params``: the plain kernels' row
        coefficients (see :func:`plain_params`) followed by ``_PLAIN_SETTINGS`` settings (see
        :func:`plain_settings`). With a reduction, ``loss`` holds N + 1 values: the rows' losses, then the reduced
        loss (see :func:`_plain_reduce`). Returns what :func:`plain_rows` returns."""
        x, y, has_ignore, active, scale = _plain_inputs(x_address, y_address, n, k, params, ignore_index, out)
        if active >= 0:
            _plain_range(x, y, params, ignore_index, has_ignore, scale, want_grad, out, loss, 0, n)
        return _plain_reduce(params, n, active, loss)

    @numba.njit(cache=True, parallel=True)
    def _plain_at_threaded(x_address, y_address, n, k, params, ignore_index, want_grad, out, loss, chunks):
        """:func:`_plain_at` with the rows in ``chunks`` ranges spread over the threads; a separate entry, so that
        small inputs never compile the threaded kernel."""
        x, y, has_ignore, active, scale = _plain_inputs(x_address, y_address, n, k, params, ignore_index, out)
        if active >= 0:
            for chunk in prange(chunks):
                first, stop_row = chunk * n // chunks, (chunk + 1) * n // chunks
                _plain_range(x, y, params, ignore_index, has_ignore, scale, want_grad, out, loss, first, stop_row)
        return _plain_reduce(params, n, active, loss)

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True)
    def _prob_row(i, x, t, w, valid, has_w, has_mask, params, sw, has_sw, want_grad, inplace, out, loss, chain):
        k = x.shape[1]
        a, b, z, normalize, scale = params[0], params[1], params[3], params[6] != 0.0, params[7]
        softcap = params[8]
        capped = softcap != 0.0
        if has_sw:
            scale *= sw[i]
        at = _to_dtype_of(a, x)
        bt = _to_dtype_of(b, x)
        zero = _to_dtype_of(0.0, x)
        xr = x[i]
        tr = t[i]
        dst = out[i]
        m = _capped_row_max(xr, valid, has_mask, softcap, 1.0 / softcap) if capped else _row_max(xr, valid, has_mask)
        mt = _to_dtype_of(m, x)
        # Σ w·q·(x − m), Σ w·q and Σ w·q·log q before pass 2 may overwrite x (in-place mode), over the classes
        # with w·q ≠ 0, linearly: a NaN q makes the row NaN, a negative q counts (its q·log q is NaN)
        sum_qx = 0.0
        mass = 0.0
        entropy = 0.0
        for c in range(k):
            ok = valid[c] if has_mask else True
            wq = (at * tr[c] + bt) * (w[c] if has_w else _to_dtype_of(1.0, x))
            if ok and wq != zero:
                xc = _cap_scalar(xr[c], softcap) if capped else xr[c]
                sum_qx += np.float64(wq * (xc - mt))
                mass += np.float64(wq)
                if normalize:
                    q = np.float64(at * tr[c] + bt)
                    entropy += (np.float64(w[c]) if has_w else 1.0) * q * math.log(q)
        mode = (2 if inplace else 1) if want_grad else 0
        if capped:
            sum_e, _ = _cap_pass(xr, dst, chain, w, valid, m, softcap, mode)
        else:
            sum_e, _ = _exp_pass(xr, dst, w, valid, not has_w, m, mode)
        lse_shifted = math.log(sum_e)
        lse = m + lse_shifted
        value = mass * lse_shifted - sum_qx
        coef = mass
        if z != 0.0:  # no 0·∞ against an overflowing L²
            value += z * lse * lse
            coef += 2.0 * z * lse
        loss[i] = value + (entropy if normalize else 0.0)
        if not want_grad:
            return
        coef = _to_dtype_of(scale * coef / sum_e, x)
        st = _to_dtype_of(scale, x)
        if capped:
            _cap_prob_grad(dst, chain, tr, w, valid, has_w, has_mask, coef, st, at, bt)
            return
        for c in range(k):
            ok = valid[c] if has_mask else True
            wq = (at * tr[c] + bt) * (w[c] if has_w else _to_dtype_of(1.0, x))
            dst[c] = (dst[c] * coef - st * wq) if ok else zero

    @numba.njit(cache=True, parallel=True)
    def _prob_rows(x, t, w, valid, has_w, has_mask, params, sw, has_sw, want_grad, inplace, out, loss, chunks):
        n, k = x.shape
        chain_size = k if want_grad and params[8] != 0.0 else 0
        for chunk in prange(chunks):
            chain = np.empty(chain_size, x.dtype)
            for i in range(chunk * n // chunks, (chunk + 1) * n // chunks):
                _prob_row(i, x, t, w, valid, has_w, has_mask, params, sw, has_sw, want_grad, inplace, out, loss, chain)

    @numba.njit(cache=True)
    def _prob_rows_serial(x, t, w, valid, has_w, has_mask, params, sw, has_sw, want_grad, inplace, out, loss):
        chain = np.empty(x.shape[1] if want_grad and params[8] != 0.0 else 0, x.dtype)
        for i in range(x.shape[0]):
            _prob_row(i, x, t, w, valid, has_w, has_mask, params, sw, has_sw, want_grad, inplace, out, loss, chain)


    # ---- the two-step entries (statistics of a class slice, then the gradient from merged statistics) ----
    # Used where the rows' statistics are merged across slices of the class axis before the gradient (lsx.torch's
    # process_group= path); the fused kernels above serve the single-slice case.
    @numba.njit(fastmath=_LOOP_FLAGS, cache=True, error_model="numpy")
    def _statistics_range(
        x, y, t, w, valid, has_w, has_mask, any_valid, params, ignore_index, offset, num_classes, out, lo, hi
    ):
        """Rows [lo, hi): the six statistics of the two-step contract (see :func:`statistics`) into ``out``
        (6, N) float64. ``y`` (labels) is used when ``t`` has no columns, else ``t`` (probabilities)."""
        k = x.shape[1]
        a, b, smoothing, normalize, softcap, has_ignore = (
            params[0], params[1], params[2] != 0.0, params[3] != 0.0, params[4], params[5] != 0.0
        )  # fmt: skip
        capped = softcap != 0.0
        probs = t.shape[1] > 0
        scratch = np.empty(2 * min(k, _BLOCK) if capped else 0, x.dtype)
        zero = _to_dtype_of(0.0, x)
        one = _to_dtype_of(1.0, x)
        at = _to_dtype_of(a, x)
        bt = _to_dtype_of(b, x)
        for i in range(lo, hi):
            xr = x[i]
            for s in range(6):
                out[s, i] = 0.0
            if not any_valid:  # no valid class in this slice: nothing but the (−inf) maximum
                out[0, i] = -np.inf
                if probs:
                    for c in range(k):
                        if t[i, c] != zero:
                            out[5, i] = 1.0
                continue
            if capped:
                raw = _capped_row_max(xr, valid, has_mask, softcap, 1.0 / softcap)
            else:
                low = _to_dtype_of(-np.inf, x)
                mx = low
                if has_mask:
                    for c in range(k):
                        mx = _maxnum(mx, xr[c] if valid[c] else low)
                else:
                    for c in range(k):
                        mx = _maxnum(mx, xr[c])
                raw = np.float64(mx)
            m = raw if math.isfinite(raw) else 0.0
            if capped:
                sum_e = 0.0
                sum_x = 0.0
                mt = _to_dtype_of(m, x)
                ct = _to_dtype_of(softcap, x)
                inv_c = _to_dtype_of(1.0 / softcap, x)
                for start in range(0, k, _BLOCK):
                    stop = min(start + _BLOCK, k)
                    size = stop - start
                    block_e, block_x = _block_cap_store(
                        xr[start:stop], scratch[:size], scratch[size : 2 * size], w[start:stop], valid[start:stop],
                        mt, ct, inv_c,
                    )  # fmt: skip
                    sum_e += block_e
                    sum_x += block_x
            else:
                sum_e, sum_x = _exp_pass(xr, scratch, w, valid, not has_w, m, 0)  # (mode 0: never written)
            out[0, i] = raw
            out[1, i] = sum_e
            if not probs:
                if smoothing:
                    out[4, i] = sum_x
                label = y[i]
                if has_ignore and label == ignore_index:
                    continue
                if label < 0 or label >= num_classes:
                    continue
                local = label - offset
                if local < 0 or local >= k:
                    continue
                if has_mask and not valid[local]:  # w_y: 0 from the masked weights, 1 without weights
                    out[2, i] = np.nan
                    out[3, i] = 0.0 if params[6] != 0.0 else 1.0
                    out[5, i] = 2.0
                    continue
                x_y = _cap_scalar(xr[local], softcap) if capped else xr[local]
                out[2, i] = np.float64(x_y) - m
                out[3, i] = np.float64(w[local]) if has_w else 1.0
                out[5, i] = 1.0
                if smoothing and params[7] != 0.0:  # a massless target: Σ w (x − m) without it, even at −inf
                    others = 0.0
                    for c in range(k):
                        if c != local and valid[c] and (not has_w or w[c] != 0):
                            xc = np.float64(_cap_scalar(xr[c], softcap) if capped else xr[c])
                            others += (np.float64(w[c]) if has_w else 1.0) * (xc - m)
                    out[4, i] = others
                continue
            mt = _to_dtype_of(m, x)
            sum_qx = 0.0
            mass = 0.0
            entropy = 0.0
            masked_mass = False
            for c in range(k):
                ok = valid[c] if has_mask else True
                if not ok:
                    if t[i, c] != zero:
                        masked_mass = True
                    continue
                q = at * t[i, c] + bt
                wq = q * (w[c] if has_w else one)
                if wq != zero:
                    xc = _cap_scalar(xr[c], softcap) if capped else xr[c]
                    sum_qx += np.float64(wq * (xc - mt))
                    mass += np.float64(wq)
                    if normalize:
                        qd = np.float64(q)
                        entropy += (np.float64(w[c]) if has_w else 1.0) * qd * math.log(qd)
            out[2, i] = mass
            out[3, i] = sum_qx
            out[4, i] = entropy
            out[5, i] = 1.0 if masked_mass else 0.0

    @numba.njit(cache=True, parallel=True)
    def _statistics_rows(
        x, y, t, w, valid, has_w, has_mask, any_valid, params, ignore_index, offset, num_classes, out, chunks
    ):
        n = x.shape[0]
        for chunk in prange(chunks):
            _statistics_range(
                x, y, t, w, valid, has_w, has_mask, any_valid, params, ignore_index, offset, num_classes, out,
                chunk * n // chunks, (chunk + 1) * n // chunks,
            )  # fmt: skip

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True, error_model="numpy")
    def _gradient_range(
        x, g, y, t, w, valid, has_w, has_mask, params, ignore_index, offset, num_classes, rows, nan_rows, lo, hi
    ):
        """Rows [lo, hi) of the gradient from the merged per-row factors ``rows`` (3, N) float64 (local_max,
        p_scale, row_scale), written into ``g`` (which may be ``x``'s memory: each element is read first)."""
        k = x.shape[1]
        a, b, smoothing, softcap, has_ignore, has_nan_rows = (
            params[0], params[1], params[2] != 0.0, params[4], params[5] != 0.0, params[6] != 0.0
        )  # fmt: skip
        capped = softcap != 0.0
        probs = t.shape[1] > 0
        zero = _to_dtype_of(0.0, x)
        one = _to_dtype_of(1.0, x)
        nan = _to_dtype_of(np.nan, x)
        at = _to_dtype_of(a, x)
        bt = _to_dtype_of(b, x)
        ct = _to_dtype_of(softcap if capped else 1.0, x)
        inv_c = _to_dtype_of(1.0 / softcap if capped else 1.0, x)
        for i in range(lo, hi):
            xr = x[i]
            dst = g[i]
            local = -1
            bad = has_nan_rows and nan_rows[i]
            if not probs:
                label = y[i]
                if has_ignore and label == ignore_index:
                    for c in range(k):
                        dst[c] = zero
                    continue
                if label < 0 or label >= num_classes:
                    bad = True
                elif label - offset >= 0 and label - offset < k:
                    local = label - offset
                    if has_mask and not valid[local]:
                        bad = True
            elif has_mask:
                for c in range(k):
                    if not valid[c] and t[i, c] != zero:
                        bad = True
            if bad:  # NaN on the valid classes, 0 on the masked ones
                for c in range(k):
                    dst[c] = nan if (valid[c] or not has_mask) else zero
                continue
            lm = _to_dtype_of(rows[0, i], x)
            ps = _to_dtype_of(rows[1, i], x)
            rs = _to_dtype_of(rows[2, i], x)
            if probs:
                st = rs
                for c in range(k):
                    wq = (at * t[i, c] + bt) * (w[c] if has_w else one)
                    if capped:
                        u = _tanh(xr[c] * inv_c)
                        v = (_exp(ct * u - lm) * ps - st * wq) * (one - u * u)
                    else:
                        v = _exp(xr[c] - lm) * ps - st * wq
                    dst[c] = v if (valid[c] or not has_mask) else zero
                continue
            bs = rs * bt if smoothing else zero
            target = zero
            if local >= 0:  # read before the row is overwritten (in place)
                w_y = w[local] if has_w else one
                target = rs * at * w_y
                if capped:
                    u_y = _tanh(xr[local] * inv_c)
                    target = target * (one - u_y * u_y)
            if capped:
                for c in range(k):
                    u = _tanh(xr[c] * inv_c)
                    v = (_exp(ct * u - lm) * ps - bs * w[c]) * (one - u * u)
                    dst[c] = v if valid[c] else zero
            elif has_w:
                for c in range(k):
                    v = _exp(xr[c] - lm) * ps - bs * w[c]
                    dst[c] = v if valid[c] else zero
            else:
                for c in range(k):
                    dst[c] = _exp(xr[c] - lm) * ps - bs
            if local >= 0:
                dst[local] -= target

    @numba.njit(cache=True, parallel=True)
    def _gradient_rows(
        x, g, y, t, w, valid, has_w, has_mask, params, ignore_index, offset, num_classes, rows, nan_rows, chunks
    ):
        n = x.shape[0]
        for chunk in prange(chunks):
            _gradient_range(
                x, g, y, t, w, valid, has_w, has_mask, params, ignore_index, offset, num_classes, rows, nan_rows,
                chunk * n // chunks, (chunk + 1) * n // chunks,
            )  # fmt: skip


def _xlogx(q: float) -> float:
    from lsx import spec

    return spec.xlogx(q)


def _read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view: the kernels only read their inputs, so every input reaches them typed read-only (one
    compiled specialisation, whether the caller's array is writeable, read-only, a memmap or a buffer)."""
    view = array.view()
    view.flags.writeable = False
    return view


_NO_SAMPLE_WEIGHT = _read_only(np.ones(1))  # the kernels' sample-weight argument when there is none


def forward_backward(
    x2: np.ndarray,
    t2: np.ndarray,
    kind: str,
    opts: Any,
    weight: np.ndarray | None,
    mask: np.ndarray | None,
    compute: type,
    want_grad: bool,
    out2: np.ndarray | None = None,
    *,
    scale_mean: bool = False,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Loss per row, the mean's denominator and the gradient, for (N, K) logits ``x2``.

    ``t2``: labels (N,) of any integer dtype for ``kind="index"`` or probabilities (N, K) for
    ``kind="probs"``; ``weight`` float64 (K,) or None; ``mask`` bool (K,) or None; ``compute``: np.float32
    or np.float64. The inputs are never written (read-only ones are fine).
    The gradient is that of the per-element losses, unscaled, unless ``scale_mean`` (then it already carries
    the mean's 1/D, or 0 for D = 0, when ``opts.reduction == "mean"``). It is written into ``out2`` when
    given: an (N, K) C-contiguous array of the ``compute`` dtype, which may be ``x2`` itself (in place).
    ``sample_weight``: float64 (N,) or None: multiplies each row's gradient (the caller multiplies the losses)
    and enters the mean's denominator, which ``opts.denominator`` replaces when given. ``opts.softcap`` is
    applied inside the sweep.
    """
    if not AVAILABLE:
        raise ImportError("lsx.numpy._numba needs numba: pip install 'lsx[numba]'")
    n, k = x2.shape
    x = np.ascontiguousarray(x2, dtype=compute)
    if kind == "index" and weight is None and mask is None and sample_weight is None and opts.softcap is None:
        params = plain_params(opts, k)
        if params is not None:
            return _plain(x, t2, opts, params, compute, want_grad, out2, scale_mean)
    valid_count = k if mask is None else int(mask.sum())
    a, b = spec.smoothing_coefficients(opts, valid_count)
    has_w = weight is not None or mask is not None
    if weight is None and mask is None:
        w, valid = _unweighted(k, compute)
    else:
        w = np.ones(k, compute) if weight is None else weight.astype(compute)
        if mask is not None:
            w = np.where(mask, w, 0).astype(compute)  # 0 on the masked classes (the masked blocks rely on it)
        valid = np.ones(k, np.bool_) if mask is None else np.array(mask, np.bool_)
    total_w = float(valid_count) if weight is None else float(np.where(valid, weight, 0).sum())

    if kind == "index":
        # int64 whatever the caller's dtype: the comparison with ignore_index never wraps
        if t2.dtype == np.int64 and t2.flags.c_contiguous:
            labels = t2
        else:
            labels = np.ascontiguousarray(spec.labels_as_int64(t2)[0])
        has_ignore = opts.ignore_index is not None
        ignore_index = int(opts.ignore_index) if has_ignore else 0
        active = labels != ignore_index if has_ignore else np.ones(n, bool)
        if weight is None and sample_weight is None:
            denominator = float(np.count_nonzero(active))
        else:
            w_y = np.ones(n) if weight is None else weight[np.where(active, labels, 0)]
            if sample_weight is not None:
                w_y = w_y * sample_weight
            denominator = float(w_y[active].sum(dtype=np.float64))
    else:
        probs = np.ascontiguousarray(t2, dtype=compute)
        denominator = float(n) if sample_weight is None else float(np.sum(sample_weight, dtype=np.float64))
    if opts.denominator is not None:
        denominator = float(np.asarray(opts.denominator))

    scale = 1.0
    if scale_mean and opts.reduction == "mean":
        scale = spec.reduction_scale(opts.reduction, denominator)
    entropy = (spec.xlogx(a + b), spec.xlogx(b)) if opts.normalize else (0.0, 0.0)  # read only with normalize
    softcap = 0.0 if opts.softcap is None else opts.softcap
    # params[9]: the target class carries no mass (q_y = 0): its logit is left out of the loss
    empty_target = float(spec.RowCoefficients.of(opts, valid_count).empty_target)
    params = np.array(
        [a, b, total_w, opts.z_loss, *entropy, float(opts.normalize), scale, softcap, empty_target], np.float64
    )
    has_sw = sample_weight is not None
    sw = _read_only(np.ascontiguousarray(sample_weight, np.float64)) if has_sw else _NO_SAMPLE_WEIGHT

    inplace = False
    if want_grad:
        grad = out2 if out2 is not None and _usable_out(out2, x, compute) else np.empty((n, k), compute)
        if not np.may_share_memory(grad, x):  # the usual case, settled by a cheap bounds test
            pass
        elif _same_memory(grad, x):
            inplace = True  # each row's logits are read before its gradient overwrites them
        else:  # partial overlap: go through a fresh buffer
            grad = np.empty((n, k), compute)
    else:
        grad = np.empty((n, 0), compute)  # never written
    per_element = np.empty(n, compute)
    small = n * k < _PARALLEL_MIN_ELEMENTS
    if n:
        if kind == "index":
            args = (
                _read_only(x),
                _read_only(labels),
                w,
                valid,
                has_w,
                mask is not None,
                ignore_index,
                has_ignore,
                params,
                sw,
                has_sw,
                want_grad,
                inplace,
                grad,
                per_element,
            )
            serial, threaded = _index_rows_serial, _index_rows
        else:
            args = (
                _read_only(x),
                _read_only(probs),
                w,
                valid,
                has_w,
                mask is not None,
                params,
                sw,
                has_sw,
                want_grad,
                inplace,
                grad,
                per_element,
            )
            serial, threaded = _prob_rows_serial, _prob_rows
        if small:
            serial(*args)
        else:
            threaded(*args, min(n, 4 * numba.get_num_threads()))
    if not want_grad:
        return per_element, denominator, None
    if out2 is not None and grad is not out2:
        np.copyto(out2, grad, casting="same_kind")
        grad = out2
    return per_element, denominator, grad


def plain_params(opts: Any, k: int) -> np.ndarray | None:
    """The plain kernels' row coefficients for K classes without weight or mask (``params`` of
    :func:`_index_row`; entry 7, the gradient's scale, is 1), or None when the target class carries no mass
    (ε = 1 with ``spread="others"``: the general kernel leaves its logit out)."""
    key = (opts.label_smoothing, opts.spread, opts.z_loss, opts.normalize, opts.softcap, k)
    params = _PLAIN_PARAMS.get(key)
    if params is None:
        coefficients = spec.RowCoefficients.of(opts, k)
        if coefficients.empty_target or opts.softcap is not None:
            return None
        a, b = coefficients.a, coefficients.b
        entropy = (spec.xlogx(a + b), spec.xlogx(b)) if opts.normalize else (0.0, 0.0)
        params = np.array([a, b, float(k), opts.z_loss, *entropy, float(opts.normalize), 1.0, 0.0, 0.0], np.float64)
        params.flags.writeable = False
        if len(_PLAIN_PARAMS) >= 256:
            _PLAIN_PARAMS.clear()
        _PLAIN_PARAMS[key] = params
    return params


_PLAIN_PARAMS: dict[tuple[Any, ...], np.ndarray] = {}


def plain_settings(params: np.ndarray, has_ignore: bool, count_scale: bool, reduction: str, empty: float) -> np.ndarray:
    """``params`` (the plain kernels' row coefficients) followed by the entries' settings: whether
    ``ignore_index`` applies; whether the gradient carries 1/(the rows counted) (else ``params[7]``); the
    reduction the entry computes into ``loss[N]`` (0 none, 1 sum, 2 mean: lsx.torch's short path); an empty
    mean's value. Read-only, like every caller's (one compiled specialisation)."""
    code = {"none": 0.0, "sum": 1.0, "mean": 2.0}[reduction]
    settings = np.concatenate((params, (float(has_ignore), float(count_scale), code, float(empty))))
    settings.flags.writeable = False
    return settings


def plain_rows(
    x: np.ndarray,
    labels: np.ndarray,
    params: np.ndarray,
    ignore_index: int | None,
    count_scale: bool,
    want_grad: bool,
    grad: np.ndarray,
    per_element: np.ndarray,
) -> int:
    """Run the plain kernel on C-contiguous (N, K) ``x`` and int64 ``labels`` (through the entries lsx.torch's
    short path calls, by address: one compiled kernel for every caller, hence the same bits): per-element
    losses into ``per_element``, the gradient (scaled by 1/count when ``count_scale``, else by ``params[7]``)
    into ``grad`` (which may be ``x``'s memory) when ``want_grad``. Returns the number of labels other than
    ``ignore_index``, or −1 (nothing written) when a label is outside [0, K) and not ``ignore_index``."""
    n, k = x.shape
    if not (x.flags.c_contiguous and labels.flags.c_contiguous and labels.dtype == np.int64 and labels.shape == (n,)):
        raise ValueError("plain_rows takes C-contiguous (N, K) logits and (N,) int64 labels")  # (read by address)
    has_ignore = ignore_index is not None  # (the spec keeps it within int64)
    ignore = int(ignore_index) if has_ignore else 0
    key = (params.tobytes(), has_ignore, bool(count_scale))
    settings = _PLAIN_SETTINGS_CACHE.get(key)
    if settings is None:
        if len(_PLAIN_SETTINGS_CACHE) >= 256:
            _PLAIN_SETTINGS_CACHE.clear()
        settings = _PLAIN_SETTINGS_CACHE[key] = plain_settings(params, has_ignore, count_scale, "none", 0.0)
    x_address, y_address = _addresses(x, labels)
    if n * k < _PARALLEL_MIN_ELEMENTS:
        return _plain_at(x_address, y_address, n, k, settings, ignore, want_grad, grad, per_element)
    chunks = min(n, 4 * numba.get_num_threads())
    return _plain_at_threaded(x_address, y_address, n, k, settings, ignore, want_grad, grad, per_element, chunks)


_PLAIN_SETTINGS_CACHE: dict[tuple[bytes, bool, bool], np.ndarray] = {}


def _plain(x, t2, opts, params, compute, want_grad, out2, scale_mean):
    """:func:`forward_backward` for the plain case (see :func:`plain_params`)."""
    n, k = x.shape
    labels = t2 if t2.dtype == np.int64 and t2.flags.c_contiguous else np.ascontiguousarray(spec.labels_as_int64(t2)[0])
    mean = scale_mean and opts.reduction == "mean"
    given = None if opts.denominator is None else float(np.asarray(opts.denominator))
    if given is not None and mean:
        params = params.copy()
        params[7] = spec.reduction_scale("mean", given)
    if want_grad:
        grad = out2 if out2 is not None and _usable_out(out2, x, compute) else np.empty((n, k), compute)
        if np.may_share_memory(grad, x) and not _same_memory(grad, x):  # partial overlap: a fresh buffer
            grad = np.empty((n, k), compute)
    else:
        grad = np.empty((n, 0), compute)  # never written
    per_element = np.empty(n, compute)
    count_scale = mean and given is None
    active = plain_rows(x, labels, params, opts.ignore_index, count_scale, want_grad, grad, per_element)
    if active < 0:
        spec.check_labels(labels, k, opts)
        raise AssertionError("the kernel found a label out of range that spec.check_labels accepts")
    denominator = float(active) if given is None else given
    if not want_grad:
        return per_element, denominator, None
    if out2 is not None and grad is not out2:
        np.copyto(out2, grad, casting="same_kind")
        grad = out2
    return per_element, denominator, grad


#: read-only ones and trues (no weight, no mask) per (K, dtype): the kernels only read them
_UNWEIGHTED: dict[tuple[int, type], tuple[np.ndarray, np.ndarray]] = {}


def _unweighted(k: int, compute: type) -> tuple[np.ndarray, np.ndarray]:
    cached = _UNWEIGHTED.get((k, compute))
    if cached is None:
        if len(_UNWEIGHTED) >= 64:
            _UNWEIGHTED.clear()
        cached = _UNWEIGHTED[(k, compute)] = (np.ones(k, compute), np.ones(k, np.bool_))
    return cached


def _same_memory(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.strides == b.strides and a.dtype == b.dtype and a.ctypes.data == b.ctypes.data


def _usable_out(out2: np.ndarray, x: np.ndarray, compute: type) -> bool:
    return (
        isinstance(out2, np.ndarray)
        and out2.shape == x.shape
        and out2.dtype == np.dtype(compute)
        and out2.flags.c_contiguous
        and out2.flags.writeable
    )


def _class_arrays(k: int, weight: np.ndarray | None, mask: np.ndarray | None, compute: type):
    """(w, valid, has_w, has_mask): the weights in the compute dtype with 0 on the masked classes (ones
    without weights), the valid classes, and the flags the kernels take."""
    has_mask = mask is not None
    has_w = weight is not None or has_mask
    w = np.ones(k, compute) if weight is None else np.asarray(weight).astype(compute)
    valid = np.ones(k, np.bool_) if mask is None else np.ascontiguousarray(mask, np.bool_)
    if has_mask:
        w = np.where(valid, w, 0).astype(compute)
    return w, valid, has_w, has_mask


def _row_inputs(n: int, k: int, labels: np.ndarray | None, probs: np.ndarray | None, compute: type):
    if probs is None:
        return _read_only(np.ascontiguousarray(labels, np.int64)), np.empty((n, 0), compute)
    return np.zeros(1, np.int64), _read_only(np.ascontiguousarray(probs, compute))


def _chunks(n: int, k: int) -> int:
    return 1 if n * k < _PARALLEL_MIN_ELEMENTS else min(n, 4 * numba.get_num_threads())


def statistics(
    x: np.ndarray,
    out: np.ndarray,
    *,
    labels: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    weight: np.ndarray | None = None,
    class_mask: np.ndarray | None = None,
    softcap: float | None = None,
    a: float = 1.0,
    b: float = 0.0,
    smoothing: bool = False,
    normalize: bool = False,
    offset: int = 0,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    exclude_target: bool = False,
) -> None:
    """Six float64 statistics per row of the (n, k) block ``x`` (the classes [offset, offset + k) of
    ``num_classes``), written into ``out`` (6, n), C-contiguous float64; each relative to the row's own maximum
    m over the valid classes (m = 0 when that maximum is not finite), on the soft-capped logits with ``softcap``.

    Labels (``labels`` (n,) int64, global class ids): 0 the maximum (−inf without a valid class); 1 Σ exp(x − m)
    over the valid classes; 2 x_y − m where this block owns the target y (NaN when y is masked); 3 w_y there;
    4 Σ w_c (x_c − m) over the valid classes with w_c ≠ 0 when ``smoothing``; 5 the ownership flag (0 not owned,
    1 owned, 2 owned on a masked class). Probabilities (``probs`` (n, k), q = a·t + b on the valid classes):
    0, 1 as above; 2 Σ w q; 3 Σ w q (x − m); 4 Σ w·xlogx(q) when ``normalize``, over the classes with
    w q ≠ 0; 5 1 where t puts mass on a masked class. ``weight`` (k,) and ``class_mask`` (k,) are the block's.
    ``exclude_target`` (labels, a target without mass: q_y = 0): statistic 4 leaves out the target class where
    this block owns it, so that it never reads x_y (which may be −inf).
    """
    if not AVAILABLE:
        raise ImportError("lsx.numpy._numba needs numba: pip install 'lsx[numba]'")
    n, k = x.shape
    compute = x.dtype.type
    w, valid, has_w, has_mask = _class_arrays(k, weight, class_mask, compute)
    y, t = _row_inputs(n, k, labels, probs, compute)
    has_ignore = ignore_index is not None
    params = np.array(
        [
            a, b, float(smoothing), float(normalize), softcap or 0.0, float(has_ignore), float(weight is not None),
            float(bool(exclude_target)),
        ],
        np.float64,
    )  # fmt: skip
    any_valid = bool(k) and bool(valid.any())
    if n:
        _statistics_rows(
            _read_only(x), y, t, w, valid, has_w, has_mask, any_valid, params,
            int(ignore_index) if has_ignore else 0, int(offset), int(k if num_classes is None else num_classes),
            out, _chunks(n, k),
        )  # fmt: skip


def gradient(
    x: np.ndarray,
    grad: np.ndarray,
    *,
    rows: np.ndarray,
    labels: np.ndarray | None = None,
    probs: np.ndarray | None = None,
    weight: np.ndarray | None = None,
    class_mask: np.ndarray | None = None,
    softcap: float | None = None,
    a: float = 1.0,
    b: float = 0.0,
    smoothing: bool = False,
    offset: int = 0,
    num_classes: int | None = None,
    ignore_index: int | None = None,
    nan_rows: np.ndarray | None = None,
) -> None:
    """The block's gradient from merged per-row factors, written into ``grad`` (``x``'s shape and dtype,
    C-contiguous; may be ``x`` itself). ``rows`` (3, n) float64: the maximum the statistics used, p_scale and
    row_scale. Labels: exp(x − m)·p_scale − row_scale·(b·w_c·[smoothing] + a·w_y·[c = y − offset]);
    probabilities: exp(x − m)·p_scale − row_scale·w_c·q_c; 0 on the masked classes, the whole row 0 for an
    ignored label, NaN (on the valid classes) for an invalid label, a label or probability mass on a masked
    class, or ``nan_rows``; times 1 − tanh²(x/c) with ``softcap``."""
    if not AVAILABLE:
        raise ImportError("lsx.numpy._numba needs numba: pip install 'lsx[numba]'")
    n, k = x.shape
    compute = x.dtype.type
    w, valid, has_w, has_mask = _class_arrays(k, weight, class_mask, compute)
    y, t = _row_inputs(n, k, labels, probs, compute)
    has_ignore = ignore_index is not None
    has_nan_rows = nan_rows is not None
    params = np.array(
        [a, b, float(bool(smoothing)), 0.0, softcap or 0.0, float(has_ignore), float(has_nan_rows)], np.float64
    )
    flags = np.ascontiguousarray(nan_rows, np.bool_) if has_nan_rows else np.zeros(1, np.bool_)
    if n and k:
        _gradient_rows(
            x, grad, y, t, w, valid, has_w, has_mask, params,
            int(ignore_index) if has_ignore else 0, int(offset), int(k if num_classes is None else num_classes),
            np.ascontiguousarray(rows, np.float64), flags, _chunks(n, k),
        )  # fmt: skip
