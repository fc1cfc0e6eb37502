"""The definition of label-smoothed cross-entropy, written once.

Every backend is an adapter over this module: it takes option names, defaults, validation, error messages
and conventions from here, and is tested against :func:`reference_loss` / :func:`reference_grad`, a float64
NumPy implementation that follows the formula term by term.

For one element i with logits x over K valid classes, log-sum-exp L = log Σ_c exp(x_c), smoothed target
distribution q, class weights w and z-loss coefficient s::

    loss_i = Σ_c w_c q_c (L − x_c)  +  s · w_y · L²  −  [normalize] H_w(q),    H_w(q) = −Σ_c w_c q_c log q_c

    ∂loss_i/∂x_c = (Σ_k w_k q_k) · p_c − w_c q_c + 2 s w_y L p_c,      p = softmax(x)

with q = (1−ε)·onehot(y) + ε/K  (``spread="all"``) or q_y = 1−ε, q_{c≠y} = ε/(K−1)  (``spread="others"``).
Both are ``q = a·t + b`` on the valid classes, with ``(a, b)`` from :func:`smoothing_coefficients`.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np

__all__ = [
    "CONVENTIONS",
    "EMPTY_MEANS",
    "REDUCTIONS",
    "SPREADS",
    "Layout",
    "Options",
    "RowCoefficients",
    "check_class_count",
    "check_class_mask",
    "check_labels",
    "check_layout",
    "check_probability_target_mask",
    "check_softcap",
    "check_weight",
    "check_weight_range",
    "compute_dtype",
    "default",
    "is_default",
    "label_row",
    "labels_as_int64",
    "logits_dtype_error",
    "probability_row",
    "reduce_total",
    "reduction_scale",
    "reference_grad",
    "reference_loss",
    "resolve_options",
    "resolve_options_cached",
    "scaled",
    "smoothing_coefficients",
    "target_kind",
    "xlogx",
]

SPREADS = ("all", "others")
REDUCTIONS = ("none", "sum", "mean")
EMPTY_MEANS = ("nan", "zero")

Spread = Literal["all", "others"]
Reduction = Literal["none", "sum", "mean"]
EmptyMean = Literal["nan", "zero"]


# --------------------------------------------------------------------------------------------------------
# Defaults that remember they were not passed.
#
# A convention fills in every option the caller left at its default, while an option passed explicitly
# wins. Adapters keep readable signatures (``ignore_index=-100``) by using these marked values as defaults:
# they compare, hash and print like the plain value, and ``is_default`` tells them apart.
# --------------------------------------------------------------------------------------------------------
class _Default:
    __slots__ = ()


class _DefaultInt(_Default, int):
    __slots__ = ()

    def __repr__(self) -> str:
        return int.__repr__(self)


class _DefaultFloat(_Default, float):
    __slots__ = ()

    def __repr__(self) -> str:
        return float.__repr__(self)


class _DefaultStr(_Default, str):
    __slots__ = ()

    def __repr__(self) -> str:
        return str.__repr__(self)


class _DefaultFlag(_Default, int):
    """A default bool (bool cannot be subclassed): falsy/truthy and printed as False/True."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(bool(self))


class _DefaultNone(_Default):
    __slots__ = ()

    def __repr__(self) -> str:
        return "None"

    def __bool__(self) -> bool:
        return False

    def __eq__(self, other: object) -> bool:
        return other is None or isinstance(other, _DefaultNone)

    def __hash__(self) -> int:
        return hash(None)


def default(value: Any) -> Any:
    """Mark ``value`` as a signature default, so that a convention may replace it."""
    if value is None:
        return _DefaultNone()
    if isinstance(value, bool):
        return _DefaultFlag(value)
    if isinstance(value, int):
        return _DefaultInt(value)
    if isinstance(value, float):
        return _DefaultFloat(value)
    if isinstance(value, str):
        return _DefaultStr(value)
    raise TypeError(f"no default marker for {value!r}")


def is_default(value: Any) -> bool:
    """True when ``value`` is a marked signature default, i.e. the caller did not pass the option."""
    return isinstance(value, _Default)


def _plain(value: Any) -> Any:
    """The plain Python value behind a marked default."""
    if isinstance(value, _DefaultNone):
        return None
    if isinstance(value, _DefaultFlag):
        return bool(value)
    if isinstance(value, _DefaultInt):
        return int(value)
    if isinstance(value, _DefaultFloat):
        return float(value)
    if isinstance(value, _DefaultStr):
        return str(value)
    return value


#: The docstring every adapter's ``loss`` shares; each appends its framework notes and an example.
LOSS_DOC = """Label-smoothed cross-entropy of ``logits`` against ``target``.

.. math::

    \\ell_i = \\sum_c w_c q_{ic} (\\mathrm{LSE}_i - x_{ic}) + s\\, w_{y_i} \\mathrm{LSE}_i^2
              + [\\text{normalize}] \\sum_c w_c q_{ic} \\log q_{ic}

with q = (1−ε)·onehot(y) + ε/K (``spread="all"``) or q_y = 1−ε, q_{c≠y} = ε/(K−1) (``spread="others"``).

Args:
    logits: floating array with the classes on ``axis``.
    target: integer labels shaped like ``logits`` without ``axis``, or probabilities shaped like ``logits``.
    axis: the class axis.
    label_smoothing: ε in [0, 1].
    spread: ``"all"`` (ε/K on every class: torch, Keras, optax, HF) or ``"others"`` (ε/(K−1) on the
        non-target classes: fairseq, T5X).
    weight: per-class weights, shape (K,), finite and >= 0.
    ignore_index: label whose elements give 0 loss and 0 gradient and leave the mean's denominator; None
        disables it. Any other label outside [0, K) raises ``ValueError``.
    z_loss: s >= 0, adds s·w_y·LSE² per element.
    normalize: subtract the smoothed target's entropy term (KL form, minimum 0).
    class_mask: boolean (K,) of the classes that exist; the others are left out of softmax and smoothing.
    reduction: ``"none"``, ``"sum"`` or ``"mean"`` (÷ Σ sample_weight·w_y over non-ignored elements for
        labels, ÷ Σ sample_weight (the element count) for probabilities).
    empty_mean: ``"nan"`` (torch) or ``"zero"`` (Keras, Liger) for a mean over no element.
    softcap: c > 0 or None: the logits become c·tanh(x/c) before anything else (Gemma 2's final-logit
        soft-capping); the gradient follows the chain rule.
    sample_weight: one finite weight >= 0 per element (the per-element loss's shape): multiplies each
        element's loss, and the mean divides by Σ sample_weight·w_y.
    denominator: with ``reduction="mean"`` only: divide the sum by this number (or 0-d array) instead of
        the local one, e.g. the global token count over gradient-accumulation steps or data-parallel ranks;
        0 follows ``empty_mean``.
    convention: a preset from ``lsx.spec.CONVENTIONS``; options passed explicitly win.

Returns:
    The loss, in the logits' dtype: shaped like ``target`` (without a class axis) for ``reduction="none"``,
    else a scalar.

"""


