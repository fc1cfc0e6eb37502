"""``lsx identify``: which label-smoothed cross-entropy does a hand-written loss compute?

The callable is probed with crafted float64 inputs. For logits that are zero except one entry, the lsx loss
of one element is ``Q·(L − L₀) − R_c·t + S·(L² − L₀²)`` plus a constant, where L is the log-sum-exp,
``R_c = w_c q_c`` (weighted smoothed target, over the mean's denominator), ``Q = Σ_c R_c`` and S the z-loss
coefficient; two values of t give ``R_c`` and ``Q`` exactly, and a uniform shift of the logits gives S.
Reading R for every label at K = 5 and K = 7 tells ε from ε/K vs ε/(K−1), weights from the columns,
and the reduction from how one element's share changes when rows are added. The inferred options are then
checked against :func:`lsx.spec.reference_loss` on random inputs; what does not fit is reported with numbers.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lsx import spec

T = 1.5  # probe step for one logit
U = 1.0  # probe shift of a whole row
KS = (5, 7)  # two class counts tell ε/K from ε/(K−1)
IGNORE_CANDIDATES = (-100, -1)
TOL = 1e-5  # relative deviation accepted as equal (user code may accumulate in float32)


class ProbeError(Exception):
    """The callable cannot be loaded, called, or returns something that is not a loss."""


# --------------------------------------------------------------------------------------------------------
# Loading and calling
# --------------------------------------------------------------------------------------------------------
#: constructor parameters that mean the number of classes: given the probe's K (one instance per K)
CLASS_COUNT_NAMES = frozenset(
    {
        "classes",
        "num_classes",
        "n_classes",
        "nclasses",
        "n_class",
        "num_class",
        "class_num",
        "classes_num",
        "vocab_size",
        "n_vocab",
        "vocab",
        "size",
        "k",
        "n_labels",
        "num_labels",
        "out_features",
        "n_cls",
        "cls",
    }
)
#: constructor parameters that mean ε: without a default they get PROBE_SMOOTHING (reported)
SMOOTHING_NAMES = frozenset(
    {
        "smoothing",
        "label_smoothing",
        "eps",
        "epsilon",
        "ls",
        "alpha",
        "smooth",
        "smoothing_factor",
        "ls_eps",
        "label_smoothing_factor",
        "smoothing_rate",
    }
)
PROBE_SMOOTHING = 0.1


def parse_init(text: str | None) -> dict[str, Any]:
    """``--init 'classes=5, smoothing=0.1'`` → keyword arguments; values must be Python literals."""
    if not text or not text.strip():
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        raise ProbeError(f"--init must be keyword arguments such as 'classes=5, smoothing=0.1', got {text!r}") from None
    if not isinstance(call, ast.Call) or call.args or any(kw.arg is None for kw in call.keywords):
        raise ProbeError(f"--init takes keyword arguments only (name=value, ...), got {text!r}")
    kwargs = {}
    for kw in call.keywords:
        try:
            kwargs[kw.arg] = ast.literal_eval(kw.value)
        except ValueError:
            raise ProbeError(
                f"--init value of {kw.arg} must be a literal (number, string, tuple, list, dict, True/False/None), "
                f"got {ast.unparse(kw.value)!r}"
            ) from None
    return kwargs


class Constructed:
    """A loss class built with the caller's keyword arguments and the inferred ones.

    When the class count is inferred, one instance per K is built (each with the K of the logits it is
    called with), so the probes at different K see a loss that knows its K. ``notes`` says what was inferred.
    """

    def __init__(self, cls: type, kwargs: dict[str, Any], class_param: str | None, notes: list[str]):
        self.cls, self.kwargs, self.class_param, self.notes = cls, kwargs, class_param, notes
        self._instances: dict[int | None, Any] = {}

    def signature_text(self) -> str:
        parts = [f"{n}={v!r}" for n, v in self.kwargs.items()]
        if self.class_param:
            parts.append(f"{self.class_param}=K")
        return f"{self.cls.__name__}({', '.join(parts)})"

    def instance(self, k: int | None) -> Any:
        key = k if self.class_param else None
        if key not in self._instances:
            kwargs = dict(self.kwargs)
            if self.class_param:
                kwargs[self.class_param] = k
            try:
                self._instances[key] = self.cls(**kwargs)
            except Exception as exc:
                args = ", ".join(f"{n}={v!r}" for n, v in kwargs.items())
                raise ProbeError(f"cannot instantiate {self.cls.__name__}({args}): {_one_line(exc)}") from None
            if not callable(self._instances[key]):
                raise ProbeError(f"{self.cls.__name__} instances are not callable")
        return self._instances[key]

    def __call__(self, logits: Any, labels: Any) -> Any:
        return self.instance(int(logits.shape[-1]) if self.class_param else None)(logits, labels)


def _construct(cls: type, name: str, given: dict[str, Any]) -> Constructed:
    """Build ``cls`` from ``given`` plus what can be inferred; a required argument that cannot is an error."""
    try:
        parameters = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        parameters = []
    named = {p.name: p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters)
    unknown = [n for n in given if n not in named and not takes_any]
    if unknown:
        raise ProbeError(
            f"{name}() takes no argument {', '.join(unknown)} (its parameters: {', '.join(named) or 'none'})"
        )
    kwargs, class_param, notes, missing = dict(given), None, [], []
    for p in named.values():
        if p.name in given or p.default is not p.empty:
            continue
        lowered = p.name.lower()
        if lowered in CLASS_COUNT_NAMES and class_param is None:
            class_param = p.name
            notes.append(f"{p.name} = the probe's class count K (one instance per K)")
        elif lowered in SMOOTHING_NAMES:
            kwargs[p.name] = PROBE_SMOOTHING
            notes.append(
                f"{p.name}={PROBE_SMOOTHING} is a probe value (it has no default): the ε found is the one passed"
            )
        elif p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            missing.append(p.name)
    if missing:
        example = ", ".join(f"{m}=..." for m in missing)
        raise ProbeError(
            f"cannot instantiate {name}(): no value for {', '.join(missing)}; pass it with --init '{example}'"
        )
    constructed = Constructed(cls, kwargs, class_param, notes)
    constructed.instance(KS[0])  # fail here, with the arguments, if it cannot be built
    return constructed


def load(target: str, init: str | dict[str, Any] | None = None) -> tuple[Callable, str]:
    """``FILE.py:NAME`` → the callable and a label.

    A class is instantiated with ``init`` (keyword arguments, or their text as ``--init`` takes it), a class
    count parameter set to the probe's K and a smoothing parameter without default set to a probe value.
    """
    given = parse_init(init) if isinstance(init, str) or init is None else dict(init)
    path, sep, name = target.rpartition(":")
    if not sep or not path or not name:
        raise ProbeError(f"expected FILE.py:NAME, got {target!r}")
    if not os.path.isfile(path):
        raise ProbeError(f"no such file: {path}")
    module_name = f"_lsx_identify_{abs(hash(os.path.abspath(path)))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise ProbeError(f"cannot import {path} (not a Python file?)")
    module = importlib.util.module_from_spec(module_spec)
    folder = os.path.dirname(os.path.abspath(path))
    sys.path.insert(0, folder)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise ProbeError(f"importing {path} raised {_one_line(exc)}") from None
    finally:
        if sys.path and sys.path[0] == folder:
            sys.path.pop(0)
    obj: Any = module
    for part in name.split("."):
        if not hasattr(obj, part):
            names = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_"))
            raise ProbeError(f"{path} has no {name!r} (callables there: {', '.join(names) or 'none'})")
        obj = getattr(obj, part)
    label = f"{os.path.basename(path)}:{name}"
    if inspect.isclass(obj):
        obj = _construct(obj, name, given)
        label = f"{os.path.basename(path)}:{obj.signature_text()}"
    elif given:
        raise ProbeError(f"--init is for classes; {name} is a {type(obj).__name__}")
    if not callable(obj):
        raise ProbeError(f"{name} in {path} is a {type(obj).__name__}, not a function or callable class")
    return obj, label


def _one_line(exc: BaseException) -> str:
    lines = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


class CallError(Exception):
    """The callable raised on one probe (kept apart: some probes are expected to raise)."""


class Caller:
    """Calls ``fn(logits, labels)`` with arrays of one framework; returns the output as float64 NumPy."""

    def __init__(self, fn: Callable, framework: str):
        self.fn, self.framework, self.calls = fn, framework, 0
        if framework == "torch":
            import torch

            self._convert = lambda x, y: (torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.int64))
        elif framework == "jax":
            import jax

            jax.config.update("jax_enable_x64", True)
            import jax.numpy as jnp

            self._convert = lambda x, y: (jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.int64))
        else:
            self._convert = lambda x, y: (np.asarray(x, np.float64), np.asarray(y, np.int64))

    def __call__(self, logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
        self.calls += 1
        x, y = self._convert(logits, labels)
        try:
            out = self.fn(x, y)
        except Exception as exc:
            raise CallError(_one_line(exc)) from exc
        self.output_module = type(out).__module__.split(".")[0]
        return _to_numpy(out, len(labels))


def _returned_text(out: Any) -> str:
    """What a callable returned, in words: ``None``, a tuple of 2 (Tensor, float), a str 'abc'…"""
    if out is None:
        return "None (a missing `return`?)"
    if isinstance(out, (tuple, list)):
        kinds = ", ".join(type(item).__name__ for item in out[:4]) + (", …" if len(out) > 4 else "")
        return f"a {type(out).__name__} of {len(out)} ({kinds})"
    if isinstance(out, dict):
        return f"a dict with keys {', '.join(map(repr, list(out)[:4]))}{', …' if len(out) > 4 else ''}"
    if isinstance(out, (str, bytes)):
        return f"a {type(out).__name__} {out[:40]!r}"
    return f"a {type(out).__name__}"


def _to_numpy(out: Any, n: int) -> np.ndarray:
    expected = f"expected the loss: a scalar, or one value per element ({n},)"
    if out is None or isinstance(out, (tuple, list, dict, str, bytes)):
        raise ProbeError(f"it returned {_returned_text(out)}; {expected}")
    if hasattr(out, "detach"):
        out = out.detach().cpu()
        if hasattr(out, "double"):
            out = out.double()
    try:
        value = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProbeError(f"it returned {_returned_text(out)}, not a number or an array of losses; {expected}") from None
    if value.shape not in ((), (n,)):
        raise ProbeError(
            f"it returned {_returned_text(out)} of shape {value.shape} for {n} elements (not a loss); {expected}"
        )
    return value


def make_caller(fn: Callable, framework: str | None) -> Caller:
    """The framework ``fn`` accepts: the one given, or the first of torch, jax, numpy that works."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 5)), np.arange(5)
    if framework is not None:
        caller = Caller(fn, framework)
        try:
            caller(x, y)
        except CallError as exc:
            raise ProbeError(f"calling it with {framework} arrays (logits (5, 5), labels (5,)) raised {exc}") from None
        except ProbeError as exc:
            raise ProbeError(f"called with {framework} arrays (logits (5, 5), labels (5,)), {exc}") from None
        return caller
    errors, returned = [], []
    # NumPy arrays before JAX ones: a JAX function accepts them too, and says so by returning a jax.Array
    for name in ("torch", "numpy", "jax"):
        if importlib.util.find_spec(name) is None:
            continue
        try:
            caller = Caller(fn, name)
            caller(x, y)
            if name == "numpy" and caller.output_module in ("jax", "jaxlib"):
                caller = Caller(fn, "jax")
                caller(x, y)
            return caller
        except CallError as exc:
            errors.append(f"{name}: {exc}")
        except ProbeError as exc:  # it ran, and returned something that is not a loss: that is the news
            returned.append(f"called with {name} arrays (logits (5, 5), labels (5,)), {exc}")
    if returned:
        raise ProbeError(returned[0])
    raise ProbeError("it could not be called with logits (5, 5) and labels (5,): " + "; ".join(errors))


