"""``lsx parity``: every installed backend against the float64 reference and the framework's own built-in.

A compact matrix of cases × {float64, float32} × {eager, compiled}. Compiled runs bundle every case of one
dtype into a single compiled function, so each backend compiles twice (once per dtype), not once per case.
Frameworks are imported here, lazily, only for the backends that run.
"""

from __future__ import annotations

import math
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lsx import _compat, spec

DTYPES = ("float64", "float32")
MODES = ("eager", "compiled")
#: (mode, dtype) runs. Compiling dominates the run time (XLA, dynamo), so by default compiled code is checked
#: in float32, the dtype it is used in; ``full`` adds compiled float64, ``quick`` drops compilation.
RUNS = {
    "quick": (("eager", "float64"), ("eager", "float32")),
    "default": (("eager", "float64"), ("eager", "float32"), ("compiled", "float32")),
    "full": (("eager", "float64"), ("eager", "float32"), ("compiled", "float64"), ("compiled", "float32")),
}
#: Max abs error allowed, relative to max(1, max |reference|): the float rounding of one dtype, a few ulps of
#: the largest term. Built-ins are compared at twice this (two roundings).
TOLERANCE = {"float64": 1e-10, "float32": 2e-5}
BUILTIN_FACTOR = 2.0


# --------------------------------------------------------------------------------------------------------
# The case matrix
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    id: str
    shape: tuple[int, ...]
    kind: str  # "index" or "probs"
    options: dict[str, Any] = field(default_factory=dict)
    axis: int = -1
    ignored_fraction: float = 0.0
    logit_scale: float = 2.0  # standard deviation of the logits
    masked: bool = False  # class_mask leaves out the last class, whose logits are large (a leak would show)

    def make(self) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Float64 logits, the target and the options (random weights filled in), the same on every run."""
        rng = np.random.default_rng(zlib.crc32(self.id.encode()))
        logits = rng.normal(scale=self.logit_scale, size=self.shape)
        axis = self.axis % len(self.shape)
        k = self.shape[axis]
        options = dict(self.options)
        if options.get("weight") == "random":
            options["weight"] = rng.uniform(0.2, 2.0, size=k)
        lead = self.shape[:axis] + self.shape[axis + 1 :]
        if options.get("sample_weight") == "random":  # one weight per element, every third exactly 0
            sample_weight = rng.uniform(0.2, 3.0, size=lead)
            sample_weight.reshape(-1)[::3] = 0.0
            options["sample_weight"] = sample_weight
        valid = np.ones(k, bool)
        if self.masked:
            valid[-1] = False
            options["class_mask"] = valid
            # padding lanes far above the rest: after soft-capping they would be the row's maximum
            np.moveaxis(logits, axis, -1)[..., ~valid] = 1e4
        if self.kind == "index":
            target = rng.integers(0, int(valid.sum()), size=lead)
            if self.ignored_fraction:
                plain = {n: v for n, v in options.items() if n not in ARRAY_OPTIONS}
                ignore_index = spec.resolve_options(**plain).ignore_index
                ignored = rng.random(lead) < self.ignored_fraction
                ignored.flat[0] = True  # at least one
                if self.ignored_fraction < 1:
                    ignored.flat[-1] = False  # and at least one kept
                target[ignored] = ignore_index
        else:
            target = np.moveaxis(rng.dirichlet(np.ones(k), size=lead), -1, axis)
        return logits, target, options

    def describe(self) -> str:
        parts = [f"{self.kind} {self.shape}" + (f" axis={self.axis}" if self.axis != -1 else "")]
        if self.logit_scale != 2.0:
            parts.append(f"logits ~ N(0, {self.logit_scale:g}²)")
        for name, value in self.options.items():
            parts.append(f"{name}={value}" if name not in ARRAY_OPTIONS else name)
        if self.masked:
            parts.append("class_mask (padding logits 1e4)")
        if self.ignored_fraction:
            parts.append("ignored rows")
        return ", ".join(parts)


#: options given as arrays (filled in by ``Case.make``), named but not printed by ``Case.describe``
ARRAY_OPTIONS = ("weight", "sample_weight", "class_mask")

#: Small, and mostly one shape: eager JAX compiles each operation per shape, so shared shapes are reused.
CASES = (
    Case("ce", (8, 5), "index"),
    Case("eps", (8, 5), "index", {"label_smoothing": 0.1}),
    Case("others", (8, 5), "index", {"label_smoothing": 0.2, "spread": "others"}),
    Case("weight", (8, 5), "index", {"label_smoothing": 0.1, "weight": "random"}),
    Case("ignore", (8, 5), "index", {"label_smoothing": 0.1}, ignored_fraction=0.3),
    Case(
        "weight-ignore-sum",
        (8, 5),
        "index",
        {"label_smoothing": 0.1, "weight": "random", "reduction": "sum"},
        ignored_fraction=0.3,
    ),
    Case("none", (8, 5), "index", {"label_smoothing": 0.1, "reduction": "none"}, ignored_fraction=0.3),
    Case("all-ignored", (8, 5), "index", {"label_smoothing": 0.1, "empty_mean": "zero"}, ignored_fraction=1.0),
    Case("3d-axis1", (2, 5, 3), "index", {"label_smoothing": 0.1, "weight": "random"}, axis=1, ignored_fraction=0.2),
    Case("probs", (8, 5), "probs", {"label_smoothing": 0.1}),
    Case("fairseq", (8, 5), "index", {"convention": "fairseq", "label_smoothing": 0.1}, ignored_fraction=0.2),
    Case("t5x", (8, 5), "index", {"convention": "t5x", "label_smoothing": 0.1}),
    # softcap, sample_weight and denominator: no built-in has soft-capping or per-element weights, so only the
    # denominator cases meet a built-in (its sum divided by the denominator)
    Case("softcap", (8, 5), "index", {"label_smoothing": 0.1, "softcap": 30.0}, logit_scale=50.0),
    Case("softcap-mask", (8, 5), "index", {"label_smoothing": 0.1, "softcap": 3.0, "z_loss": 0.01}, masked=True),
    Case(
        "sample-weight",
        (8, 5),
        "index",
        {"label_smoothing": 0.1, "weight": "random", "sample_weight": "random"},
        ignored_fraction=0.3,
    ),
    Case("denominator", (8, 5), "index", {"label_smoothing": 0.1, "denominator": 20.0}),
    Case(
        "denominator-0",
        (8, 5),
        "index",
        {"label_smoothing": 0.1, "denominator": 0.0, "empty_mean": "zero"},
        ignored_fraction=0.3,
    ),
    Case(
        "t5x-capped-weighted",
        (8, 5),
        "index",
        {
            "convention": "t5x",
            "label_smoothing": 0.1,
            "softcap": 30.0,
            "sample_weight": "random",
            "reduction": "mean",
            "denominator": 6.0,
        },
        logit_scale=50.0,
    ),
)


@dataclass
class Data:
    """One case at one dtype: logits rounded to the dtype (as float64), target, options, references."""

    case: Case
    dtype: str
    logits: np.ndarray
    target: np.ndarray
    options: dict[str, Any]
    axis: int
    loss: np.ndarray
    grad: np.ndarray


def make_data(case: Case, dtype: str) -> Data:
    logits, target, options = case.make()
    if dtype != "float64":
        logits = logits.astype(dtype).astype(np.float64)
    ref_loss = spec.reference_loss(logits, target, axis=case.axis, **options)
    ref_grad = spec.reference_grad(logits, target, axis=case.axis, **options)
    return Data(case, dtype, logits, target, options, case.axis % len(case.shape), ref_loss, ref_grad)


# --------------------------------------------------------------------------------------------------------
# Backends: a runner per framework. ``setup`` imports (raising ImportError when not installed) and returns
# the framework's version; ``eager``/``compiled`` return (loss, grad of the summed loss) as float64 NumPy.
# --------------------------------------------------------------------------------------------------------
Result = tuple[np.ndarray, np.ndarray]


class Runner:
    name = ""
    extra = ""  # the pip extra that installs it
    compiler = ""  # what "compiled" means here
    modes: tuple[str, ...] = MODES

    def setup(self) -> str:
        raise NotImplementedError

    def eager(self, data: Data) -> Result:
        raise NotImplementedError

    def compiled(self, datas: list[Data]) -> list[Result]:
        raise NotImplementedError

    def builtin(self, data: Data) -> tuple[str, Result] | None:
        """The framework's own loss on this case, where it can express it."""
        return None