# --------------------------------------------------------------------------------------------------------
# Options and conventions
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Options:
    """Validated options. ``weight`` and ``class_mask`` keep the caller's array type (checked separately)."""

    label_smoothing: float = 0.0
    spread: Spread = "all"
    weight: Any = None
    ignore_index: int | None = -100
    z_loss: float = 0.0
    normalize: bool = False
    class_mask: Any = None
    reduction: Reduction = "mean"
    empty_mean: EmptyMean = "nan"
    softcap: float | None = None
    sample_weight: Any = None
    denominator: Any = None

    def describe(self) -> dict[str, Any]:
        """The options as plain, printable values (arrays summarised)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ARRAY_OPTIONS and value is not None and not isinstance(value, numbers.Real):
                value = f"array of shape {tuple(np.shape(value))}"
            out[f.name] = value
        return out


OPTION_NAMES = tuple(f.name for f in fields(Options))
#: options that may hold arrays (kept in the caller's array type, checked by value where concrete)
ARRAY_OPTIONS = ("weight", "class_mask", "sample_weight", "denominator")
#: what an option that was not passed at all stands for: its marked default (arrays default to None)
_UNPASSED = {name: default(getattr(Options, name)) for name in OPTION_NAMES if name not in ARRAY_OPTIONS}

#: Presets reproducing well-known implementations. Each sets the options it names; options passed
#: explicitly win. ``label_smoothing`` is the peer's own default (0.1 for timm's
#: ``LabelSmoothingCrossEntropy`` and HF's ``LabelSmoother``, 0 elsewhere).
CONVENTIONS: dict[str, dict[str, Any]] = {
    # torch.nn.functional.cross_entropy
    "torch": dict(spread="all", ignore_index=-100, reduction="mean", empty_mean="nan"),
    # keras.losses.CategoricalCrossentropy / SparseCategoricalCrossentropy, from_logits=True
    "keras": dict(spread="all", ignore_index=None, reduction="mean", empty_mean="zero"),
    # optax.softmax_cross_entropy(x, optax.smooth_labels(onehot, alpha)): per-example losses
    "optax": dict(spread="all", ignore_index=None, reduction="none"),
    # transformers.trainer_pt_utils.LabelSmoother
    "hf": dict(label_smoothing=0.1, spread="all", ignore_index=-100, reduction="mean", empty_mean="nan"),
    # timm.loss.LabelSmoothingCrossEntropy
    "timm": dict(label_smoothing=0.1, spread="all", ignore_index=None, reduction="mean"),
    # fairseq label_smoothed_nll_loss (since 2021): K−1 spread, padding index 1, summed
    "fairseq": dict(spread="others", ignore_index=1, reduction="sum"),
    # t5x.losses.compute_weighted_cross_entropy with the T5X recipe's z_loss=1e-4: KL form, summed
    "t5x": dict(spread="others", ignore_index=None, z_loss=1e-4, normalize=True, reduction="sum"),
}


_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def _check_number(name: str, value: Any, low: float, high: float | None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} of type {type(value).__name__}")
    number = float(value)
    if math.isnan(number) or number < low or (high is not None and number > high):
        bounds = f"[{low:g}, {high:g}]" if high is not None else f">= {low:g} and finite"
        raise ValueError(f"{name} must be in {bounds}, got {value!r}")
    if high is None and math.isinf(number):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return number


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return str(value)


def resolve_options(convention: str | None = None, **given: Any) -> Options:
    """Validate options and apply a ``convention``; options passed explicitly (not marked defaults) win.

    Raises ``ValueError``/``TypeError`` naming the option and the bad value. Works on Python scalars only,
    so it runs unchanged under ``jax.jit``, ``tf.function`` and ``torch.compile``.
    """
    unknown = set(given) - set(OPTION_NAMES)
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; options are {', '.join(OPTION_NAMES)}")
    preset: dict[str, Any] = {}
    if convention is not None and not is_default(convention):
        name = _check_choice("convention", convention, tuple(CONVENTIONS))
        preset = CONVENTIONS[name]
    values = {}
    for name in OPTION_NAMES:
        value = given.get(name, _UNPASSED.get(name))
        if is_default(value) and name in preset:
            value = preset[name]
        values[name] = _plain(value)

    ignore_index = values["ignore_index"]
    if ignore_index is not None:
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int or None, got {ignore_index!r}")
        ignore_index = int(ignore_index)
        if not _INT64_MIN <= ignore_index <= _INT64_MAX:
            raise ValueError(f"ignore_index must fit in a 64-bit signed integer, got ignore_index={ignore_index!r}")
    normalize = values["normalize"]
    if not isinstance(normalize, (bool, np.bool_)):
        raise TypeError(f"normalize must be a bool, got {normalize!r}")
    softcap = values["softcap"]
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
            raise TypeError(f"softcap must be a real number or None, got {softcap!r} of type {type(softcap).__name__}")
        if not (math.isfinite(float(softcap)) and float(softcap) > 0):
            raise ValueError(f"softcap must be > 0 and finite (or None), got softcap={softcap!r}")
        softcap = float(softcap)
    reduction = _check_choice("reduction", values["reduction"], REDUCTIONS)
    denominator = values["denominator"]
    if denominator is not None:
        if reduction != "mean":
            raise ValueError(f'denominator is only for reduction="mean", got reduction={reduction!r}')
        if isinstance(denominator, bool) or (
            not isinstance(denominator, numbers.Real) and _ndim(denominator) != 0  # a 0-d array or tensor
        ):
            raise ValueError(f"denominator must be a number or a 0-d array, got {_describe_value(denominator)}")
        check_real_number_type(denominator)
        if isinstance(denominator, numbers.Real):
            check_denominator(denominator)
    return Options(
        label_smoothing=_check_number("label_smoothing", values["label_smoothing"], 0.0, 1.0),
        spread=_check_choice("spread", values["spread"], SPREADS),  # type: ignore[arg-type]
        weight=values["weight"],
        ignore_index=ignore_index,
        z_loss=_check_number("z_loss", values["z_loss"], 0.0, None),
        normalize=bool(normalize),
        class_mask=values["class_mask"],
        reduction=reduction,  # type: ignore[arg-type]
        empty_mean=_check_choice("empty_mean", values["empty_mean"], EMPTY_MEANS),  # type: ignore[arg-type]
        softcap=softcap,
        sample_weight=values["sample_weight"],
        denominator=denominator,
    )


def _ndim(value: Any) -> int:
    """The number of dimensions from the shape alone: never reads a (traced) tensor's values."""
    shape = getattr(value, "shape", None)
    if shape is not None and not isinstance(value, (str, bytes)):
        return len(tuple(shape))
    return int(np.ndim(value))