# --------------------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------------------
def _lse_one(k: int, t: float) -> float:
    """Log-sum-exp of a row that is zero but for one entry t."""
    return math.log(k - 1 + math.exp(t))


@dataclass
class Rows:
    """Per-row coefficients read at zero logits (divided by the batch's denominator)."""

    R: np.ndarray  # (rows, K): w_c q_c
    Q: np.ndarray  # (rows,) from the curvature; Σ_c R_c for an lsx loss
    S: np.ndarray  # (rows,) z-loss coefficient
    constant: float  # the loss at zero logits minus the linear and z parts (the entropy term, summed)
    base: float  # the (summed) output at zero logits


class Prober:
    def __init__(self, caller: Caller):
        self.call = caller
        self.k = KS[0]  # the class count of the next probes

    def total(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        out = self.call(x, y)
        if not np.all(np.isfinite(out)):
            raise ProbeError(f"returned a non-finite loss {out} for finite logits and labels {y.tolist()}")
        return out

    def rows(self, labels: list[int], probe: list[int] | None = None) -> Rows:
        """R, Q, S of the rows ``probe`` (default: all) in a batch of zero logits with ``labels``."""
        y = np.asarray(labels)
        n, k = len(labels), self.k
        probe = list(range(n)) if probe is None else probe
        x0 = np.zeros((n, k))
        base = self.total(x0, y)
        vector = base.ndim == 1
        l0 = math.log(k)
        R, Q, S = np.zeros((len(probe), k)), np.zeros(len(probe)), np.zeros(len(probe))

        def delta(row: int, x_row: np.ndarray) -> float:
            if vector:
                x = np.zeros((n, k))
                x[row] = x_row
                return float(self.total(x, y)[row] - base[row])
            x = x0.copy()
            x[row] = x_row
            return float(self.total(x, y) - base)

        for j, row in enumerate(probe):
            S[j] = delta(row, np.full(k, U)) / ((l0 + U) ** 2 - l0**2)
            q_each = []
            for c in range(k):
                e = {}
                for t in (T, -T):
                    x_row = np.zeros(k)
                    x_row[c] = t
                    lse = _lse_one(k, t)
                    e[t] = delta(row, x_row) - S[j] * (lse**2 - l0**2)
                a_plus, a_minus = _lse_one(k, T) - l0, _lse_one(k, -T) - l0
                q = (e[T] + e[-T]) / (a_plus + a_minus)
                R[j, c] = (q * a_plus - e[T]) / T
                q_each.append(q)
            Q[j] = float(np.mean(q_each))
        total_base = float(np.sum(base[probe])) if vector else float(base)
        constant = total_base - float(np.sum(Q * l0 + S * l0**2)) if (vector or len(probe) == n) else math.nan
        return Rows(R, Q, S, constant, total_base)

    def gain(self, labels: list[int], row: int = 0) -> float:
        """How much the output moves when logit (row, label) moves: 1/denominator up to a constant factor."""
        y = np.asarray(labels)
        x = np.zeros((len(labels), self.k))
        base = self.total(x, y)
        x[row, labels[row] if labels[row] >= 0 else 0] = T
        moved = self.total(x, y)
        return float((moved - base) if base.ndim == 0 else (moved[row] - base[row]))


# --------------------------------------------------------------------------------------------------------
# Inference
# --------------------------------------------------------------------------------------------------------
@dataclass
class Finding:
    topic: str
    text: str
    ok: bool = True  # False: lsx cannot express this
    scope: str = "all"  # "ignored": only elements with an ignored or out-of-range label are concerned
    label: int | None = None  # the label concerned (scope "ignored")


@dataclass
class Result:
    framework: str
    options: dict[str, Any]  # the closest lsx options (weight as a list)
    call: str
    conventions: list[str]  # those that alone (``convention=name``, no other option) reproduce it, checked
    findings: list[Finding]
    checks: list[dict[str, Any]]  # verification on random inputs: name, output, lsx, deviation
    matches: bool
    verdict: str  # "exact", "valid labels only" (differs only where labels are ignored/out of range), "differs"
    deviation: float  # the largest check deviation: |its output − lsx| in units of one element's mean loss
    valid_deviation: float = 0.0  # the same over the checks with labels in [0, K) only
    calls: int = 0
    name: str = ""
    #: when no convention reproduces it alone: the conventions that do with the fewest options added
    convention_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["findings"] = [f.__dict__ for f in self.findings]
        out["where"] = where_it_differs(self)
        return out


def identify(fn: Callable, framework: str | None = None) -> Result:
    caller = make_caller(fn, framework)
    prober = Prober(caller)
    findings: list[Finding] = []
    details: dict[str, Any] = {}

    # ---- per-row structure at two class counts
    for note in getattr(fn, "notes", []):
        findings.append(Finding("constructor", note))
    ks = _class_counts(caller)
    if len(ks) == 1:
        findings.append(Finding("classes", f"it only accepts K={ks[0]} classes (internal per-class weights?)"))
    per_k = {}
    for k in ks:
        prober.k = k
        per_k[k] = prober.rows(list(range(k)))
    k0 = ks[0]
    prober.k = k0
    vector = np.ndim(prober.total(np.zeros((k0, k0)), np.arange(k0))) == 1
    details["vector_output"] = bool(vector)

    # labels whose rows are all zero are ignored (a pad index inside [0, K))
    zero_labels = [
        c for c in range(k0) if all(np.max(np.abs(per_k[k].R[c])) < 1e-9 and abs(per_k[k].S[c]) < 1e-9 for k in ks)
    ]
    fits = {k: _fit_rows(per_k[k].R, zero_labels) for k in ks}
    fit = fits[k0]
    # the probe's precision: how far apart two readings of one quantity are (float32 user code: ~1e-7)
    precision = _precision(fits, ks)
    details["precision"] = precision
    details["R"] = {k: np.round(per_k[k].R, 8).tolist() for k in ks}

    # ---- weights
    d = fit["diag"]
    rel_w = d / d[d > 0][0] if np.any(d > 0) else np.ones_like(d)  # relative to the first weighted class
    weighted = bool(np.ptp(rel_w[_active(k0, zero_labels)]) > 1e-6)
    if not fit["ok"]:
        findings.append(Finding("weights", fit["why"], ok=False))
    elif weighted:
        findings.append(Finding("weights", "class weights w_c on every term (Σ_c w_c q_c (LSE − x_c)), as torch"))

    # ---- smoothing: b/(a+b) at each K → ε for both spreads
    eps = {}
    for k in ks:
        rho = fits[k]["rho"]
        b = rho / (1 + (k - 1) * rho)
        eps[k] = {"all": k * b, "others": (k - 1) * b}
    details["eps"] = eps
    if max(eps[k]["all"] for k in ks) < 1e-7:
        spread, epsilon = "all", 0.0
        findings.append(Finding("smoothing", "no label smoothing (ε = 0)" + _zero_smoothing_hint(fn)))
    elif len(ks) == 1:
        spread, epsilon = "all", _nice(eps[k0]["all"], precision)
        findings.append(
            Finding(
                "smoothing",
                f"ε = {epsilon:g} as ε/K on every class, or ε = {_nice(eps[k0]['others'], precision):g} as ε/(K−1) on the others "
                f"(the same target at one K; it takes no other K to tell them apart)",
            )
        )
    else:
        KS = ks
        gaps = {s: abs(eps[KS[0]][s] - eps[KS[1]][s]) for s in ("all", "others")}
        spread = min(gaps, key=gaps.get)  # type: ignore[arg-type]
        reading = float(np.mean([eps[k][spread] for k in KS]))
        precision = max(precision, gaps[spread] / max(reading, 1e-12))
        details["precision"] = precision
        epsilon = _nice(reading, precision)
        where = "ε/K on every class" if spread == "all" else "ε/(K−1) on the other classes, 1−ε on the label"
        if gaps[spread] > 1e-6 * max(1.0, epsilon) * 10:
            findings.append(
                Finding(
                    "smoothing",
                    f"the smoothing mass follows neither ε/K nor ε/(K−1): as ε/K it is ε={eps[KS[0]]['all']:.6g} at "
                    f"K={KS[0]} but ε={eps[KS[1]]['all']:.6g} at K={KS[1]}; as ε/(K−1) ε={eps[KS[0]]['others']:.6g} vs "
                    f"{eps[KS[1]]['others']:.6g}",
                    ok=False,
                )
            )
        else:
            findings.append(Finding("smoothing", f"ε = {epsilon:g}, spread={spread!r}: {where}"))

    # ---- reduction and denominator
    prober.k = k0
    reduction, denominator = _reduction(prober, vector, weighted, rel_w, zero_labels, findings)
    details["denominator"] = denominator

    # ---- ignore index
    ignore_index, empty_mean = _ignore(prober, vector, reduction, zero_labels, fit, findings)
    # ---- an empty batch (no elements at all): what a mean of nothing gives
    edge_inputs = _edge_inputs(prober, k0, ignore_index)
    if reduction == "mean" and empty_mean is None:
        for _, y, out in edge_inputs:
            if len(y) == 0 and out is not None and (np.isnan(out) or out == 0):
                empty_mean = "nan" if np.isnan(out) else "zero"
                findings.append(Finding("empty batch", f"an empty batch gives {'NaN' if np.isnan(out) else '0'}"))

    # ---- absolute scale: weights, z-loss, the entropy term
    rows = per_k[k0]
    active = _active(k0, zero_labels)
    n_active = len(active)
    if reduction == "mean" and weighted:
        scale = float(np.sum(rel_w[active]))  # D = Σ w_y over active labels, weights relative
        weights = rel_w
    else:
        scale = {"none": 1.0, "sum": 1.0, "mean": float(n_active)}[reduction]
        target_q = 1 / (1 + (k0 - 1) * fit["rho"])  # q_y of a target that sums to 1
        weights = d * scale / target_q if weighted else None
    if not weighted:
        sigma = float(np.mean(rows.Q[active]) * scale)
        details["target_sum"] = sigma
        if abs(sigma - 1) > 1e-5:
            findings.append(
                Finding(
                    "normalisation",
                    f"the smoothed target sums to {sigma:.6g}, not 1 (the loss is lsx's × {sigma:.6g}; an ε/K slip?)",
                    ok=False,
                )
            )
    w_rows = np.ones(k0) if weights is None else np.asarray(weights)
    z = [rows.S[y] * scale / w_rows[y] for y in active if w_rows[y] > 0]
    z_loss = _nice(float(np.median(z)), precision) if z else 0.0
    if abs(z_loss) < 1e-9:
        z_loss = 0.0
    else:
        findings.append(Finding("z-loss", f"z-loss {z_loss:g}·w_y·LSE² per element"))

    options: dict[str, Any] = {"label_smoothing": epsilon, "spread": spread}
    if weights is not None:
        options["weight"] = [float(_nice(v, precision)) for v in weights]
    options.update(ignore_index=ignore_index, z_loss=max(z_loss, 0.0), reduction=reduction)
    if empty_mean is not None:
        options["empty_mean"] = empty_mean
    # KL form: the constant at zero logits is −Σ w q log q (summed over rows, over the denominator)
    options["normalize"] = False
    if rows.constant == rows.constant:
        entropy = _entropy_term(options, k0, active) / scale
        if abs(rows.constant) > 1e-7 and abs(rows.constant - entropy) < 1e-6 * max(1.0, abs(entropy)):
            options["normalize"] = True
            findings.append(
                Finding(
                    "KL form",
                    "subtracts the target's entropy H_w(q) = −Σ_c w_c q_c log q_c, i.e. adds "
                    "Σ_c w_c q_c log q_c (KL form, minimum 0)",
                )
            )
        elif abs(rows.constant) > 1e-6:
            findings.append(Finding("constant", f"adds a constant {rows.constant:.6g} at zero logits", ok=False))

    for x, y, out in edge_inputs:
        if out is not None and not _reproduces(options, [(x, y, out)]):
            what = "an empty batch" if len(y) == 0 else f"a batch whose labels are all {ignore_index}"
            findings.append(
                Finding(
                    "empty batch",
                    f"{what} gives {_short(np.asarray(out).tolist())}; lsx gives NaN or 0",
                    ok=False,
                    scope="ignored",
                )
            )
    special = [] if ignore_index is None else [ignore_index]
    special += [f.label for f in findings if not f.ok and f.label is not None and f.label not in special]
    inputs: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    checks = _verify(prober, options, special, ks, inputs)
    deviation = max((c["deviation"] for c in checks), default=0.0)
    matches = deviation <= TOL and all(f.ok for f in findings)
    valid_deviation = max((c["deviation"] for c in checks if not c.get("ignored")), default=0.0)
    if matches:
        verdict = "exact"
    elif valid_deviation <= TOL and all(f.ok for f in findings if f.scope != "ignored"):
        verdict = "valid labels only"
    else:
        verdict = "differs"
    call = _call_text(caller.framework, options)
    conventions = _conventions(options, inputs + edge_inputs) if matches else {}
    return Result(
        framework=caller.framework,
        options=options,
        call=call,
        conventions=[name for name, extra in conventions.items() if not extra],
        convention_options={name: extra for name, extra in conventions.items() if extra},
        findings=findings,
        checks=checks,
        matches=matches,
        verdict=verdict,
        deviation=deviation,
        valid_deviation=valid_deviation,
        calls=caller.calls,
        details=details,
    )


def _zero_smoothing_hint(fn: Callable) -> str:
    """At ε = 0 the spread (ε/K or ε/(K−1)) cannot be seen: how to probe again with a nonzero ε."""
    cls = fn.cls if isinstance(fn, Constructed) else fn
    try:
        parameters = inspect.signature(cls).parameters.values()
    except (TypeError, ValueError):
        parameters = []
    names = [p.name for p in parameters if p.name.lower() in SMOOTHING_NAMES]
    if isinstance(fn, Constructed):
        name = names[0] if names else "smoothing"
        given = "".join(f", {n}={v!r}" for n, v in fn.kwargs.items() if n != name)
        prefix = "its " if names else "if it takes a smoothing argument, "
        value = fn.kwargs.get(name, next((p.default for p in parameters if p.name == name), 0))
        return (
            f"; {prefix}{name}={value!r} hides how it spreads ε (ε/K or ε/(K−1)): run again with "
            f"--init '{name}={PROBE_SMOOTHING}{given}' to see it"
        )
    if names:
        return (
            f"; its default {names[0]}=0 hides how it spreads ε (ε/K or ε/(K−1)): identify a wrapper that passes "
            f"{names[0]}={PROBE_SMOOTHING} to see it"
        )
    return ""


def _class_counts(caller: Caller) -> list[int]:
    """Two class counts the callable accepts (5 and 7 unless it fixes K), or the one it accepts."""
    rng = np.random.default_rng(1)

    def works(k: int) -> bool:
        try:
            caller(rng.normal(size=(k, k)), np.arange(k))
            return True
        except CallError:
            return False

    first = next((k for k in (*KS, *range(2, 65)) if works(k)), None)
    if first is None:
        raise ProbeError("it accepts no class count K from 2 to 64 with K elements labelled 0..K−1")
    second = next((k for k in (*KS, first + 2, first + 1) if k != first and k >= 3 and works(k)), None)
    return [first] if second is None else [first, second]


def _active(k: int, zero_labels: list[int]) -> list[int]:
    return [c for c in range(k) if c not in zero_labels]


#: the finest relative precision a reading is trusted to (float64 probes of float64 code)
FINEST = 1e-9
#: a reading is rounded to the shortest decimal within this many times the probe's precision
ROUNDING = 10.0


def _precision(fits: dict[int, dict[str, Any]], ks: list[int]) -> float:
    """Relative precision of the fitted values: the fits' misfit, at least FINEST, at most 1e-3."""
    misfit = max(float(fits[k]["residual"]) for k in ks)
    return float(min(max(misfit, FINEST), 1e-3))


def _nice(value: float, precision: float = FINEST) -> float:
    """The shortest decimal within ROUNDING × ``precision`` (relative) of ``value``: a loss that sums in
    float32 gives ε = 0.0999997 through the probes, which reads as 0.1."""
    if not value or not math.isfinite(value):
        return 0.0 if not value else value
    tolerance = ROUNDING * max(precision, FINEST) * abs(value)
    for digits in range(1, 16):
        rounded = float(f"{value:.{digits}g}")
        if abs(rounded - value) <= tolerance:
            return rounded
    return value


def _scale_text(k: int, batch: int) -> str:
    """The scale of coefficients read by the probes: one element's w_c·q_c over the batch's denominator."""
    return (
        f"one element's w_c·q_c read at K={k} in a batch of {batch}, divided by the mean's denominator if it is a mean"
    )


def _fit_rows(R: np.ndarray, zero_labels: list[int]) -> dict[str, Any]:
    """Fit R[y, c] = u_c (δ_yc + ρ (1 − δ_yc)): per-class weights on both terms; say why when it fails."""
    k = R.shape[1]
    active = _active(k, zero_labels)
    Ra = R[active]
    diag = np.array([R[c, c] if c in active else 0.0 for c in range(k)])
    off = np.array([np.mean([R[y, c] for y in active if y != c]) for c in range(k)])
    rho = float(np.dot(off[active], diag[active]) / max(np.dot(diag[active], diag[active]), 1e-300))
    for c in zero_labels:  # an ignored label has no row of its own: its weight shows in the other rows
        diag[c] = off[c] / rho if rho > 0 else float(np.mean(diag[active]))
    predicted = np.array([[diag[c] if c == y else rho * diag[c] for c in range(k)] for y in active])
    residual = float(np.max(np.abs(Ra - predicted)) / max(np.max(np.abs(Ra)), 1e-300))
    out = {"diag": diag, "off": off, "rho": rho, "residual": residual, "ok": residual < 1e-5, "why": ""}
    if not out["ok"]:
        off_mask = ~np.eye(k, dtype=bool)[active]
        off_values = Ra[off_mask]
        rows_const = all(
            np.ptp(Ra[i][np.arange(k) != y]) < 1e-7 * max(1, np.max(np.abs(Ra))) for i, y in enumerate(active)
        )
        if np.ptp(off_values) < 1e-7 * max(1.0, np.max(np.abs(Ra))) and np.ptp(diag[active]) > 1e-7:
            out["why"] = (
                f"class weights enter only the target (NLL) term; the smoothing term is unweighted "
                f"(off-target coefficients all {off_values[0]:.4g}, target ones {np.round(diag[active], 4).tolist()}, "
                f"{_scale_text(k, R.shape[0])}); "
                "lsx weights both terms"
            )
        elif rows_const and np.ptp(off[active]) > 1e-7:
            out["why"] = (
                "the whole element's loss is scaled by a weight of its label (w_y·CE(q)); lsx weights each class's term by w_c"
            )
        else:
            out["why"] = (
                f"the per-class coefficients do not have the form w_c·q_c (relative misfit {residual:.3g}, "
                f"{_scale_text(k, R.shape[0])})"
            )
    return out


def _reduction(prober, vector, weighted, rel_w, zero_labels, findings) -> tuple[str, str]:
    k = prober.k
    if vector:
        findings.append(Finding("reduction", "one loss per element (reduction='none')"))
        return "none", "none"
    base = list(range(k))
    g1 = prober.gain(base)
    g2 = prober.gain(base + base)
    ratio = g1 / g2  # D(2 copies) / D(1 copy)
    if abs(ratio - 1) < 1e-6:
        findings.append(Finding("reduction", "sum over elements (reduction='sum')"))
        return "sum", "sum"
    if abs(ratio - 2) > 1e-6:
        findings.append(
            Finding(
                "reduction", f"doubling the batch divides it by {ratio:.6g}: neither sum (1) nor mean (2)", ok=False
            )
        )
        return "mean", "other"
    if not weighted:
        findings.append(Finding("reduction", "mean over elements (reduction='mean')"))
        return "mean", "count"
    # weighted: one more element of the heaviest class tells Σ w_y from a count
    c = int(np.argmax(rel_w))
    active = _active(k, zero_labels)
    ratio = g1 / prober.gain(base + [c])
    by_weight = (np.sum(rel_w[active]) + rel_w[c]) / np.sum(rel_w[active])
    by_count = (len(active) + 1) / len(active)
    if abs(ratio - by_weight) < 1e-6:
        findings.append(Finding("reduction", "weighted mean: Σ loss / Σ w_y (as torch)"))
        return "mean", "weights"
    findings.append(
        Finding(
            "reduction",
            f"mean divides by the element count{'' if abs(ratio - by_count) < 1e-6 else ' (roughly)'}, not by Σ w_y "
            "as lsx (and torch) do for weighted losses",
            ok=False,
        )
    )
    return "mean", "count"


def _ignore(prober, vector, reduction, zero_labels, fit, findings) -> tuple[int | None, str | None]:
    """Find the label that marks ignored elements and how such elements are treated."""
    k = prober.k
    base = list(range(k))
    if zero_labels:
        label = zero_labels[0]
        findings.append(Finding("ignore", f"label {label} (inside [0, K)) is ignored: loss 0 (a padding index)"))
        return label, None
    rejected = []
    for value in IGNORE_CANDIDATES:
        try:
            probe = prober.rows([*base, value], probe=[k - 1, k])  # the last class's row, and the candidate's
        except CallError:
            rejected.append(str(value))
            continue
        last, r = probe.R
        size = max(1e-12, float(np.max(np.abs(last))))
        off = fit["off"]
        along_off = float(np.dot(r, off) / max(np.dot(off, off), 1e-300))
        clean = True
        if np.max(np.abs(r)) < 1e-9 * size and abs(probe.S[1]) < 1e-9 * size:
            how, ok = f"label {value} is ignored: loss 0", True
        elif np.max(np.abs(r - last)) < 1e-7 * size:
            findings.append(
                Finding(
                    "ignore",
                    f"label {value} is taken as class {k - 1} (the index wraps around); lsx raises ValueError",
                    ok=False,
                    scope="ignored",
                    label=value,
                )
            )
            continue
        elif np.max(np.abs(r)) < 1e-9 * size:
            how, ok, clean = (
                f"label {value} drops the cross-entropy but such elements still get the z-loss",
                False,
                False,
            )
        elif np.any(off > 0) and np.max(np.abs(r - along_off * off)) < 1e-6 * size:
            how = (
                f"label {value} drops the target term but such elements still get the smoothing term "
                f"(per-class coefficients {np.round(r, 5).tolist()}, {_scale_text(k, k + 1)}); lsx gives them loss 0"
            )
            ok, clean = False, False
        else:
            how = (
                f"label {value} gives an unexplained loss (coefficients {np.round(r, 5).tolist()}, "
                f"{_scale_text(k, k + 1)})"
            )
            ok, clean = False, False
        empty_mean = None
        if reduction == "mean":
            ratio = prober.gain(base) / prober.gain([*base, value])
            if abs(ratio - 1) < 1e-6:
                how += ", and leaves the mean's denominator"
            else:
                how += (
                    f", but changes the mean's denominator (×{ratio:.6g} with one such element; lsx leaves "
                    "them out: ×1)"
                )
                ok = False
            try:
                out = prober.call(np.zeros((2, k)), np.array([value, value]))
                empty_mean = "nan" if np.isnan(out) else "zero" if out == 0 else None
                if empty_mean:
                    how += f"; all ignored → {'NaN' if empty_mean == 'nan' else '0'}"
            except CallError:
                pass
        findings.append(Finding("ignore", how, ok=ok, scope="ignored", label=value))
        return (value if clean else None), empty_mean
    if rejected:
        findings.append(Finding("ignore", f"no ignore index: label(s) {', '.join(rejected)} rejected (raise)"))
    return None, None


def _entropy_term(options: dict[str, Any], k: int, active: list[int]) -> float:
    """Σ over rows with labels ``active`` of Σ_c w_c q_c log q_c, for the options."""
    opts = spec.resolve_options(**{n: v for n, v in options.items() if n not in ("weight", "normalize")})
    a, b = spec.smoothing_coefficients(opts, k)
    w = np.ones(k) if options.get("weight") is None else np.asarray(options["weight"])
    total = 0.0
    for y in active:
        q = np.full(k, b)
        q[y] += a
        total += float(np.sum(w * np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0)))
    return total