def _plain_smoothing(data: Data, *, weights_ok: bool, ignore_ok: bool) -> bool:
    """Whether a built-in that knows only "(1−ε)·t + ε/K" can express this case."""
    opts = spec.resolve_options(**data.options)
    if opts.spread == "others" and opts.label_smoothing > 0:
        return False
    if opts.z_loss or opts.normalize or opts.class_mask is not None:
        return False
    # no built-in soft-caps its logits; F.cross_entropy and optax take no per-element weights
    if opts.softcap is not None or opts.sample_weight is not None:
        return False
    if opts.denominator is not None and float(opts.denominator) == 0:  # a sum ÷ 0 expresses no empty_mean
        return False
    if opts.weight is not None and not weights_ok:
        return False
    if data.case.kind == "index" and opts.ignore_index is not None and np.any(data.target == opts.ignore_index):
        if not ignore_ok:
            return False
        if opts.reduction == "mean" and np.all(data.target == opts.ignore_index) and opts.empty_mean != "nan":
            return False
    return True


def _onehot(data: Data, k: int) -> np.ndarray:
    """The target as probabilities with the classes last."""
    if data.case.kind == "index":
        probs = (np.arange(k) == np.asarray(data.target)[..., None]).astype(np.float64)
    else:
        probs = np.moveaxis(data.target, data.axis, -1)
    return probs


