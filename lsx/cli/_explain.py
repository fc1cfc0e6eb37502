"""``lsx explain``: the definition, written once, filled in with the effective options.

The formula's text lives here, term by term. :func:`definition` renders it in general form (the README's "The
definition" block prints exactly these two lines; ``tests/test_cli.py`` checks that they agree) and
:func:`explain_text` renders it for concrete options.
"""

from __future__ import annotations

from lsx import spec

__all__ = [
    "CROSS_ENTROPY",
    "ENTROPY",
    "GRADIENT",
    "NEGATIVE_ENTROPY",
    "SAMPLE_WEIGHT",
    "SOFTCAP",
    "SOFTCAP_FACTOR",
    "Z_LOSS",
    "definition",
    "explain_text",
]

#: Σ_c w_c q_c (L − x_c): the smoothed cross-entropy of one element (L = log Σ_c exp x_c)
CROSS_ENTROPY = "Σ_c w_c q_c (L − x_c)"
#: the z-loss term; ``{s}`` is the coefficient (w_y = 1 for probability targets)
Z_LOSS = "{s} · w_y · L²"
#: the weighted entropy of the smoothed target, subtracted by ``normalize=True`` (the KL form)
ENTROPY = "H_w(q) = −Σ_c w_c q_c log q_c"
#: −H_w(q), the term ``normalize=True`` adds
NEGATIVE_ENTROPY = "Σ_c w_c q_c log q_c"
#: ∂loss/∂x_c; ``{s}`` is the z-loss coefficient
GRADIENT = "(Σ_k w_k q_k) · p_c  −  w_c q_c  +  2 {s} w_y L p_c"

_SEPARATOR = "  {}  "  # between terms: two spaces either side of + or −


def definition() -> tuple[str, str]:
    """The loss and its gradient in general form (ε, s and ``normalize`` as symbols), as in the README."""
    entropy_name = ENTROPY.split(" = ")[0]
    loss = (
        "loss = "
        + CROSS_ENTROPY
        + _SEPARATOR.format("+")
        + Z_LOSS.format(s="s")
        + _SEPARATOR.format("−")
        + f"[normalize] {entropy_name},      {ENTROPY}"
    )
    return loss, "∂loss/∂x_c = " + GRADIENT.format(s="s")


#: soft-capping: the logits the formula uses; ``{c}`` is the cap
SOFTCAP = "x'_c = {c}·tanh(x_c/{c})"
#: the chain-rule factor soft-capping puts in front of the gradient
SOFTCAP_FACTOR = "(1 − tanh²(x_c/{c}))"
#: how ``sample_weight`` (one weight per element, an array, so not a command-line flag) enters
SAMPLE_WEIGHT = (
    "sample_weight= (an array, one weight per element; 1 without it): loss_i ← sample_weight_i · loss_i, "
    "and its gradient likewise"
)


def _number(value: float) -> str:
    """``value`` short (``%g``) where that loses nothing, else in full."""
    value = float(value)
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _capped(text: str) -> str:
    """``text`` in terms of the capped logits x' (x_c → x'_c)."""
    return text.replace("x_c", "x'_c")


def loss_terms(opts: spec.Options) -> list[tuple[str, str]]:
    """The terms of one element's loss under ``opts``, as (sign, text) pairs; terms that vanish are left out."""
    terms = [("+", _capped(CROSS_ENTROPY) if opts.softcap is not None else CROSS_ENTROPY)]
    if opts.z_loss:
        terms.append(("+", Z_LOSS.format(s=f"{opts.z_loss:g}")))
    if opts.normalize:
        terms.append(("+", NEGATIVE_ENTROPY))
    return terms


def loss_line(opts: spec.Options) -> str:
    """``loss_i = …`` with the options filled in (what ``lsx explain`` prints)."""
    (_, first), *rest = loss_terms(opts)
    line = "loss_i = " + first + "".join(_SEPARATOR.format(sign) + text for sign, text in rest)
    if opts.normalize:
        line += f"      (normalize: the KL form, minimum 0; this term is −H_w(q), {ENTROPY})"
    return line