#: resolved scalar option sets, keyed by the values given and their types (see resolve_options_cached)
_RESOLVED: dict[Any, Options] = {}
_RESOLVED_MAX = 256


def resolve_options_cached(convention: str | None = None, **given: Any) -> Options:
    """:func:`resolve_options`, memoised when every array option (``weight``, ``class_mask``,
    ``sample_weight``, ``denominator``) is None: resolution is then a pure function of hashable scalars, and
    most calls repeat the same few option sets. The key holds each value's type, so a marked default and the
    same value passed explicitly, ``True`` and ``1``, ``0`` and ``0.0`` stay apart. Invalid options raise as
    :func:`resolve_options` does, every time (only valid results are stored). For eager adapters; traced
    code (``torch.compile``) should call :func:`resolve_options`.
    """
    if (
        given.get("weight") is not None
        or given.get("class_mask") is not None
        or given.get("sample_weight") is not None
        or given.get("denominator") is not None
    ):
        return resolve_options(convention, **given)
    values = tuple(given.values())
    key = (convention, type(convention), tuple(given), values, tuple(map(type, values)))
    try:
        hit = _RESOLVED.get(key)
    except TypeError:  # an unhashable value: resolved (or rejected) uncached
        return resolve_options(convention, **given)
    if hit is None:
        hit = resolve_options(convention, **given)
        if len(_RESOLVED) >= _RESOLVED_MAX:
            _RESOLVED.clear()
        _RESOLVED[key] = hit
    return hit


def _describe_value(value: Any) -> str:
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"{type(value).__name__} of shape {tuple(shape)}"
    return f"{value!r} of type {type(value).__name__}"


def _dtype_name(dtype: Any) -> str:
    """A NumPy, torch, TensorFlow, JAX or Keras dtype's plain name (``"float32"``, ``"bfloat16"``, ...)."""
    if isinstance(dtype, type) and issubclass(dtype, np.generic):
        dtype = np.dtype(dtype)
    name = getattr(dtype, "name", None)
    if not isinstance(name, str):
        name = str(dtype)
    return name.replace("torch.", "")


def check_real_number_type(denominator: Any) -> None:
    """A ``denominator`` must hold a real number: a Python int or float, or a 0-d array or tensor of a real
    (integer or floating, not bool) dtype; a string, a complex number or a bool is a ``ValueError``. Looks at
    types only, so it runs under tracing."""
    if isinstance(denominator, bool) or isinstance(denominator, (str, bytes)):
        raise ValueError(f"denominator must be a real number, got {denominator!r} of type {type(denominator).__name__}")
    if isinstance(denominator, numbers.Real):
        return
    dtype = getattr(denominator, "dtype", None)
    name = None if dtype is None else _dtype_name(dtype)
    real = name is not None and (name == "bfloat16" or any(name.startswith(p) for p in ("float", "int", "uint")))
    if not real:
        # arrays are described, not printed: a traced one has no values to show
        got = f"{_describe_value(denominator)} of dtype {name}" if name is not None else _describe_value(denominator)
        raise ValueError(f"denominator must be a real number or a 0-d array of a real dtype, got {got}")


def check_denominator(denominator: Any) -> float:
    """A concrete ``denominator``: a real number, finite and >= 0 (0 follows ``empty_mean``)."""
    check_real_number_type(denominator)
    value = float(np.asarray(denominator))
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"denominator must be finite and >= 0, got denominator={value!r}")
    return value


#: the float dtypes accumulated in float64 (every other floating dtype accumulates in float32)
_FLOAT64_NAMES = ("float64", "double", "longdouble", "float96", "float128")


def _compute_name(dtype: Any) -> str:
    """``"float64"`` or ``"float32"``: plain string work, so it also runs while a compiler traces."""
    return "float64" if _dtype_name(dtype) in _FLOAT64_NAMES else "float32"


def compute_dtype(dtype: Any) -> np.dtype:
    """The accumulation dtype of logits of ``dtype`` on every backend: float64 for float64 (and wider), float32
    for float32, float16 and bfloat16."""
    return np.dtype(_compute_name(dtype))


def _softcap_bounds(name: str) -> tuple[float, float]:
    info = np.finfo(name)
    return float(info.tiny), float(info.eps) / float(info.tiny)


_SOFTCAP_RANGES = {name: _softcap_bounds(name) for name in ("float32", "float64")}


def softcap_range(dtype: Any) -> tuple[float, float]:
    """The caps c that logits of ``dtype`` can be soft-capped with, c·tanh(x/c) in :func:`compute_dtype`.

    From the smallest normal number (below it c, or x/c for small x, is flushed to zero where denormals are)
    to eps/tiny: above it x/c is subnormal (flushed to 0 on XLA and GPUs) for logits as large as eps, so
    the capped logits would lose more than one unit of rounding. float32: [1.2e-38, 1.0e31]; float64:
    [2.2e-308, 1.0e292].
    """
    return _SOFTCAP_RANGES[_compute_name(dtype)]


def check_softcap(softcap: float | None, dtype: Any) -> None:
    """``softcap`` outside :func:`softcap_range` of the logits' dtype is a ``ValueError`` naming both: the
    capped logits would overflow or underflow (NaN or a silently wrong loss on some engine). Call it with the
    resolved option and the logits' dtype, before any computation; it reads no array values (plain Python,
    so it also runs under ``torch.compile``)."""
    if softcap is None:
        return
    low, high = softcap_range(dtype)
    if not low <= softcap <= high:
        name, computed = _dtype_name(dtype), _compute_name(dtype)
        where = name if name == computed else f"{name} (computed in {computed})"
        raise ValueError(
            f"softcap={softcap!r} is outside the range [{low:.3g}, {high:.3g}] that {where} logits can be capped "
            f"with: c or x/c would underflow or overflow {computed}"
        )