def _reduce(values: Any, opts: spec.Options, xp: Any) -> Any:
    if opts.denominator is not None:
        return _by_denominator(xp.sum(values), opts)
    if opts.reduction == "mean":
        return xp.mean(values)
    if opts.reduction == "sum":
        return xp.sum(values)
    return values


def _builtin_reduction(opts: spec.Options) -> str:
    """The reduction to ask a built-in for: with a caller's denominator, the sum (then :func:`_by_denominator`)."""
    return "sum" if opts.denominator is not None else opts.reduction


def _by_denominator(total: Any, opts: spec.Options) -> Any:
    """A built-in's sum as lsx's mean over the caller's denominator (nonzero: see :func:`_plain_smoothing`)."""
    return total if opts.denominator is None else total / float(opts.denominator)


class NumpyRunner(Runner):
    name, extra, compiler, modes = "numpy", "numba", "", ("eager",)

    def setup(self) -> str:
        import lsx.numpy

        self.module = lsx.numpy
        try:
            from lsx.numpy import _numba as _numba_kernels

            engine = "Numba kernel" if _numba_kernels.AVAILABLE else "pure NumPy"
        except ImportError:
            engine = "pure NumPy"
        return f"{np.__version__} ({engine})"

    def eager(self, data: Data) -> Result:
        x = data.logits.astype(data.dtype)
        value, grad = self.module.loss_and_grad(x, data.target, axis=data.axis, **data.options)
        _check_type(value, grad, np.ndarray, x.dtype, x.shape)
        return np.asarray(value, np.float64), np.asarray(grad, np.float64)


class TorchRunner(Runner):
    name, extra = "torch", "torch"
    #: "aot_eager" checks graph capture and autograd tracing in seconds; "inductor" also generates and
    #: compiles C++ code, about 15 s per graph on a small CPU.
    compile_backend = os.environ.get("LSX_PARITY_TORCH_BACKEND", "aot_eager")

    @property
    def compiler(self) -> str:  # type: ignore[override]
        return f"torch.compile(backend={self.compile_backend!r})"

    def setup(self) -> str:
        import torch

        import lsx.torch

        self.torch, self.fn = torch, lsx.torch.loss
        return torch.__version__

    def _inputs(self, data: Data):
        torch = self.torch
        x = torch.tensor(data.logits).to(getattr(torch, data.dtype)).requires_grad_(True)
        target = torch.from_numpy(np.asarray(data.target))
        if data.case.kind == "probs":
            target = target.to(x.dtype)
        options = dict(data.options)
        for name in ("weight", "sample_weight"):
            if name in options:
                options[name] = torch.from_numpy(np.asarray(options[name])).to(x.dtype)
        if "class_mask" in options:
            options["class_mask"] = torch.from_numpy(np.asarray(options["class_mask"]))
        return x, target, options

    def _finish(self, x, value, grad=None) -> Result:
        if grad is None:
            (grad,) = self.torch.autograd.grad(value.sum(), x)
        _check_type(value, grad, self.torch.Tensor, x.dtype, tuple(x.shape))
        return value.detach().double().numpy(), grad.double().numpy()

    def eager(self, data: Data) -> Result:
        x, target, options = self._inputs(data)
        return self._finish(x, self.fn(x, target, axis=data.axis, **options))

    def compiled(self, datas: list[Data]) -> list[Result]:
        torch = self.torch
        prepared = [self._inputs(d) for d in datas]
        fn, axes = self.fn, [d.axis for d in datas]

        def bundle(*xs):
            return [fn(x, t, axis=a, **o) for x, (_, t, o), a in zip(xs, prepared, axes)]

        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        compiled = torch.compile(bundle, backend=self.compile_backend, dynamic=False)
        xs = [x for x, _, _ in prepared]
        values = compiled(*xs)
        grads = torch.autograd.grad(sum(v.sum() for v in values), xs)  # one backward through the one graph
        return [self._finish(x, v, g) for x, v, g in zip(xs, values, grads)]

    def builtin(self, data: Data) -> tuple[str, Result] | None:
        if not _plain_smoothing(data, weights_ok=True, ignore_ok=True) or (data.axis != 1 and data.logits.ndim > 1):
            return None
        opts = spec.resolve_options(**data.options)
        x, target, options = self._inputs(data)
        value = self.torch.nn.functional.cross_entropy(
            x,
            target,
            weight=options.get("weight"),
            ignore_index=-100 if opts.ignore_index is None else opts.ignore_index,
            reduction=_builtin_reduction(opts),
            label_smoothing=opts.label_smoothing,
        )
        return "F.cross_entropy", self._finish(x, _by_denominator(value, opts))


