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
def load(target: str) -> tuple[Callable, str]:
    """``FILE.py:NAME`` → the callable (classes are instantiated with no arguments) and a label."""
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
    if inspect.isclass(obj):
        try:
            obj = obj()
        except Exception as exc:
            raise ProbeError(f"cannot instantiate {name}() with no arguments: {_one_line(exc)}") from None
    if not callable(obj):
        raise ProbeError(f"{name} in {path} is a {type(obj).__name__}, not a function or callable class")
    return obj, f"{os.path.basename(path)}:{name}"


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


def _to_numpy(out: Any, n: int) -> np.ndarray:
    if hasattr(out, "detach"):
        out = out.detach().cpu()
        if hasattr(out, "double"):
            out = out.double()
    try:
        value = np.asarray(out, dtype=np.float64)
    except (TypeError, ValueError):
        raise ProbeError(f"returned {type(out).__name__}, not a number or an array of losses") from None
    if value.shape not in ((), (n,)):
        raise ProbeError(f"returned an output of shape {value.shape} for {n} elements; expected a scalar or ({n},)")
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
        return caller
    errors = []
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
        except ProbeError as exc:
            errors.append(f"{name}: {exc}")
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


@dataclass
class Result:
    framework: str
    options: dict[str, Any]  # the closest lsx options (weight as a list)
    call: str
    conventions: list[str]
    findings: list[Finding]
    checks: list[dict[str, Any]]  # verification on random inputs: name, output, lsx, deviation
    matches: bool
    verdict: str  # "exact", "valid labels only" (differs only where labels are ignored/out of range), "differs"
    deviation: float
    calls: int = 0
    name: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        out["findings"] = [f.__dict__ for f in self.findings]
        return out


def identify(fn: Callable, framework: str | None = None) -> Result:
    caller = make_caller(fn, framework)
    prober = Prober(caller)
    findings: list[Finding] = []
    details: dict[str, Any] = {}

    # ---- per-row structure at two class counts
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
        c for c in range(k0)
        if all(np.max(np.abs(per_k[k].R[c])) < 1e-9 and abs(per_k[k].S[c]) < 1e-9 for k in ks)
    ]
    fits = {k: _fit_rows(per_k[k].R, zero_labels) for k in ks}
    fit = fits[k0]
    details["R"] = {k: np.round(per_k[k].R, 8).tolist() for k in ks}

    # ---- weights
    d = fit["diag"]
    rel_w = d / np.mean(d[d > 0]) if np.any(d > 0) else np.ones_like(d)
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
        findings.append(Finding("smoothing", "no label smoothing (ε = 0)"))
    elif len(ks) == 1:
        spread, epsilon = "all", _nice(eps[k0]["all"])
        findings.append(Finding(
            "smoothing",
            f"ε = {epsilon:g} as ε/K on every class, or ε = {_nice(eps[k0]['others']):g} as ε/(K−1) on the others "
            f"(the same target at one K; it takes no other K to tell them apart)",
        ))
    else:
        KS = ks
        gaps = {s: abs(eps[KS[0]][s] - eps[KS[1]][s]) for s in ("all", "others")}
        spread = min(gaps, key=gaps.get)  # type: ignore[arg-type]
        epsilon = _nice(float(np.mean([eps[k][spread] for k in KS])))
        where = "ε/K on every class" if spread == "all" else "ε/(K−1) on the other classes, 1−ε on the label"
        if gaps[spread] > 1e-6 * max(1.0, epsilon) * 10:
            findings.append(Finding(
                "smoothing",
                f"the smoothing mass follows neither ε/K nor ε/(K−1): as ε/K it is ε={eps[KS[0]]['all']:.6g} at "
                f"K={KS[0]} but ε={eps[KS[1]]['all']:.6g} at K={KS[1]}; as ε/(K−1) ε={eps[KS[0]]['others']:.6g} vs "
                f"{eps[KS[1]]['others']:.6g}",
                ok=False,
            ))
        else:
            findings.append(Finding("smoothing", f"ε = {epsilon:g}, spread={spread!r}: {where}"))

    # ---- reduction and denominator
    prober.k = k0
    reduction, denominator = _reduction(prober, vector, weighted, rel_w, zero_labels, findings)
    details["denominator"] = denominator

    # ---- ignore index
    ignore_index, empty_mean = _ignore(prober, vector, reduction, zero_labels, fit, findings)

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
            findings.append(Finding(
                "normalisation",
                f"the smoothed target sums to {sigma:.6g}, not 1 (the loss is lsx's × {sigma:.6g}; an ε/K slip?)",
                ok=False,
            ))
    w_rows = np.ones(k0) if weights is None else np.asarray(weights)
    z = [rows.S[y] * scale / w_rows[y] for y in active if w_rows[y] > 0]
    z_loss = _nice(float(np.median(z))) if z else 0.0
    if abs(z_loss) < 1e-9:
        z_loss = 0.0
    else:
        findings.append(Finding("z-loss", f"z-loss {z_loss:g}·w_y·LSE² per element"))

    options: dict[str, Any] = {"label_smoothing": epsilon, "spread": spread}
    if weights is not None:
        options["weight"] = [float(_nice(v)) for v in weights]
    options.update(ignore_index=ignore_index, z_loss=max(z_loss, 0.0), reduction=reduction)
    if empty_mean is not None:
        options["empty_mean"] = empty_mean
    # KL form: the constant at zero logits is −Σ w q log q (summed over rows, over the denominator)
    options["normalize"] = False
    if rows.constant == rows.constant:
        entropy = _entropy_term(options, k0, active) / scale
        if abs(rows.constant) > 1e-7 and abs(rows.constant - entropy) < 1e-6 * max(1.0, abs(entropy)):
            options["normalize"] = True
            findings.append(Finding("KL form", "subtracts the target entropy Σ_c w_c q_c log q_c (KL form, minimum 0)"))
        elif abs(rows.constant) > 1e-6:
            findings.append(Finding("constant", f"adds a constant {rows.constant:.6g} at zero logits", ok=False))

    checks = _verify(prober, options, ignore_index, ks)
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
    return Result(
        framework=caller.framework,
        options=options,
        call=call,
        conventions=_conventions(options) if matches else [],
        findings=findings,
        checks=checks,
        matches=matches,
        verdict=verdict,
        deviation=deviation,
        calls=caller.calls,
        details=details,
    )


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


