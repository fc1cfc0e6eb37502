"""The pure-NumPy engine: row statistics in NumPy, the per-row algebra from :mod:`lsx.spec`.

What runs when Numba is not installed, and the contract the Numba kernel (:mod:`lsx.numpy._numba`) follows:
:func:`forward_backward` takes (N, K) logits and returns the per-element losses, the mean's denominator and
the gradient of the per-element losses (unscaled). It computes only statistics relative to each row's
maximum m over the valid classes (log Σ exp(x − m), x_y − m, Σ w_c (x_c − m), or for probability targets
Σ w q, Σ w q (x − m) and Σ w·xlogx(q)) and leaves the loss formula to :func:`lsx.spec.label_row` and
:func:`lsx.spec.probability_row`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lsx import spec

__all__ = ["forward_backward"]


def forward_backward(
    x2: np.ndarray,
    t2: np.ndarray,
    kind: str,
    opts: spec.Options,
    weight: np.ndarray | None,
    mask: np.ndarray | None,
    compute: type,
    want_grad: bool,
    *,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, float, np.ndarray | None]:
    """Loss per row, the mean's denominator and the (unscaled) gradient for (N, K) logits ``x2``.

    ``t2``: labels (N,) of any integer dtype, already checked, for ``kind="index"``, or probabilities (N, K)
    for ``kind="probs"``; ``weight``: float64 (K,) or None; ``mask``: bool (K,) or None; ``compute``:
    np.float32 or np.float64, the accumulation dtype of every result. The inputs are never written.
    ``sample_weight``: float64 (N,) or None; it enters only the mean's denominator here (the caller multiplies
    the losses and gradient rows by it); ``opts.denominator``, when given, replaces that denominator.
    ``opts.softcap`` caps the logits (c·tanh(x/c), in ``compute``) and the gradient carries the chain factor.
    """
    n, k = x2.shape
    x = x2.astype(compute, copy=False)
    chain = None
    if opts.softcap is not None:
        cap = compute(opts.softcap)
        with np.errstate(invalid="ignore"):
            tanh = np.tanh(x / cap)
        x = cap * tanh  # ±inf become ±c
        chain = tanh  # becomes 1 − tanh², the derivative of c·tanh(x/c)
        np.multiply(chain, chain, out=chain)
        np.subtract(compute(1), chain, out=chain)
    valid_count = k if mask is None else int(mask.sum())
    # class weights with the masked classes at 0 (None: every class weighs 1)
    w = None
    if weight is not None or mask is not None:
        w = np.ones(k, compute) if weight is None else weight.astype(compute)
        if mask is not None:
            w = np.where(mask, w, 0).astype(compute)
    total_weight = valid_count if w is None else float(w.sum(dtype=np.float64))
    coefficients = spec.RowCoefficients.of(opts, valid_count, total_weight)

    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        # the row maximum over the valid classes (0 when it is not finite); masked classes are −inf
        x_soft = x if mask is None else np.where(mask, x, compute(-np.inf))
        raw_max = x_soft.max(axis=1)
        row_max = np.where(np.isfinite(raw_max), raw_max, 0).astype(compute)
        shifted = x_soft - row_max[:, None]  # a fresh (N, K) buffer: becomes exp(x − m), then the gradient

        if kind == "index":
            labels, _ = spec.labels_as_int64(t2)  # compare in int64: nothing wraps in a narrow label dtype
            active = np.ones(n, bool) if opts.ignore_index is None else labels != opts.ignore_index
            y = np.where(active, labels, 0).astype(np.intp)
            rows = np.arange(n)
            w_y = np.ones(n, compute) if w is None else w[y]
            # a target of weight 0 contributes nothing, even against a −inf logit (no 0·∞)
            x_y = np.where(w_y != 0, shifted[rows, y], 0).astype(compute)
            weighted_sum = compute(0)
            if coefficients.b != 0:
                # q_y = 0 (ε = 1, spread "others"): the target's logit stays out, even at −inf
                exclude = y if coefficients.empty_target else None
                weighted_sum = _weighted_sum(shifted, w, exclude)
            sw_y = w_y if sample_weight is None else w_y * sample_weight
            denominator = float(np.sum(sw_y, where=active, dtype=np.float64))
        else:
            active = np.ones(n, bool)
            q = (coefficients.a * t2.astype(compute, copy=False) + coefficients.b).astype(compute, copy=False)
            if mask is not None:
                q = np.where(mask, q, 0).astype(compute)
            wq = q if w is None else q * w
            # a class contributes wherever w_c·q_c ≠ 0, linearly: a NaN q_c makes the loss NaN, a negative one
            # counts, and one with w_c·q_c = 0 adds nothing even against x_c = −inf
            contributes = wq != 0
            target_mass = wq.sum(axis=1, dtype=compute)
            weighted_sum = np.sum(wq * shifted, axis=1, where=contributes, dtype=compute)
            weighted_xlogx = None
            if opts.normalize:
                terms = spec.xlogx(q, where=np.where, log=np.log)
                if w is not None:
                    terms = w * terms
                weighted_xlogx = np.sum(terms, axis=1, where=contributes, dtype=compute)
            denominator = float(n) if sample_weight is None else float(np.sum(sample_weight, dtype=np.float64))
        if opts.denominator is not None:
            denominator = float(np.asarray(opts.denominator))

        exp = np.exp(shifted, out=shifted)
        sum_exp = exp.sum(axis=1, dtype=compute)
        sum_exp = np.where(raw_max == np.inf, compute(np.nan), sum_exp)  # a +inf logit makes its row NaN
        log_sum_exp = np.log(sum_exp)

        if kind == "index":
            loss, coef = spec.label_row(
                coefficients,
                log_sum_exp=log_sum_exp,
                row_max=row_max,
                w_y=w_y,
                x_y=x_y,
                weighted_sum=weighted_sum,
                where=np.where,
                log=np.log,
                target_excluded=coefficients.empty_target,
            )
        else:
            loss, coef = spec.probability_row(
                coefficients,
                log_sum_exp=log_sum_exp,
                row_max=row_max,
                target_mass=target_mass,
                weighted_sum=weighted_sum,
                weighted_xlogx=weighted_xlogx,
            )
        per_element = np.where(active, np.broadcast_to(loss, (n,)), 0).astype(compute)
        if not want_grad:
            return per_element, denominator, None

        # ∂loss/∂x_c = coef · p_c − w_c q_c, written over exp(x − m)
        grad = exp
        grad *= (np.broadcast_to(coef, (n,)) / sum_exp).astype(compute)[:, None]
        if kind == "index":
            if coefficients.b != 0:
                grad -= compute(coefficients.b) if w is None else compute(coefficients.b) * w
            if coefficients.a != 0:
                grad[rows, y] -= compute(coefficients.a) * w_y
        else:
            grad -= wq
        if chain is not None:
            grad *= chain
    if mask is not None:
        grad[:, ~mask] = 0
    grad[~active] = 0
    return per_element, denominator, grad


def _weighted_sum(shifted: np.ndarray, w: np.ndarray | None, exclude: np.ndarray | None = None) -> Any:
    """Σ_c w_c (x_c − m) over the valid classes with w_c ≠ 0 (a weight-0 class at −inf adds nothing), and
    other than each row's class ``exclude[i]`` when given."""
    if exclude is not None:
        keep = np.ones(shifted.shape, bool) if w is None else np.broadcast_to(w != 0, shifted.shape).copy()
        keep[np.arange(shifted.shape[0]), exclude] = False
        terms = shifted if w is None else shifted * w
        return np.sum(terms, axis=1, where=keep, dtype=shifted.dtype)
    if w is None:
        return shifted.sum(axis=1, dtype=shifted.dtype)
    zero = w == 0
    if zero.any():
        return np.sum(shifted * w, axis=1, where=~zero, dtype=shifted.dtype)
    return shifted @ w