class JaxRunner(Runner):
    name, extra, compiler = "jax", "jax", "jax.jit"

    def setup(self) -> str:
        import jax

        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        import lsx.jax

        self.jax, self.jnp, self.fn = jax, jnp, lsx.jax.loss
        return jax.__version__

    def _target(self, data: Data):
        t = np.asarray(data.target)
        return self.jnp.asarray(t if data.case.kind == "index" else t.astype(data.dtype))

    def _value_and_grad(self, loss_of_x: Callable):
        jnp = self.jnp

        def total(x):
            value = loss_of_x(x)
            return jnp.sum(value), value

        return self.jax.value_and_grad(total, has_aux=True)

    def _result(self, x, value, grad) -> Result:
        _check_type(value, grad, self.jax.Array, x.dtype, x.shape)
        return np.asarray(value, np.float64), np.asarray(grad, np.float64)

    def _loss_of(self, data: Data) -> Callable:
        target = self._target(data)
        return lambda x: self.fn(x, target, axis=data.axis, **data.options)

    def eager(self, data: Data) -> Result:
        x = self.jnp.asarray(data.logits, dtype=data.dtype)
        (_, value), grad = self._value_and_grad(self._loss_of(data))(x)
        return self._result(x, value, grad)

    def compiled(self, datas: list[Data]) -> list[Result]:
        jnp = self.jnp
        losses = [self._loss_of(d) for d in datas]

        def bundle(xs):
            values = [f(x) for f, x in zip(losses, xs)]
            return sum(jnp.sum(v) for v in values), values

        xs = [jnp.asarray(d.logits, dtype=d.dtype) for d in datas]
        (_, values), grads = self.jax.jit(self.jax.value_and_grad(bundle, has_aux=True))(xs)
        return [self._result(x, v, g) for x, v, g in zip(xs, values, grads)]

    def builtin(self, data: Data) -> tuple[str, Result] | None:
        if not _plain_smoothing(data, weights_ok=False, ignore_ok=False):
            return None
        import optax

        opts = spec.resolve_options(**data.options)
        k = data.logits.shape[data.axis]
        labels = optax.smooth_labels(self.jnp.asarray(_onehot(data, k), data.dtype), opts.label_smoothing)
        jnp = self.jnp

        def loss_of_x(x):
            per = optax.softmax_cross_entropy(jnp.moveaxis(x, data.axis, -1), labels)
            return _reduce(per, opts, jnp)

        x = jnp.asarray(data.logits, dtype=data.dtype)
        (_, value), grad = self._value_and_grad(loss_of_x)(x)
        return "optax smooth_labels+softmax_cross_entropy", self._result(x, value, grad)


class TensorflowRunner(Runner):
    name, extra, compiler = "tensorflow", "tensorflow", "tf.function(jit_compile=True)"

    def setup(self) -> str:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        _compat.load_triton_first()
        import tensorflow as tf

        import lsx.tensorflow

        self.tf, self.fn = tf, lsx.tensorflow.loss
        return tf.__version__

    def _loss_of(self, data: Data) -> Callable:
        target = self.tf.constant(data.target if data.case.kind == "index" else data.target.astype(data.dtype))
        return lambda x: self.fn(x, target, axis=data.axis, **data.options)

    def _value_and_grad(self, losses: list[Callable], xs: list) -> tuple[list, list]:
        tf = self.tf
        with tf.GradientTape() as tape:
            for x in xs:
                tape.watch(x)
            values = [f(x) for f, x in zip(losses, xs)]
            total = tf.add_n([tf.reduce_sum(v) for v in values])
        return values, tape.gradient(total, xs)

    def _result(self, x, value, grad) -> Result:
        tf = self.tf
        _check_type(value, grad, tf.Tensor, x.dtype, tuple(x.shape))
        return np.asarray(tf.cast(value, tf.float64)), np.asarray(tf.cast(grad, tf.float64))

    def _x(self, data: Data):
        return self.tf.cast(self.tf.constant(data.logits), data.dtype)

    def eager(self, data: Data) -> Result:
        x = self._x(data)
        values, grads = self._value_and_grad([self._loss_of(data)], [x])
        return self._result(x, values[0], grads[0])

    def compiled(self, datas: list[Data]) -> list[Result]:
        losses = [self._loss_of(d) for d in datas]
        xs = [self._x(d) for d in datas]
        bundle = self.tf.function(lambda xs: self._value_and_grad(losses, xs), jit_compile=True)
        values, grads = bundle(xs)
        return [self._result(x, v, g) for x, v, g in zip(xs, values, grads)]

    def builtin(self, data: Data) -> tuple[str, Result] | None:
        if not _plain_smoothing(data, weights_ok=False, ignore_ok=False):
            return None
        tf = self.tf
        opts = spec.resolve_options(**data.options)
        k = data.logits.shape[data.axis]
        eps = opts.label_smoothing
        labels = tf.constant((1 - eps) * _onehot(data, k) + eps / k, data.dtype)

        def loss_of_x(x):
            per = tf.nn.softmax_cross_entropy_with_logits(labels, tf.experimental.numpy.moveaxis(x, data.axis, -1))
            return _reduce(per, opts, tf.experimental.numpy)

        x = self._x(data)
        values, grads = self._value_and_grad([loss_of_x], [x])
        return "tf.nn.softmax_cross_entropy_with_logits", self._result(x, values[0], grads[0])