def _verify(
    prober: Prober, options: dict[str, Any], special: list[int], ks: list[int], inputs: list | None = None
) -> list[dict[str, Any]]:
    """The callable against lsx with ``options`` on random logits, other K, other N, and with each label in
    ``special`` (the ignore index, labels it treats its own way) mixed in.

    A check's ``deviation`` is |its output − lsx| in units of one element's mean loss (the mean of lsx's
    per-element |loss| over the non-ignored elements; a difference in a mean is first multiplied by the
    mean's denominator), so one element computed differently counts about 1, whatever the batch size.
    ``inputs``, when given, receives each ``(logits, labels, output)`` the callable answered.
    """
    rng = np.random.default_rng(7)
    k1 = ks[-1]
    k2 = ks[0] + 1 if len(ks) > 1 else ks[0]
    cases: list[tuple[str, int, int, int | None]] = [
        (f"random logits, K={ks[0]}", ks[0], 6, None),
        (f"random logits, K={k1}", k1, 4, None),
        (f"K={k2}, 9 elements", k2, 9, None),
    ]
    cases = [c for i, c in enumerate(cases) if c[0] not in [d[0] for d in cases[:i]]]  # one K: no repeats
    cases += [(f"K={k2} with label {label} elements", k2, 8, label) for label in special]
    checks = []
    base_options = dict(options)
    if base_options.get("weight") is not None:
        base_options["weight"] = np.asarray(base_options["weight"])
    for name, k, n, label in cases:
        if base_options.get("weight") is not None and len(base_options["weight"]) != k:
            continue  # internal weights fix K
        lsx_options, note = base_options, ""
        if label is not None and label != options.get("ignore_index"):
            lsx_options = dict(base_options, ignore_index=label)
            note = f"lsx rejects label {label} (ValueError); compared with those elements ignored"
        x = rng.normal(scale=2.0, size=(n, k))
        pool = [c for c in range(k) if c not in special]
        y = rng.choice(pool, size=n)
        rows: list[int] = []
        if label is not None:
            y[rng.random(n) < 0.4] = label
            y[0] = label
            rows = np.flatnonzero(y == label).tolist()
        check: dict[str, Any] = {"name": name, "ignored": label is not None, "label": label, "rows": rows, "n": n}
        if note:
            check["note"] = note
        checks.append(check)
        prober.k = k
        try:
            out = prober.call(x, y)
        except CallError as exc:
            check.update(error=str(exc), deviation=math.inf)
            continue
        if inputs is not None:
            inputs.append((x, y, out))
        try:
            expected = spec.reference_loss(x, y, **lsx_options)
            per_element = spec.reference_loss(x, y, **dict(lsx_options, reduction="none"))
        except (TypeError, ValueError) as exc:
            check.update(error=f"lsx: {exc}", deviation=math.inf)
            continue
        check.update(output=np.round(out, 6).tolist(), lsx=np.round(expected, 6).tolist())
        if np.shape(out) != np.shape(expected):
            check["deviation"] = math.inf
            continue
        ignore = lsx_options.get("ignore_index")
        active = np.ones(n, bool) if ignore is None else y != ignore
        scale = float(np.mean(np.abs(per_element[active]))) if active.any() else 1.0
        scale = scale if scale > 1e-12 else 1.0
        difference = np.abs(np.asarray(out) - expected)
        if lsx_options.get("reduction", "mean") == "mean":
            weight = lsx_options.get("weight")
            denominator = float(np.sum(weight[y[active]])) if weight is not None else float(active.sum())
            difference = difference * max(denominator, 1.0)
        check["deviation"] = float(np.max(difference) / scale) if difference.size else 0.0
        if np.ndim(out) == 1:
            check["differing_rows"] = np.flatnonzero(difference > TOL * scale).tolist()
    return checks


