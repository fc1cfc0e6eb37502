"""The cross-backend case matrix: shapes, axes, target kinds and options, with deterministic data.

Every backend module in ``tests/backends/`` is run over ``CASES`` × its dtypes × its modes and compared with
the float64 reference (``lsx.spec``). A case is small so that the whole matrix stays fast.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lsx import spec


@dataclass(frozen=True)
class Case:
    id: str
    shape: tuple[int, ...]
    axis: int
    kind: str  # "index" or "probs"
    options: dict[str, Any] = field(default_factory=dict)
    ignored_fraction: float = 0.0
    masked: bool = False  # class_mask leaving out the last two classes
    neg_inf: bool = False  # some non-target logits are −inf
    label_dtype: str | None = None  # integer targets in this dtype (default int64)
    special_labels: tuple[int, ...] = ()  # label values forced into the first rows (dtype edge values)
    readonly: bool = False  # every array is handed over with flags.writeable = False
    logit_scale: float = 2.0  # standard deviation of the logits
    bad_probs: str | None = None  # "nan": one probability is NaN; "negative": rows with negative entries
    pos_inf: bool = False  # one row has a +inf logit on a non-target class (its loss is NaN)
    dtypes: tuple[str, ...] | None = None  # the logits' dtypes this case applies to (default: all)

    def make(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Float64 logits, the target and the options (weights and masks filled in) for this case."""
        rng = np.random.default_rng(zlib.crc32(self.id.encode()))
        logits = rng.normal(scale=self.logit_scale, size=self.shape)
        axis = self.axis % len(self.shape)
        k = self.shape[axis]
        options = dict(self.options)
        if options.get("weight") == "random":
            options["weight"] = rng.uniform(0.2, 2.0, size=k)
        if options.get("sample_weight") == "random":  # per-element weights, some exactly 0
            sw = rng.uniform(0.0, 3.0, size=self.shape[:axis] + self.shape[axis + 1 :])
            sw.reshape(-1)[::3] = 0.0
            options["sample_weight"] = sw
        valid = np.ones(k, bool)
        if self.masked:
            valid[-2:] = False
            options["class_mask"] = valid
        lead = self.shape[:axis] + self.shape[axis + 1 :]
        if self.kind == "index":
            high = int(valid.sum())
            if self.label_dtype is not None:
                high = min(high, int(np.iinfo(self.label_dtype).max) + 1)
            target = rng.integers(0, high, size=lead)
            target.reshape(-1)[: len(self.special_labels)] = self.special_labels
            if self.ignored_fraction:
                ignore_index = spec.resolve_options(**{n: v for n, v in options.items() if n != "weight"}).ignore_index
                target[rng.random(lead) < self.ignored_fraction] = ignore_index
            if self.neg_inf:
                moved = np.moveaxis(logits, axis, -1)
                moved[..., :] = np.where(
                    (np.arange(k) != target[..., None]) & (rng.random(lead + (k,)) < 0.3), -np.inf, moved
                )
        else:
            probs = rng.dirichlet(np.ones(int(valid.sum())), size=lead)
            probs = np.concatenate([probs, np.zeros(lead + (k - int(valid.sum()),))], axis=-1)
            if self.bad_probs == "nan":
                probs.reshape(-1, k)[1, 0] = np.nan
            elif self.bad_probs == "negative":  # rows still sum to 1, with negative entries
                flat = probs.reshape(-1, k)
                flat[::2, 0] -= 0.5
                flat[::2, 1] += 0.5
            target = np.moveaxis(probs, -1, axis)
        if self.pos_inf:
            moved = np.moveaxis(logits, axis, -1).reshape(-1, k)
            label = int(np.asarray(target).reshape(-1)[0]) if self.kind == "index" else 0
            moved[0, (label + 1) % k] = np.inf
            logits = np.moveaxis(moved.reshape(np.moveaxis(logits, axis, -1).shape), -1, axis)
        if self.label_dtype is not None:
            target = target.astype(self.label_dtype)
        if self.readonly:
            for array in (logits, target, options.get("weight"), options.get("class_mask")):
                if isinstance(array, np.ndarray):
                    array.flags.writeable = False
        return logits, target, options

    def applies_to(self, dtype: str) -> bool:
        return self.dtypes is None or dtype in self.dtypes