class KerasRunner(TensorflowRunner):
    """lsx.keras on the TensorFlow backend, compared with ``keras.losses.CategoricalCrossentropy``."""

    name, extra = "keras", "keras"

    def setup(self) -> str:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        _compat.load_triton_first()
        import keras

        if keras.backend.backend() != "tensorflow":
            raise ImportError(f"lsx parity runs lsx.keras on the TensorFlow backend, not {keras.backend.backend()!r}")
        import tensorflow as tf

        import lsx.keras

        self.tf, self.keras, self.fn = tf, keras, lsx.keras.loss
        return keras.__version__

    def builtin(self, data: Data) -> tuple[str, Result] | None:
        if not _plain_smoothing(data, weights_ok=False, ignore_ok=False) or data.axis != data.logits.ndim - 1:
            return None
        opts = spec.resolve_options(**data.options)
        k = data.logits.shape[data.axis]
        labels = self.tf.constant(_onehot(data, k), data.dtype)
        reduction = {"mean": "sum_over_batch_size", "sum": "sum", "none": None}[_builtin_reduction(opts)]
        cce = self.keras.losses.CategoricalCrossentropy(
            from_logits=True, label_smoothing=opts.label_smoothing, reduction=reduction, dtype=data.dtype
        )
        x = self._x(data)
        values, grads = self._value_and_grad([lambda x: _by_denominator(cce(labels, x), opts)], [x])
        return "keras CategoricalCrossentropy", self._result(x, values[0], grads[0])


def _check_type(value: Any, grad: Any, array_type: type, dtype: Any, shape: tuple) -> None:
    if not isinstance(value, array_type) or value.dtype != dtype:
        raise TypeError(f"loss is {type(value).__name__} of dtype {getattr(value, 'dtype', None)}, expected {dtype}")
    if not isinstance(grad, array_type) or grad.dtype != dtype or tuple(grad.shape) != tuple(shape):
        raise TypeError(f"gradient is {type(grad).__name__} {getattr(grad, 'dtype', None)} {tuple(grad.shape)}")


#: name → runner factory. Tests register extra runners here (e.g. a deliberately wrong one).
BACKENDS: dict[str, Callable[[], Runner]] = {
    "numpy": NumpyRunner,
    "torch": TorchRunner,
    "jax": JaxRunner,
    "tensorflow": TensorflowRunner,
    "keras": KerasRunner,
}


# --------------------------------------------------------------------------------------------------------
# Comparison and the run
# --------------------------------------------------------------------------------------------------------
def compare(actual: np.ndarray, expected: np.ndarray) -> tuple[float, float, float]:
    """(max abs error, max rel error, scale): inf when shapes or the NaN/inf pattern differ."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    if actual.shape != expected.shape:
        return math.inf, math.inf, 1.0
    finite = np.isfinite(expected)
    if not np.array_equal(np.isnan(actual), np.isnan(expected)) or not np.array_equal(
        actual[~finite & ~np.isnan(expected)], expected[~finite & ~np.isnan(expected)]
    ):
        return math.inf, math.inf, 1.0
    if not finite.any():
        return 0.0, 0.0, 1.0
    peak = float(np.max(np.abs(expected[finite])))
    error = float(np.max(np.abs(actual[finite] - expected[finite])))
    return error, error / max(peak, 1e-300) if error else 0.0, max(1.0, peak)


def _float(value: Any) -> float:
    if value is None:
        return math.nan
    return math.inf if value == "inf" else float(value)


@dataclass
class Check:
    backend: str
    case: str
    dtype: str
    mode: str
    loss_abs: float = math.nan
    grad_abs: float = math.nan
    loss_rel: float = math.nan
    grad_rel: float = math.nan
    tolerance: float = math.nan  # absolute, after scaling
    ok: bool = False
    error: str | None = None
    builtin: dict[str, Any] | None = None

    def as_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        for key in _FLOATS:
            out[key] = _json_float(out[key])
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Check:
        return cls(**{k: _float(v) if k in _FLOATS else v for k, v in data.items()})


_FLOATS = ("loss_abs", "grad_abs", "loss_rel", "grad_rel", "tolerance")


def _json_float(value: float) -> float | str | None:
    if value is None or math.isnan(value):
        return None
    return value if math.isfinite(value) else "inf"


def _score(check: Check, data: Data, result: Result) -> None:
    loss_abs, loss_rel, loss_scale = compare(result[0], data.loss)
    grad_abs, grad_rel, grad_scale = compare(result[1], data.grad)
    check.loss_abs, check.loss_rel, check.grad_abs, check.grad_rel = loss_abs, loss_rel, grad_abs, grad_rel
    tol = TOLERANCE[data.dtype]
    check.tolerance = tol * max(loss_scale, grad_scale)
    check.ok = loss_abs <= tol * loss_scale and grad_abs <= tol * grad_scale


def _score_builtin(check: Check, runner: Runner, data: Data, result: Result) -> None:
    try:
        found = runner.builtin(data)
    except Exception as exc:  # a built-in that cannot run this case is reported, not fatal
        check.builtin = {"name": "built-in", "error": _one_line(exc), "ok": True}
        return
    if found is None:
        return
    name, (value, grad) = found
    loss_abs, _, loss_scale = compare(result[0], value)
    grad_abs, _, grad_scale = compare(result[1], grad)
    tol = TOLERANCE[data.dtype] * BUILTIN_FACTOR
    ok = loss_abs <= tol * loss_scale and grad_abs <= tol * grad_scale
    check.builtin = {"name": name, "loss_abs": _json_float(loss_abs), "grad_abs": _json_float(grad_abs), "ok": ok}
    check.ok = check.ok and ok


def _accepted_options(runner: Runner) -> set[str]:
    """The keyword options the backend's ``loss`` takes (every option when it takes ``**kwargs``)."""
    import inspect

    fn = getattr(runner, "fn", None) or getattr(getattr(runner, "module", None), "loss", None)
    if fn is None:  # a runner that does not call an lsx ``loss`` (tests' stand-ins): it is given every case
        return set(spec.OPTION_NAMES) | {"convention"}
    parameters = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return set(spec.OPTION_NAMES) | {"convention"}
    return {p.name for p in parameters}


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@dataclass
class BackendReport:
    name: str
    status: str  # "ok", "mismatch", "not installed", "error"
    install: str
    version: str | None = None
    message: str | None = None
    seconds: float = 0.0
    compiler: str | None = None