def check_weight_range(
    dtype: Any, *, weight: Any = None, sample_weight: Any = None, num_elements: int | None = None
) -> None:
    """Concrete (already checked) weights whose weighted sums could overflow the compute dtype are a
    ``ValueError`` naming the argument.

    The loss multiplies each element by ``sample_weight`` and its class weights, and the mean divides by
    Σ sample_weight·w_y: with N elements these stay below N·max(weight)·max(sample_weight), which must not
    exceed finfo.max·eps of :func:`compute_dtype` (float32: 4.1e31, float64: 4.0e292), leaving the loss values
    themselves 1/eps of headroom. Pass the weights as NumPy arrays (or None); ``num_elements`` defaults to
    ``sample_weight``'s size (or 1).
    """
    computed = compute_dtype(dtype)
    info = np.finfo(computed)
    limit = float(info.max) * float(info.eps)
    w_max = 1.0 if weight is None else float(np.max(np.asarray(weight, np.float64), initial=0.0))
    s = None if sample_weight is None else np.asarray(sample_weight, np.float64)
    s_max = 1.0 if s is None else float(np.max(s, initial=0.0))
    n = num_elements if num_elements is not None else (1 if s is None else s.size)
    bound = max(n, 1) * w_max * s_max
    if bound <= limit:
        return
    if s is not None and (weight is None or s_max * max(n, 1) > limit):
        culprit = f"sample_weight (max {s_max!r})"
    elif s is None or w_max * max(n, 1) > limit:
        culprit = f"weight (max {w_max!r})"
    else:
        culprit = f"weight (max {w_max!r}) with sample_weight (max {s_max!r})"
    raise ValueError(
        f"{culprit} is too large for {_dtype_name(dtype)} logits (computed in {computed.name}): "
        f"N·max(weight)·max(sample_weight) = {bound:.3g} over N = {n} element(s) exceeds "
        f"finfo({computed.name}).max·eps = {limit:.3g}, so the weighted sums could overflow"
    )


def check_sample_weight(sample_weight: Any, element_shape: tuple[int, ...]) -> np.ndarray:
    """Concrete per-element weights as float64: the per-element loss's shape, finite and >= 0."""
    sw = np.asarray(sample_weight)
    if sw.dtype.kind not in "fiu" or sw.dtype == np.bool_:
        raise TypeError(f"sample_weight must be a real array, got dtype {sw.dtype}")
    if sw.shape != tuple(element_shape):
        raise ValueError(
            f"sample_weight must have the per-element loss's shape {tuple(element_shape)}, got {sw.shape}"
        )
    sw = sw.astype(np.float64)
    bad = ~np.isfinite(sw) | (sw < 0)
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"sample_weight must be finite and >= 0, got sample_weight[{index}] = {float(sw[index])!r}")
    return sw


def element_shape(logits_shape: tuple[int, ...], axis: int) -> tuple[int, ...]:
    """The per-element loss's shape: the logits' shape without the class axis (``axis`` normalised)."""
    return tuple(logits_shape[:axis]) + tuple(logits_shape[axis + 1 :])


# --------------------------------------------------------------------------------------------------------
# Shape-level checks (no values needed: safe under tracing)
# --------------------------------------------------------------------------------------------------------
def target_kind(dtype: Any) -> Literal["index", "probs"]:
    """``"index"`` for integer targets, ``"probs"`` for floating ones; anything else is an error.

    ``dtype`` is anything ``numpy.dtype`` accepts, or a framework dtype with a NumPy-compatible name.
    """
    if isinstance(dtype, np.dtype) and dtype.kind in "iuf":  # the common case, without parsing the name
        return "index" if dtype.kind in "iu" else "probs"
    name = getattr(dtype, "name", None) or str(dtype)
    name = name.replace("torch.", "")
    if name in ("bfloat16",):
        return "probs"
    try:
        np_dtype = np.dtype(name)
    except TypeError:
        raise TypeError(f"target must hold integer labels or floating probabilities, got dtype {name}") from None
    if np_dtype.kind in "iu":
        return "index"
    if np_dtype.kind == "f":
        return "probs"
    raise TypeError(f"target must hold integer labels or floating probabilities, got dtype {name}")


@dataclass(frozen=True)
class Layout:
    """Where the classes are: ``axis`` normalised to ``[0, ndim)``, ``num_classes`` its length K."""

    axis: int
    num_classes: int
    kind: Literal["index", "probs"]


def check_layout(
    logits_shape: tuple[int, ...],
    target_shape: tuple[int, ...],
    kind: Literal["index", "probs"],
    options: Options,
    *,
    axis: int,
    weight_shape: tuple[int, ...] | None = None,
    class_mask_shape: tuple[int, ...] | None = None,
    sample_weight_shape: tuple[int, ...] | None = None,
) -> Layout:
    """Check shapes and shape-dependent options; return the normalised layout."""
    logits_shape, target_shape = tuple(logits_shape), tuple(target_shape)
    ndim = len(logits_shape)
    if ndim == 0:
        raise ValueError("logits must have a class axis, got a scalar")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral) or not -ndim <= axis < ndim:
        raise ValueError(f"axis must be an int in [{-ndim}, {ndim}) for logits of shape {logits_shape}, got {axis!r}")
    axis = int(axis) % ndim
    num_classes = int(logits_shape[axis])
    if kind == "index":
        expected = logits_shape[:axis] + logits_shape[axis + 1 :]
        if target_shape != expected:
            hint = ""
            if axis != ndim - 1 and target_shape == logits_shape[:-1]:
                hint = (
                    f"; labels of shape {target_shape} fit logits with the classes on the last axis, "
                    f"{logits_shape[-1]} of them (e.g. (batch, time, vocabulary)): pass axis=-1"
                )
            raise ValueError(
                f"target of integer labels must have shape {expected} (logits {logits_shape} without axis {axis}), "
                f"got {target_shape}{hint}"
            )
    elif target_shape != logits_shape:
        hint = ""
        if target_shape in (logits_shape[:axis] + logits_shape[axis + 1 :], logits_shape[:-1]):
            hint = f"; {FLOAT_TARGET}"
        raise ValueError(f"target of probabilities must have the logits' shape {logits_shape}, got {target_shape}{hint}")
    if num_classes == 0:
        raise ValueError(f"the class axis {axis} of logits {logits_shape} is empty")
    for name, shape in (("weight", weight_shape), ("class_mask", class_mask_shape)):
        if shape is not None and tuple(shape) != (num_classes,):
            raise ValueError(f"{name} must have shape ({num_classes},) (one entry per class), got {tuple(shape)}")
    if sample_weight_shape is not None:
        expected = element_shape(logits_shape, axis)
        if tuple(sample_weight_shape) != expected:
            raise ValueError(
                f"sample_weight must have the per-element loss's shape {expected}, got {tuple(sample_weight_shape)}"
            )
    if class_mask_shape is None:
        check_class_count(num_classes, options)
    return Layout(axis=axis, num_classes=num_classes, kind=kind)


