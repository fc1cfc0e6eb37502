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
_BLOCK = 2048  # partial sums in the compute dtype, accumulated across blocks in float64
_LOOP_FLAGS = {"nsz", "arcp", "contract", "reassoc"}
_MAX_FLAGS = {"nnan", "nsz", "reassoc"}
_EXP_FLAGS = {"contract"}  # no reassociation: Cody–Waite needs its operations in order

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

    def _cap(v, c, inv_c):  # pragma: no cover - replaced by the overload below inside Numba
        return c * math.tanh(v * inv_c)

    @overload(_cap, inline="always")
    def _cap_impl(v, c, inv_c):
        """c·tanh(v/c) in ``v``'s dtype from the vectorisable :func:`_exp`: tanh|u| = (1 − e^{−2|u|}) /
        (1 + e^{−2|u|}) above a threshold, and tanh's odd Taylor polynomial below it (no cancellation there):
        float32 in float32 (|u| < 0.5, through u^15: truncation under 1e-8), float64 in float64 (|u| < 0.01,
        through u^7: under 1e-15). ±inf give ±c and NaN stays NaN. Callers use ``error_model="numpy"`` (a
        Python-style zero-division check would keep the loops from vectorising)."""
        if v == types.float32:

            def cap32(v, c, inv_c):
                u = v * np.float32(inv_c)
                au = abs(u)
                e = _exp(np.float32(-2.0) * au)
                large = (np.float32(1.0) - e) / (np.float32(1.0) + e)
                u2 = au * au
                p = np.float32(-929569.0 / 638512875.0)
                p = p * u2 + np.float32(21844.0 / 6081075.0)
                p = p * u2 + np.float32(-1382.0 / 155925.0)
                p = p * u2 + np.float32(62.0 / 2835.0)
                p = p * u2 + np.float32(-17.0 / 315.0)
                p = p * u2 + np.float32(2.0 / 15.0)
                p = p * u2 + np.float32(-1.0 / 3.0)
                small = au + au * (u2 * p)
                t = _select(au < np.float32(0.5), small, large)
                t = _select(u >= np.float32(0.0), t, -t)
                return np.float32(c) * t

            return cap32
        if v == types.float64:

            def cap64(v, c, inv_c):
                u = v * inv_c
                au = abs(u)
                e = _exp(-2.0 * au)
                large = (1.0 - e) / (1.0 + e)
                u2 = au * au
                small = au * (1.0 - u2 * (1.0 / 3.0 - u2 * (2.0 / 15.0 - u2 * (17.0 / 315.0))))
                t = _select(au < 0.01, small, large)
                t = _select(u >= 0.0, t, -t)
                return c * t

            return cap64
        return None

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True, error_model="numpy")
    def _cap_scalar(v, c):
        """:func:`_cap` for one value (the label's logit, the probability rows' first sweep)."""
        return _cap(v, c, 1.0 / c)

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

    # Soft-capped blocks: each logit is capped as it is read; the stored copy is the capped logit (pass 3 reads
    # it back, recomputes exp(x' − m) and applies the chain factor 1 − (x'/c)², in place too)
    @numba.njit(fastmath=_LOOP_FLAGS, inline="always", error_model="numpy")
    def _block_cap_store(xs, ds, ws, vs, mt, c, inv_c):
        zero = mt - mt
        sum_e = zero
        sum_x = zero
        for j in range(xs.shape[0]):
            v = _cap(xs[j], c, inv_c)
            d = v - mt
            sum_e += _exp(d) if vs[j] else zero
            sum_x += ws[j] * d if ws[j] != zero else zero
            ds[j] = v
        return sum_e, sum_x

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True, error_model="numpy")
    def _cap_pass(xr, dst, w, valid, m, c, mode):
        """:func:`_exp_pass` on the capped logits; modes 1 and 2 store the capped logits (not exp) in ``dst``.

        Mode 0 stores them in a one-block scratch buffer: the same arithmetic as the other modes (a sum-only loop
        would let LLVM fuse c·tanh − m into one rounding), so ``loss`` and ``loss_and_grad`` agree exactly."""
        k = xr.shape[0]
        scratch = np.empty(min(k, _BLOCK) if mode == 0 else 0, xr.dtype)
        mt = _to_dtype_of(m, xr)
        inv_c = 1.0 / c
        sum_e = 0.0
        sum_x = 0.0
        for start in range(0, k, _BLOCK):
            stop = min(start + _BLOCK, k)
            if mode == 0:
                block_e, block_x = _block_cap_store(
                    xr[start:stop], scratch[: stop - start], w[start:stop], valid[start:stop], mt, c, inv_c
                )
            elif mode == 1:
                block_e, block_x = _block_cap_store(
                    xr[start:stop], dst[start:stop], w[start:stop], valid[start:stop], mt, c, inv_c
                )
            else:
                ds = dst[start:stop]
                block_e, block_x = _block_cap_store(ds, ds, w[start:stop], valid[start:stop], mt, c, inv_c)
            sum_e += block_e
            sum_x += block_x
        return sum_e, sum_x

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True, error_model="numpy")
    def _cap_grad(dst, w, valid, mt, coef, bs, inv_ct):
        """Pass 3 under soft-capping: ``dst`` holds the capped logits x'; writes (coef·exp(x' − m) − bs·w)·(1 − (x'/c)²)
        on the valid classes, 0 on the others."""
        zero = mt - mt
        one = zero + _scalar_like(1.0, mt)
        for j in range(dst.shape[0]):
            v = dst[j]
            e = _exp(v - mt)
            t = v * inv_ct
            g = (e * coef - bs * w[j]) * (one - t * t)
            dst[j] = g if valid[j] else zero

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True, error_model="numpy")
    def _cap_prob_grad(dst, tr, w, valid, has_w, has_mask, mt, coef, st, at, bt, inv_ct):
        zero = mt - mt
        one = zero + _scalar_like(1.0, mt)
        for j in range(dst.shape[0]):
            ok = valid[j] if has_mask else True
            wq = (at * tr[j] + bt) * (w[j] if has_w else one)
            v = dst[j]
            t = v * inv_ct
            g = (_exp(v - mt) * coef - st * wq) * (one - t * t)
            dst[j] = g if ok else zero

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True)
    def _index_row(
        i, x, y, w, valid, has_w, has_mask, ignore_index, has_ignore, params, sw, has_sw, want_grad, inplace, out, loss
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
            sum_e, sum_x = _cap_pass(xr, dst, w, valid, m, softcap, mode)
        else:
            x_y_t = xr[label]
            x_y = np.float64(x_y_t)
            m = _row_max(xr, valid, has_mask)
            sum_e, sum_x = _exp_pass(xr, dst, w, valid, not has_w, m, mode)
        w_y = np.float64(w[label]) if has_w else 1.0
        lse_shifted = math.log(sum_e)
        lse = m + lse_shifted
        # a term whose coefficient is 0 adds exactly 0: a target of weight 0 at x_y = −inf, a z-loss of 0
        # against an overflowing L² (float64 logits above ~1.3e154)
        value = 0.0
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
            inv_ct = _to_dtype_of(1.0 / softcap, x)
            _cap_grad(dst, w, valid, _to_dtype_of(m, x), coef, bs, inv_ct)
            t_y = x_y_t * inv_ct
            dst[label] -= _to_dtype_of(scale * a * w_y, x) * (_to_dtype_of(1.0, x) - t_y * t_y)
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
        x, y, w, valid, has_w, has_mask, ignore_index, has_ignore, params, sw, has_sw, want_grad, inplace, out, loss
    ):
        for i in prange(x.shape[0]):
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
            )

    # the same loop without threads, for inputs too small to pay for starting them
    @numba.njit(cache=True)
    def _index_rows_serial(
        x, y, w, valid, has_w, has_mask, ignore_index, has_ignore, params, sw, has_sw, want_grad, inplace, out, loss
    ):
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
            )

    @numba.njit(fastmath=_LOOP_FLAGS, cache=True)
    def _prob_row(i, x, t, w, valid, has_w, has_mask, params, sw, has_sw, want_grad, inplace, out, loss):
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
            sum_e, _ = _cap_pass(xr, dst, w, valid, m, softcap, mode)
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
            _cap_prob_grad(dst, tr, w, valid, has_w, has_mask, mt, coef, st, at, bt, _to_dtype_of(1.0 / softcap, x))
            return
        for c in range(k):
            ok = valid[c] if has_mask else True
            wq = (at * tr[c] + bt) * (w[c] if has_w else _to_dtype_of(1.0, x))
            dst[c] = (dst[c] * coef - st * wq) if ok else zero

    @numba.njit(cache=True, parallel=True)
    def _prob_rows(x, t, w, valid, has_w, has_mask, params, sw, has_sw, want_grad, inplace, out, loss):
        for i in prange(x.shape[0]):
            _prob_row(i, x, t, w, valid, has_w, has_mask, params, sw, has_sw, want_grad, inplace, out, loss)

    @numba.njit(cache=True)
    def _prob_rows_serial(x, t, w, valid, has_w, has_mask, params, sw, has_sw, want_grad, inplace, out, loss):
        for i in range(x.shape[0]):
            _prob_row(i, x, t, w, valid, has_w, has_mask, params, sw, has_sw, want_grad, inplace, out, loss)