def where_it_differs(result: Result) -> list[str]:
    """One line per check that does not match: which input, which labels and rows, by how much."""
    lines = []
    for check in result.checks:
        if check["deviation"] <= TOL:
            continue
        text = check["name"]
        if check.get("label") is not None:
            text += f" (rows {_rows_text(check['rows'])} of {check['n']} have label {check['label']})"
        if "error" in check:
            lines.append(f"{text}: {check['error']}")
            continue
        if check.get("differing_rows"):
            text += f": rows {_rows_text(check['differing_rows'])} differ"
        text += (
            f": its output {_short(check['output'])}, lsx {_short(check['lsx'])}, deviation "
            f"{check['deviation']:.3g} × one element's mean loss"
        )
        if check.get("note"):
            text += f" ({check['note']})"
        lines.append(text)
    return lines


def _rows_text(rows: list[int]) -> str:
    return ", ".join(map(str, rows[:8])) + (", …" if len(rows) > 8 else "")


def _edge_inputs(prober: Prober, k: int, ignore_index: int | None) -> list[tuple[np.ndarray, np.ndarray, Any]]:
    """The callable's answers on an empty batch and on a batch whose labels are all ``ignore_index`` (the
    inputs where a mean has nothing to divide by), left out where it raises; and, when it has no ignore index,
    batches with the usual ignore labels that it rejects, with the output None (lsx must reject them too)."""
    batches = [(np.zeros((0, k)), np.zeros(0, np.int64))]
    if ignore_index is not None:
        batches.append((np.zeros((2, k)), np.full(2, ignore_index, np.int64)))
    answered: list[tuple[np.ndarray, np.ndarray, Any]] = []
    for x, y in batches:
        try:
            answered.append((x, y, prober.call(x, y)))
        except (CallError, ProbeError):
            pass
    if ignore_index is None:
        for label in IGNORE_CANDIDATES:
            x, y = np.zeros((2, k)), np.array([0, label], np.int64)
            try:
                prober.call(x, y)
            except CallError:
                answered.append((x, y, None))
            except ProbeError:
                pass
    return answered