def _cases() -> list[Case]:
    cases = [
        Case("plain", (6, 5), -1, "index"),
        Case("eps0.1", (6, 5), -1, "index", {"label_smoothing": 0.1}),
        Case("eps1", (6, 5), -1, "index", {"label_smoothing": 1.0}),
        Case("others", (6, 5), -1, "index", {"label_smoothing": 0.2, "spread": "others"}),
        Case("weight", (8, 5), -1, "index", {"label_smoothing": 0.1, "weight": "random"}),
        Case("ignore", (8, 5), -1, "index", {"label_smoothing": 0.1}, ignored_fraction=0.3),
        Case("ignore-weight-others", (8, 5), -1, "index",
             {"label_smoothing": 0.1, "weight": "random", "spread": "others"}, ignored_fraction=0.3),
        Case("ignore-custom", (8, 5), -1, "index", {"label_smoothing": 0.1, "ignore_index": 3 + 1}, ignored_fraction=0.3),
        Case("all-ignored-nan", (4, 5), -1, "index", {"label_smoothing": 0.1}, ignored_fraction=1.0),
        Case("all-ignored-zero", (4, 5), -1, "index", {"label_smoothing": 0.1, "empty_mean": "zero"}, ignored_fraction=1.0),
        Case("sum", (6, 5), -1, "index", {"label_smoothing": 0.1, "reduction": "sum"}, ignored_fraction=0.2),
        Case("none", (6, 5), -1, "index", {"label_smoothing": 0.1, "reduction": "none"}, ignored_fraction=0.2),
        Case("z-loss", (6, 5), -1, "index", {"label_smoothing": 0.1, "z_loss": 0.01, "weight": "random"}),
        Case("normalize", (6, 5), -1, "index", {"label_smoothing": 0.1, "normalize": True, "spread": "others"}),
        Case("t5x", (6, 7), -1, "index", {"convention": "t5x", "label_smoothing": 0.1}),
        Case("fairseq", (6, 7), -1, "index", {"convention": "fairseq", "label_smoothing": 0.1}, ignored_fraction=0.2),
        Case("class-mask", (6, 7), -1, "index", {"label_smoothing": 0.1}, masked=True),
        Case("class-mask-others-weight", (6, 7), -1, "index",
             {"label_smoothing": 0.1, "spread": "others", "weight": "random"}, masked=True),
        Case("neg-inf-eps0", (6, 5), -1, "index", {}, neg_inf=True),
        Case("axis1-3d", (3, 5, 4), 1, "index", {"label_smoothing": 0.1}, ignored_fraction=0.2),
        Case("axis0", (5, 3), 0, "index", {"label_smoothing": 0.1, "reduction": "none"}),
        Case("4d-weight", (2, 5, 3, 2), 1, "index", {"label_smoothing": 0.1, "weight": "random"}, ignored_fraction=0.2),
        Case("single-row", (5,), -1, "index", {"label_smoothing": 0.1}),
        Case("probs", (6, 5), -1, "probs", {}),
        Case("probs-eps", (6, 5), -1, "probs", {"label_smoothing": 0.1, "weight": "random"}),
        Case("probs-others-z", (6, 5), -1, "probs", {"label_smoothing": 0.2, "spread": "others", "z_loss": 0.01}),
        Case("probs-normalize-sum", (6, 5), -1, "probs", {"label_smoothing": 0.1, "normalize": True, "reduction": "sum"}),
        Case("probs-axis1-none", (3, 5, 4), 1, "probs", {"label_smoothing": 0.1, "reduction": "none"}),
        Case("probs-class-mask", (6, 7), -1, "probs", {"label_smoothing": 0.1}, masked=True),
        Case("wide", (4, 300), -1, "index", {"label_smoothing": 0.1, "z_loss": 1e-3}, ignored_fraction=0.25),
        # every integer label dtype, with K beyond what the dtype holds and labels at the dtype's edges
        # (e.g. uint8 156 is −100 wrapped, 255 is −1 wrapped): nothing may wrap or be silently ignored
        *(
            Case(f"labels-{dt}-k{k}" + (f"-ignore{extra['ignore_index']}" if extra else ""), (6, k), -1, "index", {"label_smoothing": 0.1, **extra}, label_dtype=dt,
                 special_labels=edges, ignored_fraction=fraction, dtypes=("float64", "float32"))
            for dt, k, extra, edges, fraction in (
                ("int8", 200, {}, (127, 0), 0.25),
                ("uint8", 300, {}, (156, 255, 0), 0.0),
                ("uint8", 300, {"ignore_index": 255}, (156, 255, 254), 0.0),
                ("int16", 70000, {"ignore_index": -1}, (32767, 0), 0.25),
                ("uint16", 70000, {}, (65436, 65535, 0), 0.0),
                ("int32", 300, {}, (299, 0), 0.25),
                ("uint32", 300, {"ignore_index": 7}, (299, 7), 0.0),
                ("int64", 300, {"ignore_index": 2**40}, (299, 0), 0.25),
                ("uint64", 300, {"ignore_index": 7}, (299, 7), 0.0),
            )
        ),
        # probability targets outside the simplex: a NaN entry (NaN loss and gradient for its element),
        # negative entries (counted linearly, as in torch)
        Case("probs-nan", (4, 5), -1, "probs", {"label_smoothing": 0.1, "reduction": "none"}, bad_probs="nan"),
        Case("probs-nan-mean", (4, 5), -1, "probs", {"label_smoothing": 0.1}, bad_probs="nan"),
        Case("probs-negative", (6, 5), -1, "probs", {"label_smoothing": 0.1, "weight": "random", "z_loss": 0.01},
             bad_probs="negative"),
        Case("probs-negative-others", (6, 5), -1, "probs", {"label_smoothing": 0.2, "spread": "others",
             "reduction": "sum"}, bad_probs="negative"),
        # float64 logits whose square overflows: a z-loss of 0 contributes exactly 0
        Case("huge-float64", (6, 5), -1, "index", {"label_smoothing": 0.1}, logit_scale=1e155, dtypes=("float64",)),
        Case("huge-float64-probs", (6, 5), -1, "probs", {"label_smoothing": 0.1}, logit_scale=1e155,
             dtypes=("float64",)),
        # a +inf logit makes its element's loss and gradient NaN
        Case("pos-inf", (4, 5), -1, "index", {"label_smoothing": 0.1, "reduction": "none"}, pos_inf=True),
        Case("pos-inf-eps0", (4, 5), -1, "index", {"reduction": "none"}, pos_inf=True),
        # soft-capping (Gemma 2: c = 30), per-element weights, a caller's denominator, alone and composed
        Case("softcap", (6, 5), -1, "index", {"label_smoothing": 0.1, "softcap": 3.0}, logit_scale=8.0),
        Case("softcap-huge-neg-inf-mask", (6, 7), -1, "index", {"label_smoothing": 0.1, "softcap": 30.0},
             logit_scale=1e3, masked=True, neg_inf=True),
        Case("softcap-neg-inf", (6, 5), -1, "index", {"softcap": 5.0, "z_loss": 0.01}, neg_inf=True),
        Case("softcap-probs-normalize", (6, 5), -1, "probs",
             {"label_smoothing": 0.1, "softcap": 2.0, "normalize": True, "weight": "random"}),
        Case("sample-weight", (8, 5), -1, "index", {"label_smoothing": 0.1, "sample_weight": "random"},
             ignored_fraction=0.25),
        Case("sample-weight-class-weight-others", (8, 5), -1, "index",
             {"label_smoothing": 0.2, "spread": "others", "weight": "random", "sample_weight": "random",
              "z_loss": 0.01}, ignored_fraction=0.25),
        Case("sample-weight-none-axis1", (3, 5, 4), 1, "index",
             {"label_smoothing": 0.1, "sample_weight": "random", "reduction": "none"}),
        Case("sample-weight-probs", (6, 5), -1, "probs", {"label_smoothing": 0.1, "sample_weight": "random"}),
        Case("sample-weight-sum-mask", (6, 7), -1, "index",
             {"label_smoothing": 0.1, "sample_weight": "random", "reduction": "sum"}, masked=True),
        Case("denominator", (8, 5), -1, "index", {"label_smoothing": 0.1, "denominator": 37.0}, ignored_fraction=0.25),
        Case("denominator-zero", (4, 5), -1, "index", {"label_smoothing": 0.1, "denominator": 0.0}),
        Case("denominator-zero-empty-zero", (4, 5), -1, "index",
             {"denominator": 0.0, "empty_mean": "zero"}),
        Case("denominator-sample-weight-probs", (6, 5), -1, "probs",
             {"label_smoothing": 0.1, "sample_weight": "random", "denominator": 11.0, "normalize": True}),
        Case("all-spec2-t5x", (6, 7), -1, "index",
             {"convention": "t5x", "label_smoothing": 0.1, "reduction": "mean", "softcap": 30.0,
              "sample_weight": "random", "denominator": 9.0, "weight": "random"}, masked=True, logit_scale=20.0),
        # read-only inputs
        Case("readonly", (6, 7), -1, "index", {"label_smoothing": 0.1, "weight": "random"}, masked=True,
             readonly=True, ignored_fraction=0.2),
        Case("readonly-probs", (6, 5), -1, "probs", {"label_smoothing": 0.1}, readonly=True),
    ]
    return cases