@dataclass
class Report:
    backends: list[BackendReport]
    checks: list[Check]
    cases: tuple[Case, ...]
    runs: tuple[tuple[str, str], ...] = RUNS["default"]
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return all(b.status in ("ok", "not installed") for b in self.backends)

    def as_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "runs": [{"mode": m, "dtype": d} for m, d in self.runs],
            "tolerance": {
                "float64": TOLERANCE["float64"],
                "float32": TOLERANCE["float32"],
                "builtin_factor": BUILTIN_FACTOR,
                "scale": "max(1, max |reference|)",
            },
            "backends": {b.name: {k: v for k, v in b.__dict__.items() if k != "name"} for b in self.backends},
            "cases": [
                {"id": c.id, "shape": list(c.shape), "axis": c.axis, "kind": c.kind, "describe": c.describe()}
                for c in self.cases
            ],
            "checks": [c.as_json() for c in self.checks],
        }


def install_hint(extra: str) -> str:
    return f"pip install 'lsx[{extra}]'"


#: Backends sharing an import run in the same worker process.
_GROUPS = (("tensorflow", "keras"), ("jax",), ("torch",), ("numpy",))
_BUILTIN_RUNNERS = {
    "numpy": NumpyRunner,
    "torch": TorchRunner,
    "jax": JaxRunner,
    "tensorflow": TensorflowRunner,
    "keras": KerasRunner,
}


def run(
    names: list[str],
    *,
    matrix: str = "default",
    cases: tuple[Case, ...] = CASES,
    progress: Callable[[str, int], None] | None = None,
    jobs: int = 1,
) -> Report:
    """Run the matrix for ``names``; ``progress(description, advance)`` is called as work completes.

    ``jobs > 1`` runs groups of backends in that many worker processes at once (framework imports and
    compilers are single-threaded enough for this to pay on two cores). Runners registered at run time (not
    the built-in ones) always run in this process.
    """
    groups = [[n for n in group if n in names] for group in _GROUPS]
    groups = [g for g in groups if g]
    parallel = (
        jobs > 1
        and cases is CASES
        and len(groups) > 1
        and all(BACKENDS.get(n) is _BUILTIN_RUNNERS.get(n) for n in names)
    )
    if parallel:
        return _run_parallel(names, groups, matrix, progress, jobs)
    return _run_here(names, matrix=matrix, cases=cases, progress=progress)


def _run_here(
    names: list[str],
    *,
    matrix: str,
    cases: tuple[Case, ...],
    progress: Callable[[str, int], None] | None,
) -> Report:
    start = time.perf_counter()
    tick = progress or (lambda description, advance: None)
    runs = RUNS[matrix]
    datas = {dtype: [make_data(case, dtype) for case in cases] for dtype in DTYPES}
    backends, checks = [], []
    for name in names:
        runner = BACKENDS[name]()
        report = BackendReport(name=name, status="ok", install=install_hint(runner.extra or name))
        backends.append(report)
        began = time.perf_counter()
        tick(f"importing {name}", 0)
        try:
            report.version = runner.setup()
        except ImportError as exc:
            report.status, report.message = "not installed", _one_line(exc)
            tick(name, steps(runner, runs, cases))
            continue
        except Exception as exc:
            report.status, report.message = "error", f"import failed: {_one_line(exc)}"
            tick(name, steps(runner, runs, cases))
            continue
        # the compiler only where compiled runs happen (not with --quick, not for eager-only backends)
        compiles = any(mode == "compiled" and mode in runner.modes for mode, _ in runs)
        report.compiler = (runner.compiler or None) if compiles else None
        tick(name, 1)
        # cases with options this backend's loss does not take yet are not run, and the report says so
        accepted = _accepted_options(runner)
        runnable = {dtype: [d for d in datas[dtype] if set(d.options) <= accepted] for dtype in DTYPES}
        left_out = sorted({o for d in datas[DTYPES[0]] for o in d.options if o not in accepted})
        if left_out:
            report.message = f"not run: cases with {', '.join(left_out)} (this backend does not take them yet)"
        for mode, dtype in runs:
            if mode not in runner.modes:
                continue
            tick(f"{name} {mode} {dtype}", 0)
            new = [Check(name, d.case.id, dtype, mode) for d in runnable[dtype]]
            results = _run_mode(runner, mode, runnable[dtype], new)
            tick(f"{name} {mode} {dtype}", len(datas[dtype]) - len(new))
            for check, data, result in zip(new, runnable[dtype], results):
                if result is not None:
                    _score(check, data, result)
                    if mode == "eager":
                        _score_builtin(check, runner, data, result)
            checks.extend(new)
            tick(f"{name} {mode} {dtype}", len(new))
        mine = [c for c in checks if c.backend == name]
        if not all(c.ok for c in mine):
            report.status = "mismatch"
        report.seconds = round(time.perf_counter() - began, 3)
    return Report(backends, checks, cases, runs, time.perf_counter() - start)