def _reproduces(options: dict[str, Any], inputs: list[tuple[np.ndarray, np.ndarray, Any]]) -> bool:
    """lsx with ``options`` gives the callable's output on every input (NaN where it gives NaN), and raises
    where it raised (an output of None)."""
    if options.get("weight") is not None:
        options = dict(options, weight=np.asarray(options["weight"]))
    for x, y, out in inputs:
        try:
            expected = spec.reference_loss(x, y, **options)
        except (TypeError, ValueError):  # lsx rejects the input: so must the callable
            if out is None:
                continue
            return False
        if out is None:  # the callable rejects labels that lsx would quietly ignore
            return False
        if np.shape(out) != np.shape(expected) or not np.allclose(out, expected, rtol=TOL, atol=1e-9, equal_nan=True):
            return False
    return True


#: the options a convention may need added, in the order they are tried and printed
_CONVENTION_FIELDS = (
    "label_smoothing",
    "spread",
    "weight",
    "ignore_index",
    "z_loss",
    "normalize",
    "reduction",
    "empty_mean",
)


def _conventions(options: dict[str, Any], inputs: list[tuple[np.ndarray, np.ndarray, Any]]) -> dict[str, dict]:
    """Each convention that reproduces the callable, checked by evaluation on ``inputs``, with the fewest
    options to add (``{}``: ``convention=name`` alone does). With some convention working alone, only those
    are returned; otherwise those needing the fewest additions."""
    found: dict[str, dict[str, Any]] = {}
    for name in spec.CONVENTIONS:
        preset = spec.resolve_options(name)
        differing = {
            f: options[f]
            for f in _CONVENTION_FIELDS
            if f in options and (f == "weight" or getattr(preset, f) != options[f])
        }
        if not _reproduces(dict(differing, convention=name), inputs):
            continue
        for f in list(differing):  # drop what makes no difference (the spread at ε = 0, …)
            trial = {g: v for g, v in differing.items() if g != f}
            if _reproduces(dict(trial, convention=name), inputs):
                differing = trial
        found[name] = differing
    if not found:
        return {}
    fewest = min(len(extra) for extra in found.values())
    return {name: extra for name, extra in found.items() if len(extra) == fewest}