def gradient_line(opts: spec.Options) -> str:
    grad = GRADIENT.format(s=f"· {opts.z_loss:g} ·")
    if not opts.z_loss:
        grad = grad.split(_SEPARATOR.format("+") + "2 ")[0]
    if opts.softcap is not None:  # the chain rule through x' = c·tanh(x/c)
        return f"∂loss_i/∂x_c = {SOFTCAP_FACTOR.format(c=_number(opts.softcap))} · [{grad}],      p = softmax(x')"
    return "∂loss_i/∂x_c = " + grad + ",      p = softmax(x)"


def softcap_line(opts: spec.Options) -> str:
    c = _number(opts.softcap)
    return (
        SOFTCAP.format(c=c)
        + f"      (softcap={c}: the logits are capped before anything else, ±∞ → ±{c}; L and p are taken over x')"
    )


def reduction_line(opts: spec.Options) -> str:
    empty = "NaN" if opts.empty_mean == "nan" else "0"
    if opts.reduction == "none":
        return 'reduction="none": one loss per element'
    if opts.reduction == "sum":
        return 'reduction="sum": Σ_i loss_i'
    if opts.denominator is not None and float(opts.denominator) == 0:
        return (
            f'reduction="mean" with denominator=0: the mean is {empty} (empty_mean={opts.empty_mean!r}), its gradient 0'
        )
    if opts.denominator is not None:
        d = _number(opts.denominator)
        return f'reduction="mean": Σ_i loss_i / {d}      (denominator={d} replaces Σ_i sample_weight_i·w_{{y_i}})'
    return (
        'reduction="mean": Σ_i loss_i / Σ_i sample_weight_i·w_{y_i} over non-ignored elements '
        f"(probabilities: Σ_i sample_weight_i, the count without sample_weight=); nothing to average → {empty}"
    )


def target_line(opts: spec.Options) -> str:
    eps = opts.label_smoothing
    if opts.spread == "all":
        return f'q_c = (1 − {eps:g})·[c = y] + {eps:g}/K      (spread="all": ε/K on every class)'
    return f'q_y = 1 − {eps:g},  q_c = {eps:g}/(K − 1) for c ≠ y      (spread="others")'


def explain_text(opts: spec.Options, convention: str | None = None, num_classes: int | None = None) -> str:
    """The formula with ``opts`` filled in, the effective options and the list of conventions.

    ``num_classes`` must already be validated (``spec.check_layout``): it adds the values of q for that K.
    """
    if opts.ignore_index is None:
        ignore = "ignore_index=None: every label must be in [0, K)"
    else:
        ignore = f"elements with label {opts.ignore_index}: loss 0, gradient 0"
        if opts.reduction == "mean" and opts.denominator is None:
            ignore += ", left out of the mean"
        elif opts.reduction == "mean":
            ignore += " (the mean divides by the denominator given, whatever they are)"
    hidden = ("weight", "class_mask", "sample_weight")  # arrays: no command-line flag
    x = "x'" if opts.softcap is not None else "x"
    lines = [
        f"lsx options{f' (convention {convention!r})' if convention else ''}:",
        "  " + ", ".join(f"{k}={v!r}" for k, v in opts.describe().items() if k not in hidden),
        "",
        "  " + loss_line(opts),
        "  " + target_line(opts),
        *(["  " + softcap_line(opts)] if opts.softcap is not None else []),
        f"  L = log Σ_c exp({x}_c);  w = class weights (1 without weight=); a term with w_c q_c = 0 contributes 0",
        "  " + ignore,
        "  " + SAMPLE_WEIGHT,
        "  " + reduction_line(opts),
        "  " + gradient_line(opts),
    ]
    if num_classes:
        a, b = spec.smoothing_coefficients(opts, num_classes)
        if num_classes == 1:
            lines.append(f"  with K=1: q_y = {a + b:.6g} (there is no other class)")
        else:
            lines.append(f"  with K={num_classes}: q_y = {a + b:.6g}, q_c = {b:.6g} (c ≠ y)")
    lines += ["", "conventions (lsx.spec.CONVENTIONS; options passed explicitly win):"]
    for name, preset in spec.CONVENTIONS.items():
        lines.append(f"  {name:<8} " + ", ".join(f"{k}={v!r}" for k, v in preset.items()))
    return "\n".join(lines)