def _run_parallel(names, groups, matrix, progress, jobs) -> Report:
    import json
    import queue
    import subprocess
    import sys
    import threading

    start = time.perf_counter()
    tick = progress or (lambda description, advance: None)
    events: queue.Queue = queue.Queue()
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    def worker(group: list[str]) -> None:
        command = [sys.executable, "-m", "lsx.cli._parity", "--matrix", matrix, *group]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        stderr: list[str] = []
        reader = threading.Thread(target=lambda: stderr.extend(proc.stderr), daemon=True)  # type: ignore[arg-type]
        reader.start()
        report = None
        for line in proc.stdout:  # type: ignore[union-attr]
            message = json.loads(line)
            if "tick" in message:
                events.put(("tick", message["tick"]))
            else:
                report = message["report"]
        proc.wait()
        reader.join()
        events.put(("done", (group, report, proc.returncode, stderr)))

    pending = list(groups)
    running = 0
    finished: dict[str, Any] = {}
    while pending or running:
        while pending and running < jobs:
            threading.Thread(target=worker, args=(pending.pop(0),), daemon=True).start()
            running += 1
        kind, payload = events.get()
        if kind == "tick":
            tick(*payload)
            continue
        running -= 1
        group, report, returncode, stderr = payload
        if report is None:
            last = next((line.strip() for line in reversed(stderr) if line.strip()), f"exit code {returncode}")
            for name in group:
                finished[name] = (
                    BackendReport(
                        name,
                        "error",
                        install_hint(BACKENDS[name]().extra or name),
                        message=f"worker failed: {last[:300]}",
                    ),
                    [],
                )
            continue
        for name in group:
            backend = BackendReport(name=name, **report["backends"][name])
            checks = [Check.from_json(c) for c in report["checks"] if c["backend"] == name]
            finished[name] = (backend, checks)
    backends = [finished[n][0] for n in names]
    checks = [c for n in names for c in finished[n][1]]
    return Report(backends, checks, CASES, RUNS[matrix], time.perf_counter() - start)


def _worker_main(argv: list[str]) -> int:
    import argparse
    import json
    import warnings

    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(prog="python -m lsx.cli._parity")
    parser.add_argument("--matrix", choices=tuple(RUNS), default="default")
    parser.add_argument("backends", nargs="+", choices=tuple(BACKENDS))
    args = parser.parse_args(argv)

    def tick(description: str, advance: int) -> None:
        print(json.dumps({"tick": [description, advance]}), flush=True)

    report = _run_here(args.backends, matrix=args.matrix, cases=CASES, progress=tick)
    print(json.dumps({"report": report.as_json()}), flush=True)
    return 0


def steps(runner: Runner, runs: tuple[tuple[str, str], ...], cases: tuple[Case, ...]) -> int:
    return 1 + sum(len(cases) for mode, _ in runs if mode in runner.modes)


def _run_mode(runner: Runner, mode: str, datas: list[Data], checks: list[Check]) -> list[Result | None]:
    def one(data: Data, check: Check, fn: Callable) -> Result | None:
        try:
            return fn(data)
        except Exception as exc:
            check.error = _one_line(exc)
            return None

    if mode == "eager":
        return [one(d, c, runner.eager) for d, c in zip(datas, checks)]
    try:
        return list(runner.compiled(datas))
    except Exception:
        # find which cases break compilation: compile them one by one
        return [one(d, c, lambda d: runner.compiled([d])[0]) for d, c in zip(datas, checks)]