def _call_text(framework: str, options: dict[str, Any]) -> str:
    defaults = {
        "label_smoothing": 0.0,
        "spread": "all",
        "ignore_index": -100,
        "z_loss": 0.0,
        "normalize": False,
        "reduction": "mean",
        "empty_mean": "nan",
    }
    parts = []
    for name, value in options.items():
        if name == "weight":
            parts.append(f"weight={_array_text(framework, value)}")
        elif defaults.get(name, object()) != value:
            parts.append(f"{name}={value!r}")
    args = "logits, labels" + "".join(f", {p}" for p in parts)
    return f"lsx.{framework}.loss({args})"


def _convention_call(result: Result, name: str, extra: dict[str, Any]) -> str:
    parts = [f"convention={name!r}"]
    for option, value in extra.items():
        parts.append(f"weight={_array_text(result.framework, value)}" if option == "weight" else f"{option}={value!r}")
    return f"lsx.{result.framework}.loss(logits, labels, {', '.join(parts)})"


def _array_text(framework: str, values: list[float]) -> str:
    inner = ", ".join(f"{v:g}" for v in values)
    return {"torch": f"torch.tensor([{inner}])", "jax": f"jnp.array([{inner}])"}.get(framework, f"np.array([{inner}])")


# --------------------------------------------------------------------------------------------------------
def render(result: Result, console: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    console.print(f"[bold]{result.name}[/] ({result.framework}, {result.calls} probe calls)")
    for f in result.findings:
        mark = "[green]✓[/]" if f.ok else "[red]✗[/]"
        console.print(f"  {mark} {f.topic}: {escape(f.text)}")
    table = Table(title="checked against lsx on random inputs", title_justify="left")
    for col in ("input", "its output", "lsx", "deviation"):
        table.add_column(col, justify="left" if col == "input" else "right")
    for check in result.checks:
        if "error" in check:
            table.add_row(check["name"], "[red]" + escape(check["error"]) + "[/]", "", "")
            continue
        table.add_row(check["name"], _short(check["output"]), _short(check["lsx"]), f"{check['deviation']:.2g}")
    console.print(table)
    if result.matches:
        names = ", ".join(result.conventions)
        console.print(
            f"[bold green]verdict: lsx computes exactly this[/] (max deviation {result.deviation:.1e} × one "
            "element's mean loss)"
        )
        console.print(f"  {escape(result.call)}", soft_wrap=True)
        if names:
            console.print(
                f"  the same as convention(s) {names}, alone: e.g. {escape(_convention_call(result, result.conventions[0], {}))}",
                soft_wrap=True,
            )
        elif result.convention_options:
            console.print("  no convention alone reproduces it; with options added:", soft_wrap=True)
            for name, extra in result.convention_options.items():
                console.print(f"    {escape(_convention_call(result, name, extra))}", soft_wrap=True)
        else:
            console.print("  no convention reproduces it, even with options added", soft_wrap=True)
        return
    if result.verdict == "valid labels only":
        console.print(
            "[bold yellow]verdict: lsx computes the same for labels in [0, K)[/] (max deviation "
            f"{result.valid_deviation:.1e} × one element's mean loss there); it differs where labels are "
            "ignored or out of range. Closest:",
            soft_wrap=True,
        )
    else:
        console.print(
            f"[bold red]verdict: no lsx option set reproduces it[/] (max deviation {result.deviation:.3g} × "
            "one element's mean loss). Closest:",
            soft_wrap=True,
        )
    console.print(f"  {escape(result.call)}", soft_wrap=True)
    for f in result.findings:
        if not f.ok:
            console.print(f"  differs: {escape(f.text)}", soft_wrap=True)
    for line in where_it_differs(result):
        console.print(f"  where: {escape(line)}", soft_wrap=True)
    if not result.checks:
        console.print("  (no check could run)")


def _short(values: Any) -> str:
    if isinstance(values, list):
        flat = np.asarray(values).ravel()
        text = ", ".join(f"{v:.5g}" for v in flat[:4])
        return f"[{text}{', …' if flat.size > 4 else ''}]"
    return f"{values:.6g}"