#: why a floating-point target of the labels' shape is refused
FLOAT_TARGET = (
    "a floating-point target is read as probabilities, one per class; class labels need an integer dtype "
    "(torch: target.long(); NumPy/JAX: target.astype('int64'); TensorFlow: tf.cast(target, tf.int64))"
)


def logits_dtype_error(logits_dtype: Any, target_dtype: Any = None) -> TypeError:
    """The error for non-floating logits; when the target is floating the two were likely swapped (Keras
    losses take ``(y_true, y_pred)``, lsx's functional losses ``(logits, target)``)."""
    name = _dtype_name(logits_dtype)
    message = f"logits must be floating point, got dtype {name}"
    if target_dtype is not None and _is_floating(target_dtype):
        message += (
            f"; the target is {_dtype_name(target_dtype)}: were they passed in Keras's (y_true, y_pred) order? "
            "loss takes (logits, target), logits first"
        )
    return TypeError(message)


def _dtype_name(dtype: Any) -> str:
    name = getattr(dtype, "name", None) or str(dtype)
    return name.replace("torch.", "").replace("<dtype: '", "").replace("'>", "")


def _is_floating(dtype: Any) -> bool:
    name = _dtype_name(dtype)
    if name == "bfloat16":
        return True
    try:
        return np.dtype(name).kind == "f"
    except TypeError:
        return False


def check_class_count(valid_classes: int, options: Options) -> None:
    """At least one valid class, and two for ``spread="others"`` with ε > 0 (K may be a global count, summed
    over the slices of a class axis split across devices)."""
    if valid_classes < 1:
        raise ValueError("class_mask must leave at least one valid class, got none")
    if options.spread == "others" and valid_classes < 2 and options.label_smoothing > 0:
        raise ValueError(
            f'spread="others" needs at least 2 classes when label_smoothing > 0, got K={valid_classes} '
            f"with label_smoothing={options.label_smoothing!r}"
        )


def smoothing_coefficients(options: Options, valid_classes: int) -> tuple[float, float]:
    """``(a, b)`` such that the smoothed target is ``q = a·t + b`` on the valid classes.

    ``spread="all"``: b = ε/K, a = 1 − ε.   ``spread="others"``: b = ε/(K−1), a = 1 − ε − b, so q_y = 1 − ε.
    """
    eps = options.label_smoothing
    if options.spread == "all":
        return 1.0 - eps, eps / valid_classes
    off = eps / (valid_classes - 1) if eps > 0 else 0.0
    return 1.0 - eps - off, off


# --------------------------------------------------------------------------------------------------------
# Value-level checks (need concrete NumPy values; adapters call them outside tracing)
# --------------------------------------------------------------------------------------------------------
def check_weight(weight: Any, num_classes: int) -> np.ndarray:
    """Class weights as float64: shape (K,), finite, >= 0."""
    w = np.asarray(weight)
    if w.dtype.kind not in "fiu" or w.dtype == np.bool_:
        raise TypeError(f"weight must be a real array, got dtype {w.dtype}")
    if w.shape != (num_classes,):
        raise ValueError(f"weight must have shape ({num_classes},) (one entry per class), got {w.shape}")
    w = w.astype(np.float64)
    bad = ~np.isfinite(w) | (w < 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"weight must be finite and >= 0, got weight[{i}] = {float(w[i])!r}")
    return w


def check_class_mask(class_mask: Any, num_classes: int, options: Options) -> np.ndarray:
    """A boolean (K,) mask of the classes that exist, leaving enough classes for the options."""
    mask = np.asarray(class_mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"class_mask must be a boolean array, got dtype {mask.dtype}")
    if mask.shape != (num_classes,):
        raise ValueError(f"class_mask must have shape ({num_classes},) (one entry per class), got {mask.shape}")
    check_class_count(int(mask.sum()), options)
    return mask