def _nice(value: float) -> float:
    """Round to 6 significant digits: probes are float64, user code may not be."""
    return float(f"{value:.6g}") if value else 0.0


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
        rows_const = all(np.ptp(Ra[i][np.arange(k) != y]) < 1e-7 * max(1, np.max(np.abs(Ra))) for i, y in enumerate(active))
        if np.ptp(off_values) < 1e-7 * max(1.0, np.max(np.abs(Ra))) and np.ptp(diag[active]) > 1e-7:
            out["why"] = (
                f"class weights enter only the target (NLL) term; the smoothing term is unweighted "
                f"(off-target coefficients all {off_values[0]:.4g}, target ones {np.round(diag[active], 4).tolist()}); "
                "lsx weights both terms"
            )
        elif rows_const and np.ptp(off[active]) > 1e-7:
            out["why"] = "the whole element's loss is scaled by a weight of its label (w_y·CE(q)); lsx weights each class's term by w_c"
        else:
            out["why"] = f"the per-class coefficients do not have the form w_c·q_c (relative misfit {residual:.3g})"
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
        findings.append(Finding("reduction", f"doubling the batch divides it by {ratio:.6g}: neither sum (1) nor mean (2)",
                                ok=False))
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
    findings.append(Finding(
        "reduction",
        f"mean divides by the element count{' ' if abs(ratio - by_count) < 1e-6 else ' (roughly) '}, not by Σ w_y "
        "as lsx (and torch) do for weighted losses",
        ok=False,
    ))
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
            findings.append(Finding("ignore", f"label {value} is taken as class {k - 1} (the index wraps around); "
                                    "lsx raises ValueError", ok=False, scope="ignored"))
            continue
        elif np.max(np.abs(r)) < 1e-9 * size:
            how, ok, clean = f"label {value} drops the cross-entropy but such elements still get the z-loss", False, False
        elif np.any(off > 0) and np.max(np.abs(r - along_off * off)) < 1e-6 * size:
            how = (f"label {value} drops the target term but such elements still get the smoothing term "
                   f"(per-class coefficients {np.round(r, 5).tolist()}); lsx gives them loss 0")
            ok, clean = False, False
        else:
            how = f"label {value} gives an unexplained loss (coefficients {np.round(r, 5).tolist()})"
            ok, clean = False, False
        empty_mean = None
        if reduction == "mean":
            ratio = prober.gain(base) / prober.gain([*base, value])
            if abs(ratio - 1) < 1e-6:
                how += ", and leaves the mean's denominator"
            else:
                how += (f", but changes the mean's denominator (×{ratio:.6g} with one such element; lsx leaves "
                        "them out: ×1)")
                ok = False
            try:
                out = prober.call(np.zeros((2, k)), np.array([value, value]))
                empty_mean = "nan" if np.isnan(out) else "zero" if out == 0 else None
                if empty_mean:
                    how += f"; all ignored → {'NaN' if empty_mean == 'nan' else '0'}"
            except CallError:
                pass
        findings.append(Finding("ignore", how, ok=ok, scope="ignored"))
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


