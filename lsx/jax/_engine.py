"""The traced part of :mod:`lsx.jax`: per-element loss with a closed-form ``custom_vjp``, and the reduction.

Everything here takes validated inputs with the classes on the last axis. Static options travel in
:class:`Config` (hashable, so one compiled program per option set); arrays are traced. Nothing here looks at
array values on the host, so the same program runs on CPU, GPU and TPU.

Integer labels never become a one-hot tensor: with q = a·t + b on the valid classes,

    Σ_c w_c q_c (L − x_c) = a·w_y·(L − x_y) + b·(W·L − Σ_c w_c x_c),      W = Σ_c w_c,

so the forward pass is a log-sum-exp, a gather and a weighted row sum. The backward pass recomputes
p = exp(x − L) from the saved log-sum-exp (residuals: logits, target, LSE) and writes the gradient in one
elementwise pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp

from lsx import spec


@dataclass(frozen=True)
class Config:
    kind: str  # "index" or "probs"
    label_smoothing: float
    spread: str
    z_loss: float
    normalize: bool
    ignore_index: int | None
    reduction: str
    empty_mean: str
    valid_count: int | None  # None when class_mask is traced: counted on the device
    compute: str  # accumulation dtype: "float64" for float64 logits, else "float32"


def _scaled(coefficient, term):
    """coefficient·term, but exactly 0 where the coefficient is 0 (so that 0·∞ never happens)."""
    if isinstance(coefficient, float):
        return coefficient * term if coefficient != 0 else jnp.zeros_like(term)
    return jnp.where(coefficient != 0, coefficient * term, 0)


def _xlogx(q):
    """q·log q with 0·log 0 = 0."""
    if isinstance(q, float):
        return 0.0 if q <= 0 else q * math.log(q)
    return jnp.where(q > 0, q * jnp.log(jnp.where(q > 0, q, 1)), 0)


def _coefficients(cfg: Config, mask):
    """(a, b) with q = a·t + b: Python floats, or device scalars when the class mask is traced."""
    smoothing = spec.Options(label_smoothing=cfg.label_smoothing, spread=cfg.spread)
    if cfg.valid_count is not None:
        return spec.smoothing_coefficients(smoothing, cfg.valid_count)
    return spec.smoothing_coefficients(smoothing, jnp.sum(mask).astype(cfg.compute))


def _effective_weight(cfg: Config, weight, mask):
    """Class weights with masked classes at 0; None when every class weighs 1."""
    if weight is None and mask is None:
        return None
    if weight is None:
        return mask.astype(cfg.compute)
    return weight if mask is None else jnp.where(mask, weight, 0)


def _log_sum_exp(cfg: Config, x, mask):
    x = x.astype(cfg.compute)
    if mask is not None:
        x = jnp.where(mask, x, -jnp.inf)
    shift = jnp.max(x, axis=-1)
    shift = jnp.where(jnp.isfinite(shift), shift, 0)
    return shift + jnp.log(jnp.sum(jnp.exp(x - shift[..., None]), axis=-1))


def _labels(cfg: Config, target, num_classes, mask):
    """(active, label clipped into range, bad): bad labels (out of range or on a masked class) give NaN."""
    active = jnp.ones(target.shape, bool) if cfg.ignore_index is None else target != cfg.ignore_index
    bad = active & ((target < 0) | (target >= num_classes))
    label = jnp.clip(jnp.where(active, target, 0), 0, num_classes - 1).astype(jnp.int32)
    if mask is not None:
        bad = bad | (active & ~mask[label])
    return active, label, bad


# ----------------------------------------------------------------------------------------------------------
# Per-element loss with its closed-form gradient
# ----------------------------------------------------------------------------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def per_element(cfg: Config, x, target, weight, mask):
    return _forward(cfg, x, target, weight, mask)[0]


def _forward(cfg: Config, x, target, weight, mask):
    num_classes = x.shape[-1]
    lse = _log_sum_exp(cfg, x, mask)
    a, b = _coefficients(cfg, mask)
    w = _effective_weight(cfg, weight, mask)
    x_linear = x.astype(cfg.compute) if mask is None else jnp.where(mask, x.astype(cfg.compute), 0)
    if cfg.kind == "index":
        active, label, bad = _labels(cfg, target, num_classes, mask)
        x_y = jnp.take_along_axis(x, label[..., None], axis=-1)[..., 0].astype(cfg.compute)
        w_y = jnp.ones_like(lse) if w is None else w[label]
        total_weight = float(num_classes) if w is None else jnp.sum(w)
        weighted_sum = jnp.sum(x_linear if w is None else x_linear * w, axis=-1)
        loss = _scaled(a, w_y * (lse - x_y)) + _scaled(b, total_weight * lse - weighted_sum)
        if cfg.z_loss:
            loss = loss + cfg.z_loss * w_y * lse * lse
        if cfg.normalize:
            loss = loss + (w_y * _xlogx(a + b) + _xlogx(b) * (total_weight - w_y))
        loss = jnp.where(active, loss, 0)
        loss = jnp.where(bad, jnp.nan, loss)
    else:
        q = a * target.astype(cfg.compute) + b
        if mask is not None:
            q = jnp.where(mask, q, 0)
        wq = q if w is None else q * w
        loss = jnp.sum(jnp.where(wq > 0, wq * (lse[..., None] - x.astype(cfg.compute)), 0), axis=-1)
        if cfg.z_loss:
            loss = loss + cfg.z_loss * lse * lse
        if cfg.normalize:
            loss = loss + jnp.sum(_xlogx(q) if w is None else w * _xlogx(q), axis=-1)
    return loss, lse


def _per_element_fwd(cfg: Config, x, target, weight, mask):
    loss, lse = _forward(cfg, x, target, weight, mask)
    return loss, (x, target, weight, mask, lse)


def _per_element_bwd(cfg: Config, residuals, cotangent):
    x, target, weight, mask, lse = residuals
    num_classes = x.shape[-1]
    a, b = _coefficients(cfg, mask)
    w = _effective_weight(cfg, weight, mask)
    g = cotangent.astype(cfg.compute)
    x32 = x.astype(cfg.compute)
    p = jnp.exp((x32 if mask is None else jnp.where(mask, x32, -jnp.inf)) - lse[..., None])
    classes = jnp.arange(num_classes, dtype=jnp.int32)
    weight_bar = target_bar = None

    if cfg.kind == "index":
        active, label, bad = _labels(cfg, target, num_classes, mask)
        g = jnp.where(active, g, 0)
        w_y = jnp.ones_like(lse) if w is None else w[label]
        total_weight = jnp.sum(w) if w is not None else float(num_classes)
        is_label = classes == label[..., None]
        row = g * (a * w_y + b * total_weight + 2 * cfg.z_loss * w_y * lse)
        spread = b if w is None else b * w  # b·w_c on every valid class
        grad = row[..., None] * p - g[..., None] * (spread + jnp.where(is_label, a * w_y[..., None], 0))
        grad = jnp.where(bad[..., None], jnp.nan, grad)
        if weight is not None:
            weight_bar = _index_weight_grad(cfg, x32, lse, g, label, bad, a, b, mask)
    else:
        q = a * target.astype(cfg.compute) + b
        if mask is not None:
            q = jnp.where(mask, q, 0)
        wq = q if w is None else q * w
        row = g * (jnp.sum(wq, axis=-1) + 2 * cfg.z_loss * lse)
        grad = row[..., None] * p - g[..., None] * wq
        # ∂/∂t_c = a·w_c·[(L − x_c) + normalize·(log q_c + 1)], 0 where q_c = 0
        nll = jnp.where(q > 0, lse[..., None] - x32, 0)
        if cfg.normalize:
            nll = nll + jnp.where(q > 0, jnp.log(jnp.where(q > 0, q, 1)) + 1, 0)
        target_bar = (g[..., None] * _scaled(a, nll if w is None else w * nll)).astype(target.dtype)
        if weight is not None:
            per_class = jnp.where(q > 0, q * (lse[..., None] - x32), 0)
            if cfg.normalize:
                per_class = per_class + _xlogx(q)
            weight_bar = jnp.sum(g[..., None] * per_class, axis=tuple(range(x.ndim - 1)))
            if mask is not None:
                weight_bar = jnp.where(mask, weight_bar, 0)

    if mask is not None:
        grad = jnp.where(mask, grad, 0)
    if weight_bar is not None:
        weight_bar = weight_bar.astype(weight.dtype)
    return grad.astype(x.dtype), target_bar, weight_bar, None


def _index_weight_grad(cfg: Config, x32, lse, g, label, bad, a, b, mask):
    """∂/∂w_c of Σ_i g_i·loss_i for integer labels: Σ_i g_i [q_ic (L_i − x_ic) + s·[y_i=c]·L_i² + normalize·q_ic log q_ic]."""
    num_classes = x32.shape[-1]
    rows = tuple(range(x32.ndim - 1))
    g = jnp.where(bad, jnp.nan, g)
    x_y = jnp.take_along_axis(x32, label[..., None], axis=-1)[..., 0]
    on_label = _scaled(a, g * (lse - x_y)) + cfg.z_loss * g * lse * lse
    if cfg.normalize:
        on_label = on_label + g * (_xlogx(a + b) - _xlogx(b))
    bar = jnp.zeros(num_classes, cfg.compute).at[label.reshape(-1)].add(on_label.reshape(-1))
    x_linear = x32 if mask is None else jnp.where(mask, x32, 0)
    bar = bar + _scaled(b, jnp.sum(g * lse) - jnp.sum(g[..., None] * x_linear, axis=rows))
    if cfg.normalize:
        bar = bar + jnp.sum(g) * _xlogx(b)
    return bar if mask is None else jnp.where(mask, bar, 0)


per_element.defvjp(_per_element_fwd, _per_element_bwd)


# ----------------------------------------------------------------------------------------------------------
# Reduction
# ----------------------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(0,))
def loss(cfg: Config, x, target, weight, mask):
    """The reduced loss in the logits' dtype; ``x`` and a probability ``target`` have the classes last."""
    weight = None if weight is None else weight.astype(cfg.compute)
    per = per_element(cfg, x, target, weight, mask)
    if cfg.reduction == "none":
        return per.astype(x.dtype)
    total = jnp.sum(per)
    if cfg.reduction == "sum":
        return total.astype(x.dtype)
    if cfg.kind == "index":
        active, label, _ = _labels(cfg, target, x.shape[-1], mask)
        w = _effective_weight(cfg, weight, mask)
        w_y = jnp.ones(label.shape, cfg.compute) if w is None else w[label]
        denominator = jnp.sum(jnp.where(active, w_y, 0))
    else:
        denominator = jnp.asarray(per.size, cfg.compute)
    nonempty = denominator > 0
    # an empty mean has zero gradient: the scale is 0 there, and the NaN/0 comes from a constant
    mean = total * jnp.where(nonempty, 1 / jnp.where(nonempty, denominator, 1), 0)
    empty = jnp.nan if cfg.empty_mean == "nan" else 0.0
    return jnp.where(nonempty, mean, empty).astype(x.dtype)
