"""The traced part of :mod:`lsx.jax`: per-element loss with a closed-form ``custom_vjp``, and the reduction.

Everything here takes validated inputs with the classes on the last axis. Static options travel in
:class:`Config` (hashable, so one compiled program per option set); arrays are traced. Nothing here looks at
array values on the host, so the same program runs on CPU, GPU and TPU.

The engine only reduces each row of logits to statistics relative to the row maximum m (over the valid
classes): log Σ exp(x − m), and for integer labels x_y − m and Σ_c w_c (x_c − m), for probability targets
Σ w q, Σ w q (x − m) and Σ w·xlogx(q). The loss and the gradient's row coefficient come from
:func:`lsx.spec.label_row` / :func:`lsx.spec.probability_row`, the mean from :func:`lsx.spec.reduce_total`.
Integer labels never become a one-hot tensor: the forward pass is a log-sum-exp, a gather and a weighted
row sum. The backward pass recomputes p = exp(x − L) from the saved log-sum-exp L (residuals: logits,
target, L) and writes the gradient ``coef · p − w∘q`` in one elementwise pass.

Values that cannot be checked on the host give NaN, never a silent finite number: an out-of-range label or a
label on a masked class (that element), probability mass on a masked class (that element), and a negative
or non-finite weight (everything).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from lsx import spec

_OPS = dict(where=jnp.where, log=jnp.log)


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
    softcap: float | None = None  # c: the logits become c·tanh(x/c) before anything else

    def row_coefficients(self, mask, weight) -> spec.RowCoefficients:
        """a, b, s and W = Σ_c w_c over the valid classes (device scalars where the mask or weight is traced)."""
        options = spec.Options(
            label_smoothing=self.label_smoothing, spread=self.spread, z_loss=self.z_loss, normalize=self.normalize
        )
        valid = self.valid_count if self.valid_count is not None else jnp.sum(mask).astype(self.compute)
        return spec.RowCoefficients.of(options, valid, None if weight is None else jnp.sum(weight))


def _effective_weight(weight, mask):
    """Class weights with masked classes at 0; None when no weight is given."""
    if weight is None or mask is None:
        return weight
    return jnp.where(mask, weight, 0)


def _checked_weight(weight):
    """A traced weight with a negative or non-finite entry makes every result NaN (concrete ones raise)."""
    fine = jnp.all(jnp.isfinite(weight) & (weight >= 0))
    return weight + jnp.where(fine, 0, jnp.nan).astype(weight.dtype)


def _capped_logits(cfg: Config, x, mask):
    """(logits in the compute dtype, soft-capped when ``cfg.softcap`` is set, with −inf on masked classes;
    tanh(x/c), or None without a cap). Capping comes first, so ±inf become ±c and masked classes stay out."""
    x = x.astype(cfg.compute)
    tanh = None
    if cfg.softcap is not None:
        tanh = jnp.tanh(x / cfg.softcap)
        x = cfg.softcap * tanh
    return (x if mask is None else jnp.where(mask, x, -jnp.inf)), tanh


def _valid_logits(cfg: Config, x, mask):
    return _capped_logits(cfg, x, mask)[0]


def _statistics(cfg: Config, x, mask):
    """(logits in the compute dtype with −inf on masked classes; row max m; log Σ exp(x − m)).

    m is 0 for a row whose valid logits are all −inf; a +inf (or NaN) maximum is kept, so that such a row's
    statistics, loss and gradient are NaN (as the reference and ``F.cross_entropy``)."""
    xc = _valid_logits(cfg, x, mask)
    row_max = jnp.max(xc, axis=-1)
    row_max = jnp.where(row_max == -jnp.inf, 0, row_max)
    return xc, row_max, jnp.log(jnp.sum(jnp.exp(xc - row_max[..., None]), axis=-1))


def _weighted_shifted_sum(terms, xc, row_max, total):
    """Σ_c v_c (x_c − m) over the classes where ``terms`` holds v_c (0 elsewhere; Σ_c v_c = ``total``).

    Taken as Σ_c v_c x_c − total·m: a reduction of the logits alone, which XLA fuses into its own pass,
    where a per-row shift inside it materialises a logits-sized broadcast."""
    return jnp.sum(terms(xc), axis=-1) - total * row_max


def _fits(value: int, dtype) -> bool:
    info = jnp.iinfo(dtype)
    return int(info.min) <= value <= int(info.max)


def _labels(cfg: Config, target, num_classes: int, mask):
    """(active, label as int32 in [0, K), bad): bad labels (out of range or on a masked class) give NaN.

    Comparisons happen in the labels' own dtype with constants that fit it, so nothing wraps: a uint8 label
    is never equal to ignore_index=-100 or -1, and no int8 label reaches K = 200."""
    dtype = target.dtype
    if cfg.ignore_index is None or not _fits(cfg.ignore_index, dtype):
        active = jnp.ones(target.shape, bool)
    else:
        active = target != np.asarray(cfg.ignore_index, dtype)
    outside = jnp.zeros(target.shape, bool)
    if jnp.issubdtype(dtype, jnp.signedinteger):
        outside = outside | (target < np.asarray(0, dtype))
    if _fits(num_classes, dtype):
        outside = outside | (target >= np.asarray(num_classes, dtype))
    bad = active & outside
    label = jnp.where(active & ~outside, target, np.asarray(0, dtype)).astype(jnp.int32)
    if mask is not None:
        bad = bad | (active & ~mask[label])
    return active, label, bad


def _without_target(terms, others, d):
    return jnp.where(others, terms(d), 0)


def _masked_mass(target, mask):
    """Elements whose probability target puts anything (NaN included) on a masked class."""
    return jnp.any(~mask & (target != 0), axis=-1)


def _probability_terms(cfg: Config, k: spec.RowCoefficients, target, w, mask):
    """(q, w∘q, where w∘q ≠ 0) for a probability target, q = a·t + b on the valid classes, 0 elsewhere."""
    q = k.a * target.astype(cfg.compute) + k.b
    if mask is not None:
        q = jnp.where(mask, q, 0)
    wq = q if w is None else w * q
    return q, wq, wq != 0


# ----------------------------------------------------------------------------------------------------------
# Per-element loss with its closed-form gradient
# ----------------------------------------------------------------------------------------------------------
@partial(jax.custom_vjp, nondiff_argnums=(0,))
def per_element(cfg: Config, x, target, weight, mask):
    return _forward(cfg, x, target, weight, mask)[0]


def _forward(cfg: Config, x, target, weight, mask):
    num_classes = x.shape[-1]
    w = _effective_weight(weight, mask)
    k = cfg.row_coefficients(mask, w)
    xc, row_max, log_sum_exp = _statistics(cfg, x, mask)
    if cfg.kind == "index":
        active, label, bad = _labels(cfg, target, num_classes, mask)
        source = x if cfg.softcap is None else xc  # the (capped) logits; a masked label is NaN anyway
        x_y = jnp.take_along_axis(source, label[..., None], axis=-1)[..., 0].astype(cfg.compute) - row_max
        w_y = 1.0 if w is None else w[label]
        weighted_sum = 0.0
        if not (isinstance(k.b, float) and k.b == 0):  # only read when b ≠ 0
            if w is None:
                terms = (lambda d: d) if mask is None else (lambda d: jnp.where(mask, d, 0))
            else:
                terms = lambda d: jnp.where(w != 0, w * d, 0)
            total = k.total_weight
            if k.empty_target:  # q_y = 0: the target's logit stays out of the sum, even at −inf
                others = jnp.arange(num_classes, dtype=jnp.int32) != label[..., None]
                terms = partial(_without_target, terms, others)
                total = total - w_y
            weighted_sum = _weighted_shifted_sum(terms, xc, row_max, total)
        loss, _ = spec.label_row(
            k,
            log_sum_exp=log_sum_exp,
            row_max=row_max,
            w_y=w_y,
            x_y=x_y,
            weighted_sum=weighted_sum,
            target_excluded=k.empty_target,
            **_OPS,
        )
        loss = jnp.where(bad, jnp.nan, jnp.where(active, loss, 0))
    else:
        q, wq, contributes = _probability_terms(cfg, k, target, w, mask)
        weighted_xlogx = None
        if cfg.normalize:
            entropy_terms = spec.xlogx(q, **_OPS) if w is None else w * spec.xlogx(q, **_OPS)
            weighted_xlogx = jnp.sum(jnp.where(contributes, entropy_terms, 0), axis=-1)
        target_mass = jnp.sum(wq, axis=-1)
        loss, _ = spec.probability_row(
            k,
            log_sum_exp=log_sum_exp,
            row_max=row_max,
            target_mass=target_mass,
            weighted_sum=_weighted_shifted_sum(lambda v: jnp.where(contributes, wq * v, 0), xc, row_max, target_mass),
            weighted_xlogx=weighted_xlogx,
        )
        if mask is not None:
            loss = jnp.where(_masked_mass(target, mask), jnp.nan, loss)
    return loss, row_max + log_sum_exp


def _per_element_fwd(cfg: Config, x, target, weight, mask):
    loss, lse = _forward(cfg, x, target, weight, mask)
    return loss, (x, target, weight, mask, lse)


def _per_element_bwd(cfg: Config, residuals, cotangent):
    x, target, weight, mask, lse = residuals
    num_classes = x.shape[-1]
    w = _effective_weight(weight, mask)
    k = cfg.row_coefficients(mask, w)
    g = cotangent.astype(cfg.compute)
    xc, tanh = _capped_logits(cfg, x, mask)
    p = jnp.exp(xc - lse[..., None])
    weight_bar = target_bar = None

    # the row coefficient from the saved L alone: the statistics relative to a maximum of 0 (L itself)
    if cfg.kind == "index":
        active, label, bad = _labels(cfg, target, num_classes, mask)
        g = jnp.where(active, g, 0)
        w_y = 1.0 if w is None else w[label]
        _, coef = spec.label_row(k, log_sum_exp=lse, row_max=0.0, w_y=w_y, x_y=0.0, weighted_sum=0.0, **_OPS)
        spread = k.b if w is None else k.b * w  # w_c q_c = b·w_c + [c = y]·a·w_y
        a_w_y = k.a * w_y if w is None else (k.a * w_y)[..., None]
        on_label = jnp.where(jnp.arange(num_classes, dtype=jnp.int32) == label[..., None], a_w_y, 0)
        grad = (g * coef)[..., None] * p - g[..., None] * (spread + on_label)
        # ignored elements and masked classes give exactly 0 (even against a +inf logit); a bad label's
        # element is NaN throughout
        keep = active[..., None] if mask is None else active[..., None] & mask
        grad = jnp.where(bad[..., None], jnp.nan, jnp.where(keep, grad, 0))
        if weight is not None:
            weight_bar = _index_weight_grad(cfg, k, xc, lse, g, active, label, bad, mask)
    else:
        q, wq, contributes = _probability_terms(cfg, k, target, w, mask)
        _, coef = spec.probability_row(
            k, log_sum_exp=lse, row_max=0.0, target_mass=jnp.sum(wq, axis=-1), weighted_sum=0.0, weighted_xlogx=0.0
        )
        grad = (g * coef)[..., None] * p - g[..., None] * wq
        target_bar, weight_bar = _probability_bars(cfg, k, g, coef, lse, xc, q, contributes, w, target, weight)
        if mask is not None:
            bad_mass = _masked_mass(target, mask)[..., None]
            grad = jnp.where(bad_mass, jnp.nan, jnp.where(mask, grad, 0))
            target_bar = jnp.where(bad_mass, jnp.nan, jnp.where(mask, target_bar, 0))
        target_bar = target_bar.astype(target.dtype)

    if tanh is not None:
        grad = grad * (1 - tanh * tanh)  # the chain rule through c·tanh(x/c)
    if mask is not None and weight_bar is not None:
        weight_bar = jnp.where(mask, weight_bar, 0)
    if weight_bar is not None:
        weight_bar = weight_bar.astype(weight.dtype)
    return grad.astype(x.dtype), target_bar, weight_bar, None



def _probability_bars(cfg: Config, k, g, coef, lse, xc, q, contributes, w, target, weight):
    """(∂/∂target, ∂/∂weight or None) of Σ_i g_i·loss_i for probability targets; shared by the sharded engine.

    ∂/∂t_c = a·w_c·[(L − x_c) + normalize·(log q_c + 1)]: linear in q_c (so also at q_c = 0 against a finite
    logit); nothing where w_c·q_c = 0 against x_c = −inf. A NaN loss (a NaN target entry, a +inf logit) has
    NaN derivatives.
    """
    weight_bar = None
    w_or_1 = 1.0 if w is None else w
    per_q = jnp.where(contributes | (xc > -jnp.inf), w_or_1 * (lse[..., None] - xc), 0)
    if cfg.normalize:
        per_q = per_q + jnp.where(contributes, w_or_1 * (jnp.log(q) + 1), 0)
    if isinstance(k.a, float) and k.a == 0:
        target_bar = jnp.zeros(target.shape, cfg.compute)
    else:
        target_bar = g[..., None] * (k.a * per_q)
    target_bar = jnp.where(jnp.isnan(coef)[..., None], jnp.nan, target_bar)
    if weight is not None:
        per_class = jnp.where(q != 0, q * (lse[..., None] - xc), 0)
        if cfg.normalize:
            per_class = per_class + jnp.where(q != 0, spec.xlogx(q, **_OPS), 0)
        weight_bar = jnp.sum(g[..., None] * per_class, axis=tuple(range(xc.ndim - 1)))
    return target_bar, weight_bar

def _index_weight_grad(cfg: Config, k: spec.RowCoefficients, xc, lse, g, active, label, bad, mask):
    """∂/∂w_c of Σ_i g_i·loss_i for integer labels (g already 0 on ignored elements):

    Σ_i g_i [q_ic (L_i − x_ic) + s·[y_i = c]·L_i² + normalize·xlogx(q_ic)],   q_ic = a·[y_i = c] + b."""
    num_classes = xc.shape[-1]
    rows = tuple(range(xc.ndim - 1))
    g = jnp.where(bad, jnp.nan, g)
    if k.empty_target:
        # q_y = 0: a·(L − x_y) cancels the target column's b·(L − x_y) exactly, so x_y (maybe −inf) is never
        # read: the column keeps −b·L here and is left out of the Σ g·x below
        on_label = -spec.scaled(k.b, g * lse, where=jnp.where)
    else:
        x_y = jnp.take_along_axis(xc, label[..., None], axis=-1)[..., 0]
        on_label = spec.scaled(k.a, g * (lse - x_y), where=jnp.where)
    if k.z != 0:
        on_label = on_label + k.z * g * lse * lse
    if k.normalize:
        on_label = on_label + g * (spec.xlogx(k.a + k.b, **_OPS) - spec.xlogx(k.b, **_OPS))
    on_label = jnp.where(active, on_label, 0)
    bar = jnp.zeros(num_classes, cfg.compute).at[label.reshape(-1)].add(on_label.reshape(-1))
    if not (isinstance(k.b, float) and k.b == 0):
        counted = active[..., None]
        if k.empty_target:
            counted = counted & (jnp.arange(num_classes, dtype=jnp.int32) != label[..., None])
        valid_x = jnp.where(counted, g[..., None] * (xc if mask is None else jnp.where(mask, xc, 0)), 0)
        bar = bar + spec.scaled(
            k.b, jnp.sum(jnp.where(active, g * lse, 0)) - jnp.sum(valid_x, axis=rows), where=jnp.where
        )
    if k.normalize:
        bar = bar + jnp.sum(g) * spec.xlogx(k.b, **_OPS)
    return bar


per_element.defvjp(_per_element_fwd, _per_element_bwd)


# ----------------------------------------------------------------------------------------------------------
# Reduction
# ----------------------------------------------------------------------------------------------------------
@partial(jax.jit, static_argnums=(0,))
def loss(cfg: Config, x, target, weight, mask, sample_weight=None, denominator=None):
    """The reduced loss in the logits' dtype; ``x`` and a probability ``target`` have the classes last.

    ``sample_weight`` (the per-element loss's shape) multiplies each element's loss; ``denominator`` (a 0-d
    array, mean only) replaces the mean's Σ sample_weight·w_y. Both are differentiated by JAX (outside the
    custom_vjp): ∂mean/∂sw_j = (ℓ_j − mean·w_{y_j})/D, or ℓ_j/denominator with a caller's denominator."""
    weight = None if weight is None else _checked_weight(weight.astype(cfg.compute))
    per = per_element(cfg, x, target, weight, mask)
    if sample_weight is not None:
        sample_weight = _checked_sample_weight(sample_weight.astype(cfg.compute))
        per = per * sample_weight
    if cfg.reduction == "none":
        return per.astype(x.dtype)
    total = jnp.sum(per)
    if cfg.reduction == "mean":
        if denominator is not None:
            d = denominator.astype(cfg.compute)
            denominator = jnp.where(jnp.isfinite(d) & (d >= 0), d, jnp.nan)  # a traced bad value: NaN
        elif cfg.kind == "index":
            active, label, _ = _labels(cfg, target, x.shape[-1], mask)
            w = _effective_weight(weight, mask)
            counted = active.astype(cfg.compute) if w is None else jnp.where(active, w[label], 0)
            if sample_weight is not None:
                counted = jnp.where(active, counted * sample_weight, 0)
            denominator = jnp.sum(counted, dtype=cfg.compute)
        else:
            denominator = per.size if sample_weight is None else jnp.sum(sample_weight)
        # differentiated by JAX: the gradient of an empty mean is 0 (the NaN/0 comes from a constant)
        total = spec.reduce_total(cfg.reduction, total, denominator, cfg.empty_mean, where=jnp.where)
    return total.astype(x.dtype)


def _checked_sample_weight(sample_weight):
    """A traced per-element weight that is negative or not finite makes its element NaN (concrete ones raise)."""
    return jnp.where(jnp.isfinite(sample_weight) & (sample_weight >= 0), sample_weight, jnp.nan)