def _verify(prober: Prober, options: dict[str, Any], ignore_index: int | None, ks: list[int]) -> list[dict[str, Any]]:
    """The callable against lsx with ``options`` on random logits, other K, other N, ignored elements."""
    rng = np.random.default_rng(7)
    k1 = ks[-1]
    k2 = ks[0] + 1 if len(ks) > 1 else ks[0]
    cases = [(f"random logits, K={ks[0]}", ks[0], 6, 0.0), (f"random logits, K={k1}", k1, 4, 0.0),
             (f"K={k2}, 9 elements", k2, 9, 0.0)]
    if ignore_index is not None:
        cases.append((f"K={k2} with label {ignore_index} elements", k2, 8, 0.4))
    checks = []
    lsx_options = dict(options)
    if lsx_options.get("weight") is not None:
        lsx_options["weight"] = np.asarray(lsx_options["weight"])
    for name, k, n, ignored in cases:
        if lsx_options.get("weight") is not None and len(lsx_options["weight"]) != k:
            continue  # internal weights fix K
        x = rng.normal(scale=2.0, size=(n, k))
        pool = [c for c in range(k) if c != ignore_index]
        y = rng.choice(pool, size=n)
        if ignored:
            y[rng.random(n) < ignored] = ignore_index
            y[0] = ignore_index
        prober.k = k
        try:
            out = prober.call(x, y)
        except CallError as exc:
            checks.append({"name": name, "error": str(exc), "deviation": math.inf, "ignored": bool(ignored)})
            continue
        try:
            expected = spec.reference_loss(x, y, **lsx_options)
        except (TypeError, ValueError) as exc:
            checks.append({"name": name, "error": f"lsx: {exc}", "deviation": math.inf, "ignored": bool(ignored)})
            continue
        if np.shape(out) != np.shape(expected):
            deviation = math.inf
        else:
            deviation = float(np.max(np.abs(out - expected)) / max(1.0, float(np.max(np.abs(expected)))))
        checks.append({"name": name, "output": np.round(out, 6).tolist(), "lsx": np.round(expected, 6).tolist(),
                       "deviation": deviation, "ignored": bool(ignored)})
    return checks


def _conventions(options: dict[str, Any]) -> list[str]:
    """Named conventions that give exactly these options (with label_smoothing passed)."""
    mine = spec.resolve_options(**{n: v for n, v in options.items() if n != "weight"})
    found = []
    for name in spec.CONVENTIONS:
        given = {"label_smoothing": options["label_smoothing"]}
        preset = spec.resolve_options(name, **given)
        if all(getattr(preset, f) == getattr(mine, f) for f in ("label_smoothing", "spread", "ignore_index", "z_loss",
                                                                "normalize", "reduction")) and (
            preset.reduction != "mean" or "empty_mean" not in options or preset.empty_mean == mine.empty_mean
        ):
            found.append(name)
    return found


def _call_text(framework: str, options: dict[str, Any]) -> str:
    defaults = {"label_smoothing": 0.0, "spread": "all", "ignore_index": -100, "z_loss": 0.0, "normalize": False,
                "reduction": "mean", "empty_mean": "nan"}
    parts = []
    for name, value in options.items():
        if name == "weight":
            parts.append(f"weight={_array_text(framework, value)}")
        elif defaults.get(name, object()) != value:
            parts.append(f"{name}={value!r}")
    args = "logits, labels" + "".join(f", {p}" for p in parts)
    return f"lsx.{framework}.loss({args})"


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
        console.print(f"[bold green]verdict: lsx computes exactly this[/] (max deviation {result.deviation:.1e})")
        console.print(f"  {escape(result.call)}", soft_wrap=True)
        if names:
            console.print(f"  matching convention(s): {names}")
    elif result.verdict == "valid labels only":
        console.print("[bold yellow]verdict: lsx computes the same for labels in [0, K)[/]; it differs where "
                      f"labels are ignored or out of range (max relative deviation {result.deviation:.3g}):")
    else:
        console.print(f"[bold red]verdict: no lsx option set reproduces it[/] (max relative deviation "
                      f"{result.deviation:.3g}); closest:")
        console.print(f"  {escape(result.call)}", soft_wrap=True)
        for f in result.findings:
            if not f.ok:
                console.print(f"  differs: {escape(f.text)}")


def _short(values: Any) -> str:
    if isinstance(values, list):
        flat = np.asarray(values).ravel()
        text = ", ".join(f"{v:.5g}" for v in flat[:4])
        return f"[{text}{', …' if flat.size > 4 else ''}]"
    return f"{values:.6g}"