def _xlogx(q: float) -> float:
    from lsx import spec

    return spec.xlogx(q)


def _read_only(array: np.ndarray) -> np.ndarray:
    """A read-only view: the kernels only read their inputs, so every input reaches them typed read-only (one
    compiled specialisation, whether the caller's array is writeable, read-only, a memmap or a buffer)."""
    view = array.view()
    view.flags.writeable = False
    return view


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
    from lsx import spec

    n, k = x2.shape
    x = np.ascontiguousarray(x2, dtype=compute)
    valid_count = k if mask is None else int(mask.sum())
    a, b = spec.smoothing_coefficients(opts, valid_count)
    has_w = weight is not None or mask is not None
    w = np.ones(k, compute) if weight is None else weight.astype(compute)
    if mask is not None:
        w = np.where(mask, w, 0).astype(compute)  # 0 on the masked classes (the masked blocks rely on it)
    valid = np.ones(k, np.bool_) if mask is None else np.array(mask, np.bool_)
    total_w = float(valid_count) if weight is None else float(np.where(valid, weight, 0).sum())

    if kind == "index":
        # int64 whatever the caller's dtype: the comparison with ignore_index never wraps
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
    params = np.array(
        [a, b, total_w, opts.z_loss, _xlogx(a + b), _xlogx(b), float(opts.normalize), scale, 0.0], np.float64
    )
    if opts.softcap is not None:
        params[8] = opts.softcap
    has_sw = sample_weight is not None
    sw = np.ascontiguousarray(sample_weight, np.float64) if has_sw else np.ones(1)

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
            (_index_rows_serial if small else _index_rows)(
                _read_only(x),
                _read_only(labels),
                w,
                valid,
                has_w,
                mask is not None,
                ignore_index,
                has_ignore,
                params,
                _read_only(sw),
                has_sw,
                want_grad,
                inplace,
                grad,
                per_element,
            )
        else:
            (_prob_rows_serial if small else _prob_rows)(
                _read_only(x),
                _read_only(probs),
                w,
                valid,
                has_w,
                mask is not None,
                params,
                _read_only(sw),
                has_sw,
                want_grad,
                inplace,
                grad,
                per_element,
            )
    if not want_grad:
        return per_element, denominator, None
    if out2 is not None and grad is not out2:
        np.copyto(out2, grad, casting="same_kind")
        grad = out2
    return per_element, denominator, grad


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