# --------------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------------
def _fmt(value: float | str | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if value == "inf" or (isinstance(value, float) and math.isinf(value)):
        return "mismatch"
    return "0" if value == 0 else f"{value:.1e}"


def rows(report: Report) -> list[dict[str, Any]]:
    """One row per backend × case: the worst errors over dtypes and modes."""
    out = []
    for backend in report.backends:
        for case in report.cases:
            mine = [c for c in report.checks if c.backend == backend.name and c.case == case.id]
            if not mine:
                continue
            abs_err = max((max(c.loss_abs, c.grad_abs) for c in mine if c.error is None), default=math.nan)
            rel_err = max((max(c.loss_rel, c.grad_rel) for c in mine if c.error is None), default=math.nan)
            builtins = [c.builtin for c in mine if c.builtin]
            builtin = "—"
            if builtins:
                worst = [max(_num(b.get("loss_abs")), _num(b.get("grad_abs"))) for b in builtins if "error" not in b]
                mark = "" if all(b["ok"] for b in builtins) else " ✗"
                builtin = f"{_fmt(max(worst)) if worst else 'n/a'}{mark}"
            failed = [c for c in mine if not c.ok]
            out.append(
                {
                    "backend": backend.name,
                    "case": case.id,
                    "checks": f"{len(mine) - len(failed)}/{len(mine)}",
                    "abs": _fmt(abs_err),
                    "rel": _fmt(rel_err),
                    "builtin": builtin,
                    "ok": not failed,
                    "failed": [f"{c.dtype} {c.mode}" + (f": {c.error}" if c.error else "") for c in failed],
                }
            )
    return out


def _num(value: Any) -> float:
    if value is None:
        return 0.0
    return math.inf if value == "inf" else float(value)


def _modes_text(backend: BackendReport, report: Report) -> str:
    """What ran for ``backend``: "eager", or "eager + <compiler>" where compiled checks ran."""
    modes = {c.mode for c in report.checks if c.backend == backend.name}
    if "compiled" in modes and backend.compiler:
        return f"eager + {backend.compiler}"
    compiled_asked = any(mode == "compiled" for mode, _ in report.runs)
    return "eager" if compiled_asked else "eager only (--quick: nothing compiled)"


def render(report: Report, console: Any) -> None:
    """Print the report with rich."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="lsx parity: loss and gradient vs the float64 reference", title_justify="left")
    for name, justify in (
        ("backend", "left"),
        ("case", "left"),
        ("checks", "right"),
        ("max abs err", "right"),
        ("max rel err", "right"),
        ("built-in Δ", "right"),
        ("", "left"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    previous = None
    for row in rows(report):
        table.add_row(
            row["backend"] if row["backend"] != previous else "",
            row["case"],
            row["checks"],
            row["abs"],
            row["rel"],
            row["builtin"],
            "[green]ok[/]" if row["ok"] else "[bold red]FAIL[/]",
            end_section=False,
        )
        previous = row["backend"]
    if table.row_count:
        console.print(table)
    failures = [(r["backend"], r["case"], f) for r in rows(report) for f in r["failed"]]
    for backend, case, what in failures[:20]:
        console.print(f"[red]✗[/] {backend} {case} {escape(what)}", highlight=False, soft_wrap=True)
    if len(failures) > 20:
        console.print(f"[red]… and {len(failures) - 20} more failures[/]")
    for b in report.backends:
        if b.status == "not installed":
            console.print(
                f"[yellow]not installed[/] {b.name}: {escape(b.install)}  [dim]({escape(b.message or '')})[/]",
                highlight=False,
                soft_wrap=True,
            )
        elif b.status == "error":
            console.print(f"[bold red]error[/] {b.name}: {escape(b.message or '')}", highlight=False, soft_wrap=True)
        else:
            how = _modes_text(b, report)
            console.print(f"[dim]{b.name} {b.version}: {how}, {b.seconds:.1f} s[/]", highlight=False)
            if b.message:  # cases left out (options this backend does not take)
                console.print(f"[yellow]{b.name}: {escape(b.message)}[/]", highlight=False, soft_wrap=True)
    used = sorted({(c.backend, c.builtin["name"]) for c in report.checks if c.builtin})
    if used:
        console.print(
            "[dim]built-in Δ: max abs difference from " + "; ".join(f"{b}: {n}" for b, n in used) + "[/]",
            highlight=False,
        )
    n_checks = len(report.checks)
    n_failed = sum(not c.ok for c in report.checks)
    console.print("[dim]cases: " + "; ".join(f"{c.id}: {c.describe()}" for c in report.cases) + "[/]", highlight=False)
    console.print(
        f"[dim]runs: {', '.join(f'{m} {d}' for m, d in report.runs)}; tolerance {TOLERANCE['float64']:g} (float64), {TOLERANCE['float32']:g} "
        f"(float32) × max(1, max |reference|), ×{BUILTIN_FACTOR:g} against built-ins[/]",
        highlight=False,
    )
    if report.ok:
        console.print(f"[bold green]parity: all {n_checks} checks passed[/] in {report.seconds:.1f} s", highlight=False)
    else:
        console.print(
            f"[bold red]parity: {n_failed} of {n_checks} checks failed[/] in {report.seconds:.1f} s", highlight=False
        )


if __name__ == "__main__":
    import sys

    sys.exit(_worker_main(sys.argv[1:]))