def labels_as_int64(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Integer labels of any dtype (int8…int64, uint8…uint64) as int64, and where they did not fit.

    Comparisons then happen on the caller's values: nothing wraps in a narrow dtype, and a uint64 label
    above 2**63 − 1 is reported as too big rather than read as a negative number.
    """
    y = np.asarray(labels)
    if y.dtype.kind == "u" and y.dtype.itemsize == 8:
        too_big = y > np.uint64(_INT64_MAX)
        return np.where(too_big, 0, y).astype(np.int64), too_big
    return y.astype(np.int64, copy=False), np.zeros(y.shape, bool)


def check_labels(labels: Any, num_classes: int, options: Options, class_mask: np.ndarray | None = None) -> None:
    """Raise ``ValueError`` naming the first label outside ``[0, K)`` (other than ``ignore_index``).

    Works on the caller's values in any integer dtype (see :func:`labels_as_int64`); adapters call it before
    any narrowing conversion of the labels.
    """
    raw = np.asarray(labels)
    if class_mask is None and raw.dtype.kind in "iu" and (raw.dtype.itemsize < 8 or raw.dtype.kind == "i"):
        # the common case, every label in [0, K) or ignored, settled in a few passes (as unsigned, a
        # negative label is above K); anything else is reported below
        y = raw.astype(np.int64, copy=False)
        inside = y.view(np.uint64) < num_classes
        if options.ignore_index is not None:
            inside |= y == options.ignore_index
        if inside.all():
            return
    y, too_big = labels_as_int64(raw)
    active = y != options.ignore_index if options.ignore_index is not None else np.ones(y.shape, bool)
    active |= too_big
    bad = active & ((y < 0) | (y >= num_classes) | too_big)
    if bad.any():
        value = int(raw[bad][0])
        ignore = "" if options.ignore_index is None else f" and is not ignore_index={options.ignore_index}"
        raise ValueError(f"target has label {value}, which is outside [0, {num_classes}){ignore}")
    if class_mask is not None:
        on_masked = active & ~bad & ~np.asarray(class_mask)[np.clip(y, 0, num_classes - 1)]
        if on_masked.any():
            raise ValueError(f"target has label {int(y[on_masked][0])}, a class that class_mask marks as absent")


def check_probability_target_mask(target: Any, axis: int, class_mask: np.ndarray) -> None:
    """Probability mass on a class that ``class_mask`` removes is an error."""
    t = np.moveaxis(np.asarray(target), axis, -1)
    masked = t[..., ~np.asarray(class_mask)]
    if masked.size and np.any(masked != 0):
        cls = int(np.flatnonzero(~np.asarray(class_mask))[np.argwhere(masked != 0)[0][-1]])
        raise ValueError(f"target puts probability on class {cls}, which class_mask marks as absent")


def validate(
    logits: np.ndarray, target: np.ndarray, options: Options, axis: int
) -> tuple[Layout, np.ndarray | None, np.ndarray | None]:
    """All checks for concrete NumPy inputs: returns the layout, float64 weight and bool class mask."""
    kind = target_kind(target.dtype)
    if np.asarray(logits).dtype.kind != "f":
        raise logits_dtype_error(np.asarray(logits).dtype, np.asarray(target).dtype)
    layout = check_layout(
        np.shape(logits),
        np.shape(target),
        kind,
        options,
        axis=axis,
        weight_shape=None if options.weight is None else np.shape(options.weight),
        class_mask_shape=None if options.class_mask is None else np.shape(options.class_mask),
        sample_weight_shape=None if options.sample_weight is None else np.shape(options.sample_weight),
    )
    k = layout.num_classes
    check_softcap(options.softcap, np.asarray(logits).dtype)
    elements = element_shape(np.shape(logits), layout.axis)
    sample_weight = None
    if options.sample_weight is not None:
        sample_weight = check_sample_weight(options.sample_weight, elements)
    if options.denominator is not None:
        check_denominator(options.denominator)
    weight = None if options.weight is None else check_weight(options.weight, k)
    check_weight_range(
        np.asarray(logits).dtype, weight=weight, sample_weight=sample_weight, num_elements=math.prod(elements)
    )
    mask = None if options.class_mask is None else check_class_mask(options.class_mask, k, options)
    if kind == "index":
        check_labels(target, k, options, mask)
    elif mask is not None:
        check_probability_target_mask(target, layout.axis, mask)
    return layout, weight, mask


# --------------------------------------------------------------------------------------------------------
# The float64 reference
# --------------------------------------------------------------------------------------------------------
def _reference_terms(logits: Any, target: Any, axis: int, convention: str | None, options: dict[str, Any]):
    opts = resolve_options(convention, **options)
    x = np.asarray(logits)
    t = np.asarray(target)
    layout, weight, mask = validate(x, t, opts, axis)
    x = np.moveaxis(x.astype(np.float64), layout.axis, -1)  # (..., K)
    # soft-capping replaces the logits by c·tanh(x/c) before anything else (±inf become ±c); the chain rule
    # multiplies the gradient by 1 − tanh²(x/c)
    chain = 1.0
    if opts.softcap is not None:
        tanh = np.tanh(x / opts.softcap)
        x = opts.softcap * tanh
        chain = 1.0 - tanh * tanh
    k = layout.num_classes
    valid = np.ones(k, bool) if mask is None else mask
    w = np.where(valid, 1.0 if weight is None else weight, 0.0)
    a, b = smoothing_coefficients(opts, int(valid.sum()))

    if layout.kind == "index":
        t, _ = labels_as_int64(t)  # checked above: every active label is in range
        active = np.ones(t.shape, bool) if opts.ignore_index is None else t != opts.ignore_index
        y = np.where(active, t, 0)
        onehot = (np.arange(k) == y[..., None]).astype(np.float64)
        w_y = w[y]
    else:
        onehot = np.moveaxis(t.astype(np.float64), layout.axis, -1)
        active = np.ones(onehot.shape[:-1], bool)
        w_y = np.ones(active.shape)
    q = np.where(valid, a * onehot + b, 0.0)

    # log-sum-exp over the valid classes, with the max shift
    shifted = np.where(valid, x, -np.inf)
    m = np.max(shifted, axis=-1, keepdims=True)
    # a row whose valid logits are all −inf has L = −inf; a +inf logit makes the row's L (and loss) NaN
    positive_inf = m[..., 0] == np.inf
    m = np.where(np.isfinite(m), m, 0.0)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        lse = np.log(np.sum(np.exp(shifted - m), axis=-1)) + m[..., 0]
    lse = np.where(positive_inf, np.nan, lse)
    p = np.where(valid, np.exp(shifted - lse[..., None]), 0.0)

    # a class contributes wherever w_c·q_c ≠ 0, linearly: nothing where it is 0, even against x_c = −inf
    # (no 0·∞); a NaN q_c makes the loss NaN and a negative one counts, as in torch
    wq = w * q
    contributes = wq != 0
    with np.errstate(invalid="ignore"):  # 0·∞ where w_c·q_c = 0 is computed, then left out
        cross_entropy = np.sum(np.where(contributes, wq * (lse[..., None] - x), 0.0), axis=-1)
    # a term whose coefficient is 0 is exactly 0: z_loss = 0 against an overflowing L² gives 0, not NaN
    z_term = opts.z_loss * w_y * lse**2 if opts.z_loss != 0 else 0.0
    # normalize: subtract the smoothed target's (weighted) entropy, the KL form whose minimum is 0
    # (q·log q is NaN for q < 0: there is no KL divergence to a negative "distribution")
    entropy = -np.sum(np.where(contributes, w * xlogx(q, where=np.where, log=np.log), 0.0), axis=-1)
    per_element = np.where(active, cross_entropy + z_term - (entropy if opts.normalize else 0.0), 0.0)
    sample_weight = 1.0 if opts.sample_weight is None else np.asarray(opts.sample_weight, np.float64)
    per_element = per_element * sample_weight if opts.sample_weight is not None else per_element

    z_grad = 2 * opts.z_loss * w_y * lse if opts.z_loss != 0 else 0.0
    grad = (np.sum(wq, axis=-1) + z_grad)[..., None] * p - wq
    grad = np.where(active[..., None] & valid, grad * chain, 0.0)
    if opts.sample_weight is not None:
        grad = grad * sample_weight[..., None]

    # the mean's denominator: Σ sample_weight·w_y over the non-ignored elements (Σ sample_weight for
    # probabilities), unless the caller gives one
    if opts.denominator is not None:
        denominator = float(np.asarray(opts.denominator))
    elif layout.kind == "index":
        denominator = float(np.sum(np.where(active, w_y * sample_weight, 0.0)))
    else:
        denominator = float(np.sum(np.broadcast_to(sample_weight, active.shape)))
    return opts, layout, per_element, grad, denominator


def _reduce(opts: Options, per_element: np.ndarray, denominator: float) -> np.ndarray:
    if opts.reduction == "none":
        return per_element
    total = np.sum(per_element)
    if opts.reduction == "sum":
        return np.asarray(total)
    if denominator == 0:
        return np.asarray(np.nan if opts.empty_mean == "nan" else 0.0)
    return np.asarray(total / denominator)


def reference_loss(logits: Any, target: Any, *, axis: int = -1, convention: str | None = None, **options: Any) -> np.ndarray:
    """The loss in float64, computed from the definition (materialising q). Slow; for testing."""
    opts, _, per_element, _, denominator = _reference_terms(logits, target, axis, convention, options)
    return _reduce(opts, per_element, denominator)


def reference_grad(
    logits: Any,
    target: Any,
    *,
    axis: int = -1,
    convention: str | None = None,
    cotangent: Any = None,
    **options: Any,
) -> np.ndarray:
    """∂(cotangent · loss)/∂logits in float64, in the logits' layout.

    ``cotangent`` has the loss's shape (default: ones, i.e. the gradient of the sum for ``reduction="none"``).
    """
    opts, layout, per_element, grad, denominator = _reference_terms(logits, target, axis, convention, options)
    if opts.reduction == "none":
        scale = np.ones(per_element.shape) if cotangent is None else np.asarray(cotangent, np.float64)
    else:
        upstream = 1.0 if cotangent is None else float(np.asarray(cotangent))
        factor = 1.0
        if opts.reduction == "mean":
            # with every element ignored the gradient is zero (like torch), not 0/0
            factor = 1.0 / denominator if denominator != 0 else 0.0
        scale = np.full(per_element.shape, upstream * factor)
    return np.moveaxis(grad * scale[..., None], -1, layout.axis)


# --------------------------------------------------------------------------------------------------------
# The per-row algebra, written once
#
# Every engine reduces an element's row of logits to a few statistics taken relative to the row maximum m
# (over the valid classes; 0 when that maximum is not finite) and hands them to the functions below, which
# return the per-element loss and the gradient's row coefficient. The engine then writes the gradient as
#
#     ∂loss/∂x_c = coef · p_c − w_c q_c,      p_c = exp(x_c − m) / sum_exp,
#
# times the reduction's factor (:func:`reduction_scale`) and the upstream gradient. The functions use plain
# arithmetic, so they work on Python floats and on NumPy, torch, JAX, TensorFlow and Keras arrays alike;
# the few element-wise selections they need come from ``where`` (the framework's ``where``), which is only
# called for coefficients that are arrays (e.g. a traced class count). Statistics relative to the maximum
# merge across chunks and devices with :func:`merge_max`: the fused-linear and vocabulary-parallel engines
# combine exactly these.
#
# The 0·∞ rule: a term whose coefficient is exactly 0 contributes exactly 0, whatever the value it multiplies
# (an ε = 0 smoothing term against a −inf logit, a z-loss of 0 against an overflowing L²).
# --------------------------------------------------------------------------------------------------------
def xlogx(q: Any, *, where: Any = None, log: Any = None) -> Any:
    """q·log q with 0·log 0 = 0 (NaN for q < 0 or NaN: there is no entropy to speak of).

    Python floats use :mod:`math`; arrays need the framework's ``where`` and ``log``.
    """
    if isinstance(q, numbers.Real):
        q = float(q)
        if q == 0:
            return 0.0
        return q * math.log(q) if q > 0 else math.nan
    positive = q > 0
    return where(q == 0, 0.0 * q, q * log(where(positive, q, 1.0 + 0.0 * q)) + where(q < 0, math.nan, 0.0 * q))


def scaled(coefficient: Any, term: Any, *, where: Any = None) -> Any:
    """``coefficient · term``, exactly 0 where the coefficient is 0 (no 0·∞ = NaN)."""
    if isinstance(coefficient, numbers.Real):
        return coefficient * term if coefficient != 0 else 0.0
    return where(coefficient != 0, coefficient * term, 0.0 * coefficient)


@dataclass(frozen=True)
class RowCoefficients:
    """What the options make of a row's algebra, given the class weights' total W over the valid classes.

    ``a, b``: the smoothed target is q = a·t + b on the valid classes; ``z``: the z-loss coefficient;
    ``total_weight``: W = Σ_c w_c over the valid classes (K without weights); ``normalize``: the KL form.
    ``a``, ``b`` and ``total_weight`` may be 0-d arrays (a traced class mask or weight).
    """

    a: Any
    b: Any
    z: float
    normalize: bool
    total_weight: Any
    #: the target class carries no mass, q_y = a + b = 0 (ε = 1 with ``spread="others"``): its logit must not
    #: enter the loss at all, so engines leave it out of ``weighted_sum`` (see :func:`label_row`)
    empty_target: bool = False

    @classmethod
    def of(cls, options: Options, valid_classes: Any, total_weight: Any = None) -> RowCoefficients:
        a, b = smoothing_coefficients(options, valid_classes)
        return cls(
            a=a,
            b=b,
            z=options.z_loss,
            normalize=options.normalize,
            total_weight=valid_classes if total_weight is None else total_weight,
            empty_target=options.spread == "others" and options.label_smoothing == 1.0,
        )


def label_row(
    k: RowCoefficients,
    *,
    log_sum_exp: Any,
    row_max: Any,
    w_y: Any,
    x_y: Any,
    weighted_sum: Any,
    where: Any = None,
    log: Any = None,
    target_excluded: bool = False,
) -> tuple[Any, Any]:
    """(per-element loss, gradient row coefficient) for an integer label y.

    Statistics, all relative to the row maximum m:

    - ``log_sum_exp``: log Σ_c exp(x_c − m) over the valid classes (so L = m + log_sum_exp);
    - ``w_y``: the target's class weight; ``x_y``: x_y − m;
    - ``weighted_sum``: Σ_c w_c (x_c − m) over the valid classes with w_c ≠ 0 (only read when b ≠ 0); with
      ``target_excluded``, over those classes other than y.

    With A = a·w_y + b·W and B = a·w_y·(x_y − m) + b·Σ_c w_c (x_c − m)::

        loss = A·(L − m) − B + s·w_y·L² − [normalize]·H_w(q),   −H_w(q) = w_y·xlogx(a + b) + (W − w_y)·xlogx(b)
        coef = A + 2·s·w_y·L

    When q_y = a + b = 0 (``k.empty_target``) the target class contributes nothing, even against x_y = −inf:
    engines then pass ``target_excluded=True`` with the sum over the other classes, and the loss is
    b·((W − w_y)·(L − m) − Σ_{c≠y} w_c (x_c − m)) (plus the z-loss), which never reads x_y.
    """
    big_w = k.total_weight
    if target_excluded:
        if not k.empty_target:
            raise ValueError("target_excluded is only for a target class without mass (q_y = a + b = 0)")
        loss = scaled(k.b, (big_w - w_y) * log_sum_exp - weighted_sum, where=where)
        coef = scaled(k.b, big_w - w_y, where=where)
        if k.z != 0:
            lse = row_max + log_sum_exp
            loss = loss + k.z * w_y * lse * lse
            coef = coef + (2 * k.z) * w_y * lse
        if k.normalize:
            loss = loss + (big_w - w_y) * xlogx(k.b, where=where, log=log)
        return loss, coef
    # a target of weight 0 contributes nothing, even against x_y = −inf (no 0·∞)
    target_term = w_y * (log_sum_exp - x_y)
    if isinstance(w_y, numbers.Real):
        target_term = target_term if w_y != 0 else 0.0
    elif where is not None:
        target_term = where(w_y != 0, target_term, 0.0 * w_y)
    loss = scaled(k.a, target_term, where=where)
    loss = loss + scaled(k.b, big_w * log_sum_exp - weighted_sum, where=where)
    coef = scaled(k.a, w_y, where=where) + scaled(k.b, big_w, where=where)
    if k.z != 0:
        lse = row_max + log_sum_exp
        loss = loss + k.z * w_y * lse * lse
        coef = coef + (2 * k.z) * w_y * lse
    if k.normalize:
        loss = loss + w_y * xlogx(k.a + k.b, where=where, log=log) + (big_w - w_y) * xlogx(k.b, where=where, log=log)
    return loss, coef


def probability_row(
    k: RowCoefficients,
    *,
    log_sum_exp: Any,
    row_max: Any,
    target_mass: Any,
    weighted_sum: Any,
    weighted_xlogx: Any = None,
) -> tuple[Any, Any]:
    """(per-element loss, gradient row coefficient) for a probability target t, q = a·t + b.

    Statistics, relative to the row maximum m, over the valid classes with w_c·q_c ≠ 0 (so a NaN q_c makes
    the loss NaN and a negative q_c counts, linearly, as in torch):

    - ``log_sum_exp``: log Σ_c exp(x_c − m);  ``target_mass``: A = Σ_c w_c q_c;
    - ``weighted_sum``: B = Σ_c w_c q_c (x_c − m);  ``weighted_xlogx``: Σ_c w_c·xlogx(q_c) (with normalize).

    ::

        loss = A·(L − m) − B + s·L² + [normalize]·Σ_c w_c q_c log q_c,      coef = A + 2·s·L
    """
    loss = target_mass * log_sum_exp - weighted_sum
    coef = target_mass
    if k.z != 0:
        lse = row_max + log_sum_exp
        loss = loss + k.z * lse * lse
        coef = coef + (2 * k.z) * lse
    if k.normalize and weighted_xlogx is not None:  # callers after the coefficient alone may omit it
        loss = loss + weighted_xlogx
    return loss, coef


def merge_max(row_max: Any, other_max: Any, *, maximum: Any) -> Any:
    """The common maximum of two chunks' row maxima; each chunk then re-shifts its statistics with
    :func:`reshift` (sums of exponentials scale by exp(m_j − m), sums of shifted logits add W_j·(m_j − m))."""
    return maximum(row_max, other_max)


def reshift(
    row_max: Any, new_max: Any, *, sum_exp: Any = None, shifted_sum: Any = None, weight_total: Any = None, exp: Any
) -> tuple[Any, Any]:
    """A chunk's statistics taken relative to ``row_max`` re-expressed relative to ``new_max`` (>= row_max).

    ``sum_exp`` (Σ exp(x − m_j)) becomes Σ exp(x − m); ``shifted_sum`` (Σ v_c (x_c − m_j)) becomes
    Σ v_c (x_c − m) with ``weight_total`` = Σ v_c. Either may be None (then None is returned for it).
    """
    delta = row_max - new_max
    new_sum = None if sum_exp is None else sum_exp * exp(delta)
    new_shifted = None if shifted_sum is None else shifted_sum + weight_total * delta
    return new_sum, new_shifted


def reduction_scale(reduction: str, denominator: Any, *, where: Any = None) -> Any:
    """The factor that turns per-element gradients into the reduction's: 1, or 1/D for the mean (0 when
    D = 0: the gradient of an empty mean is zero)."""
    if reduction != "mean":
        return 1.0
    if isinstance(denominator, numbers.Real):
        return 1.0 / denominator if denominator != 0 else 0.0
    nonzero = denominator != 0
    return where(nonzero, 1.0 / where(nonzero, denominator, 1.0 + 0.0 * denominator), 0.0 * denominator)


def reduce_total(reduction: str, total: Any, denominator: Any, empty_mean: str, *, where: Any = None) -> Any:
    """Σ loss for ``"sum"``; Σ loss / D for ``"mean"``, with ``empty_mean`` (NaN or 0) where D = 0."""
    if reduction == "sum":
        return total
    empty = math.nan if empty_mean == "nan" else 0.0
    if isinstance(denominator, numbers.Real):
        if isinstance(total, numbers.Real):
            return total / denominator if denominator != 0 else empty
        return total / denominator if denominator != 0 else empty + 0.0 * total
    nonzero = denominator != 0
    return where(nonzero, total / where(nonzero, denominator, 1.0 + 0.0 * denominator), empty + 0.0 * total)