CASES = _cases()


def round_to_dtype(x: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to what ``dtype`` can hold, returned as float64 (the reference's input)."""
    if dtype == "float64":
        return x
    if dtype in ("float32", "float16"):
        return x.astype(dtype).astype(np.float64)
    if dtype == "bfloat16":  # round to nearest even on the top 16 bits of float32
        bits = x.astype(np.float32).view(np.uint32).astype(np.uint64)
        rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        out = rounded.astype(np.uint32).view(np.float32).astype(np.float64)
        return np.where(np.isfinite(x), out, x)
    raise ValueError(dtype)


TOLERANCE = {"float64": 1e-10, "float32": 2e-5, "float16": 2e-3, "bfloat16": 1.6e-2}


def assert_close(actual: np.ndarray, expected: np.ndarray, dtype: str, what: str) -> None:
    """Relative to the largest magnitude of ``expected``, so that tiny entries are not over-constrained."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.array_equal(np.isnan(actual), np.isnan(expected)), f"{what}: NaN pattern differs: {actual} vs {expected}"
    finite = np.isfinite(expected)
    assert np.array_equal(actual[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)]), what
    if finite.any():
        scale = max(1.0, float(np.max(np.abs(expected[finite]))))
        error = float(np.max(np.abs(actual[finite] - expected[finite])))
        assert error <= TOLERANCE[dtype] * scale, f"{what}: max abs error {error:.3g} > {TOLERANCE[dtype]:.1g}·{scale:.3g}"
