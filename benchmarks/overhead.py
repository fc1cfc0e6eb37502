"""Per-call overhead at everyday sizes, torch.compile graph counts and cold start.

One command::

    python -m benchmarks.overhead            # writes benchmarks/results/overhead.md and prints it
    python -m benchmarks.overhead --rounds 9 # fewer timing rounds (default 25)
    python -m benchmarks.overhead --threads 1  # one intra-op thread (steadier on a busy shared machine)

What it measures, float32 logits on the CPU, integer labels (none ignored: an image classifier's batch):

1. PyTorch, side by side in this process: forward + backward of ``lsx.torch.loss`` and
   ``lsx.torch.CrossEntropyLoss`` against ``torch.nn.functional.cross_entropy`` at (64, 10), (64, 196) and
   (256, 1000), with ε = 0 and ε = 0.1. The methods are timed in interleaved rounds (each round times a batch
   of calls of every method in turn), so a busy machine slows them alike; the table gives the median per-call
   time over the rounds and the ratio to ``F.cross_entropy`` (below 1: lsx is faster).
2. ``lsx.numpy.loss_and_grad`` and ``lsx.numpy.loss`` at (64, 10) and (64, 196), same rounds.
3. JAX and TensorFlow per call at (64, 10), ε = 0.1, each in a fresh subprocess: ``jax.jit(value_and_grad)``
   of ``lsx.jax.loss`` and an eager ``lsx.jax.loss`` call (option and value checks included), against the
   optax one-hot recipe; eager ``lsx.tensorflow.loss`` under a ``GradientTape`` and the same step in a
   ``tf.function(jit_compile=True)``, against ``tf.nn.softmax_cross_entropy_with_logits`` on smoothed one-hots.
4. ``torch.compile(fullgraph=True)`` of a function calling ``lsx.torch.loss`` with 6 values of
   ``label_smoothing``, ``z_loss`` and ``softcap`` (one option at a time, a fresh dynamo state for each):
   the number of graphs compiled (a backend that counts its calls and runs the graph eagerly) and the largest
   difference from the eager loss. Failures are reported, not fatal.
5. Cold start, each in fresh subprocesses: ``import lsx.numpy`` and ``import lsx.torch``; the first
   ``lsx.numpy.loss_and_grad`` call at (64, 10) (the serial kernel) and then at (256, 1000) (the threaded
   one) with an empty Numba cache directory (compilation) and again with the cache the first process wrote
   (cache load), counting the kernels Numba compiled in each (``NUMBA_DEBUG_CACHE``); and the first
   ``lsx.torch.loss`` forward + backward in a fresh process, with an empty cache and with the cache an earlier
   lsx.torch process wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
TORCH_SHAPES = [(64, 10), (64, 196), (256, 1000)]
NUMPY_SHAPES = [(64, 10), (64, 196)]
EPSILONS = (0.0, 0.1)
SCHEDULE = {
    "label_smoothing": [0.0, 0.02, 0.05, 0.1, 0.15, 0.2],
    "z_loss": [0.0, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3],
    "softcap": [10.0, 15.0, 20.0, 30.0, 40.0, 50.0],
}


def _data(shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n, k = shape
    return rng.standard_normal(shape, dtype=np.float32), rng.integers(0, k, n)


def _interleaved(methods: dict[str, Callable[[], Any]], rounds: int, target_s: float = 0.004) -> dict[str, float]:
    """Median per-call milliseconds of each method, timed in interleaved rounds of batched calls."""
    batches = {}
    for name, call in methods.items():
        call()
        call()
        start = time.perf_counter()
        call()
        once = time.perf_counter() - start
        batches[name] = max(1, min(200, int(target_s / max(once, 1e-7))))
    samples: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(rounds):
        for name, call in methods.items():
            batch = batches[name]
            start = time.perf_counter()
            for _ in range(batch):
                call()
            samples[name].append((time.perf_counter() - start) / batch)
    return {name: 1e3 * statistics.median(values) for name, values in samples.items()}


# --------------------------------------------------------------------------------------------------------
# 1-2: PyTorch and NumPy side by side
# --------------------------------------------------------------------------------------------------------
def torch_rows(rounds: int) -> list[dict[str, Any]]:
    import torch
    import torch.nn.functional as F

    import lsx.torch

    rows = []
    for shape in TORCH_SHAPES:
        logits, labels = _data(shape)
        x = torch.from_numpy(logits).requires_grad_(True)
        y = torch.from_numpy(labels)
        for eps in EPSILONS:
            module = lsx.torch.CrossEntropyLoss(label_smoothing=eps)

            def step(fn: Callable[[], torch.Tensor], x: torch.Tensor = x) -> Callable[[], Any]:
                def call() -> Any:
                    value = fn()
                    value.backward()
                    grad, x.grad = x.grad, None
                    return value, grad

                return call

            methods = {
                "F.cross_entropy": step(lambda x=x, y=y, eps=eps: F.cross_entropy(x, y, label_smoothing=eps)),
                "lsx.torch.loss": step(lambda x=x, y=y, eps=eps: lsx.torch.loss(x, y, label_smoothing=eps)),
                "lsx.torch.CrossEntropyLoss": step(lambda x=x, y=y, module=module: module(x, y)),
            }
            times = _interleaved(methods, rounds)
            base = times["F.cross_entropy"]
            rows.append(
                {
                    "shape": shape,
                    "eps": eps,
                    "F": base,
                    "loss": times["lsx.torch.loss"],
                    "module": times["lsx.torch.CrossEntropyLoss"],
                    "loss_ratio": times["lsx.torch.loss"] / base,
                    "module_ratio": times["lsx.torch.CrossEntropyLoss"] / base,
                }
            )
            print(f"  torch {shape} eps={eps:g}: " + ", ".join(f"{k} {v:.4f} ms" for k, v in times.items()), flush=True)
    return rows


def numpy_rows(rounds: int) -> list[dict[str, Any]]:
    import lsx.numpy

    rows = []
    for shape in NUMPY_SHAPES:
        logits, labels = _data(shape)
        methods = {}
        for eps in EPSILONS:
            methods[f"loss_and_grad eps={eps:g}"] = lambda x=logits, y=labels, eps=eps: lsx.numpy.loss_and_grad(
                x, y, label_smoothing=eps
            )
        methods["loss eps=0.1"] = lambda x=logits, y=labels: lsx.numpy.loss(x, y, label_smoothing=0.1)
        for name, ms in _interleaved(methods, rounds).items():
            rows.append({"shape": shape, "method": f"lsx.numpy.{name}", "ms": ms})
            print(f"  numpy {shape} {name}: {ms:.4f} ms", flush=True)
    return rows


# --------------------------------------------------------------------------------------------------------
# 3: JAX and TensorFlow per call (workers in fresh subprocesses)
# --------------------------------------------------------------------------------------------------------
def _jax_worker(rounds: int) -> list[dict[str, Any]]:
    import jax
    import jax.numpy as jnp

    import lsx.jax

    logits, labels = _data((64, 10))
    x, y = jax.device_put(logits), jax.device_put(labels)
    k = logits.shape[1]

    def optax_recipe(x, y):
        import optax

        return jnp.mean(optax.softmax_cross_entropy(x, optax.smooth_labels(jax.nn.one_hot(y, k, dtype=x.dtype), 0.1)))

    lsx_jit = jax.jit(jax.value_and_grad(lambda x, y: lsx.jax.loss(x, y, label_smoothing=0.1)))
    methods = {
        "lsx.jax.loss jit(value_and_grad)": lambda: jax.block_until_ready(lsx_jit(x, y)),
        "lsx.jax.loss eager (value)": lambda: jax.block_until_ready(lsx.jax.loss(x, labels, label_smoothing=0.1)),
    }
    try:
        optax_jit = jax.jit(jax.value_and_grad(optax_recipe))
        methods["optax one-hot recipe jit(value_and_grad)"] = lambda: jax.block_until_ready(optax_jit(x, y))
    except ImportError:
        pass
    return [{"method": name, "ms": ms} for name, ms in _interleaved(methods, rounds).items()]


def _tensorflow_worker(rounds: int) -> list[dict[str, Any]]:
    import tensorflow as tf

    import lsx.tensorflow

    logits, labels = _data((64, 10))
    x, y = tf.constant(logits), tf.constant(labels)
    k = logits.shape[1]

    def builtin(x, y):
        targets = tf.one_hot(y, k, dtype=x.dtype) * 0.9 + 0.1 / k
        return tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(targets, x))

    def ours(x, y):
        return lsx.tensorflow.loss(x, y, label_smoothing=0.1)

    def taped(fn):
        def step(x, y):
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = fn(x, y)
            return value, tape.gradient(value, x)

        return step

    xla_ours = tf.function(taped(ours), jit_compile=True)
    xla_builtin = tf.function(taped(builtin), jit_compile=True)
    methods = {
        "lsx.tensorflow.loss eager + tape": lambda: [t.numpy() for t in taped(ours)(x, y)],
        "lsx.tensorflow.loss tf.function(jit_compile=True)": lambda: [t.numpy() for t in xla_ours(x, y)],
        "TF built-in eager + tape": lambda: [t.numpy() for t in taped(builtin)(x, y)],
        "TF built-in tf.function(jit_compile=True)": lambda: [t.numpy() for t in xla_builtin(x, y)],
    }
    return [{"method": name, "ms": ms} for name, ms in _interleaved(methods, rounds).items()]


def _run_worker(name: str, rounds: int) -> list[dict[str, Any]]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.overhead", "--worker", name, "--rounds", str(rounds)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return [{"method": f"{name} worker failed: {tail[0][:200]}", "ms": float("nan")}]


# --------------------------------------------------------------------------------------------------------
# 4: torch.compile graph counts over a schedule
# --------------------------------------------------------------------------------------------------------
def compile_rows() -> list[dict[str, Any]]:
    import torch
    import torch._dynamo

    import lsx.torch

    logits, labels = _data((64, 10))
    x, y = torch.from_numpy(logits), torch.from_numpy(labels)
    rows = []
    for option, values in SCHEDULE.items():
        torch._dynamo.reset()
        graphs = 0

        def counting(gm, example_inputs):
            nonlocal graphs
            graphs += 1
            return gm.forward

        def f(x, y, value, option=option):
            return lsx.torch.loss(x, y, **{option: value})

        compiled = torch.compile(f, backend=counting, fullgraph=True)
        row: dict[str, Any] = {"option": option, "values": values}
        try:
            worst = 0.0
            for value in values:
                got = compiled(x, y, value)
                want = f(x, y, value)
                worst = max(worst, float((got - want).abs().max()))
            row.update(graphs=graphs, max_diff=worst)
        except Exception as error:  # reported in the table
            row.update(graphs=graphs, error=f"{type(error).__name__}: {str(error).splitlines()[0][:120]}")
        rows.append(row)
        print(f"  torch.compile {option}: {row}", flush=True)
    torch._dynamo.reset()
    return rows


# --------------------------------------------------------------------------------------------------------
# 5: cold start
# --------------------------------------------------------------------------------------------------------
_IMPORT = "import time; t = time.perf_counter(); import {module}; print('SECONDS', time.perf_counter() - t)"
_FIRST_NUMPY = """
import time
t = time.perf_counter()
import numpy as np, lsx.numpy
imported = time.perf_counter() - t
rng = np.random.default_rng(0)
for shape in [(64, 10), (256, 1000)]:
    x = rng.standard_normal(shape, dtype=np.float32); y = rng.integers(0, shape[1], shape[0])
    t = time.perf_counter(); lsx.numpy.loss_and_grad(x, y, label_smoothing=0.1); first = time.perf_counter() - t
    t = time.perf_counter(); lsx.numpy.loss_and_grad(x, y, label_smoothing=0.1); second = time.perf_counter() - t
    print('FIRST', shape[0], shape[1], first, second)
print('IMPORT', imported)
"""
_FIRST_TORCH = """
import time
t = time.perf_counter()
import torch, lsx.torch
imported = time.perf_counter() - t
x = torch.randn(64, 10, requires_grad=True); y = torch.randint(0, 10, (64,))
t = time.perf_counter(); lsx.torch.loss(x, y, label_smoothing=0.1).backward(); first = time.perf_counter() - t
x.grad = None
t = time.perf_counter(); lsx.torch.loss(x, y, label_smoothing=0.1).backward(); second = time.perf_counter() - t
print('FIRST', 64, 10, first, second)
print('IMPORT', imported)
"""


def _python(code: str, env_extra: dict[str, str] | None = None) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    env.update(env_extra or {})
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=True
    )
    return time.perf_counter() - start, done.stdout + done.stderr


def _compiled_count(output: str) -> int:
    """Kernels Numba compiled (and saved) in a process run with ``NUMBA_DEBUG_CACHE=1``."""
    return sum(1 for line in output.splitlines() if "data saved to" in line)


def _loaded_count(output: str) -> int:
    return sum(1 for line in output.splitlines() if "data loaded from" in line)


def cold_rows(repeats: int = 3) -> list[dict[str, Any]]:
    rows = []
    for module in ("lsx.numpy", "lsx.torch"):
        seconds = []
        for _ in range(repeats):
            _, out = _python(_IMPORT.format(module=module))
            seconds.append(float(out.split("SECONDS")[1].split()[0]))
        rows.append({"what": f"import {module} (fresh process)", "s": statistics.median(seconds)})

    def first_calls(label: str, out: str, wall: float) -> None:
        for line in out.splitlines():
            if line.startswith("FIRST"):
                _, n, k, first, second = line.split()
                rows.append(
                    {
                        "what": f"{label}: first call ({n}, {k}) [then a warm call]",
                        "s": float(first),
                        "warm_s": float(second),
                    }
                )
        rows.append(
            {
                "what": f"{label}: whole process",
                "s": wall,
                "compiled": _compiled_count(out),
                "loaded": _loaded_count(out),
            }
        )

    with tempfile.TemporaryDirectory() as cache:
        debug = {"NUMBA_CACHE_DIR": cache, "NUMBA_DEBUG_CACHE": "1"}
        wall, out = _python(_FIRST_NUMPY, debug)
        first_calls("lsx.numpy, empty Numba cache", out, wall)
        for attempt in range(2):
            wall, out = _python(_FIRST_NUMPY, debug)
            first_calls(f"lsx.numpy, cache from an earlier process (#{attempt + 1})", out, wall)
    with tempfile.TemporaryDirectory() as cache:  # lsx.torch's short path has its own kernel entry
        debug = {"NUMBA_CACHE_DIR": cache, "NUMBA_DEBUG_CACHE": "1"}
        wall, out = _python(_FIRST_TORCH, debug)
        first_calls("lsx.torch, empty Numba cache", out, wall)
        wall, out = _python(_FIRST_TORCH, debug)
        first_calls("lsx.torch, cache from an earlier process", out, wall)
    return rows


# --------------------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------------------
def _versions() -> str:
    import importlib.metadata as md

    found = []
    for name in ("numpy", "numba", "torch", "jax", "tensorflow"):
        try:
            found.append(f"{name} {md.version(name)}")
        except md.PackageNotFoundError:
            pass
    return ", ".join(found)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        "# Per-call overhead, torch.compile graphs, cold start",
        "",
        f"`python -m benchmarks.overhead`: {report['machine']}; load average {report['load_before']} before,"
        f" {report['load_after']} after (a shared machine: the lsx and built-in figures of one table are timed"
        " in interleaved rounds, so load slows them alike). float32 on the CPU, forward + backward, median ms"
        f" per call; intra-op threads: {report['threads']}.",
        "",
        "## PyTorch: lsx against torch.nn.functional.cross_entropy",
        "",
        "| shape | ε | F.cross_entropy | lsx.torch.loss | ratio | lsx.torch.CrossEntropyLoss | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["torch"]:
        lines.append(
            f"| {r['shape'][0]}×{r['shape'][1]} | {r['eps']:g} | {r['F']:.4f} | {r['loss']:.4f} |"
            f" {r['loss_ratio']:.2f}× | {r['module']:.4f} | {r['module_ratio']:.2f}× |"
        )
    lines += ["", "## NumPy", "", "| shape | call | median ms |", "|---|---|---:|"]
    for r in report["numpy"]:
        lines.append(f"| {r['shape'][0]}×{r['shape'][1]} | {r['method']} | {r['ms']:.4f} |")
    lines += [
        "",
        "## JAX and TensorFlow, (64, 10), ε = 0.1, loss and gradient unless noted",
        "",
        "| call | median ms |",
        "|---|---:|",
    ]
    for r in report["jax"] + report["tensorflow"]:
        lines.append(f"| {r['method']} | {r['ms']:.4f} |")
    lines += [
        "",
        "## torch.compile(fullgraph=True) over a schedule of 6 values",
        "",
        "| option | values | graphs compiled | max |compiled − eager| |",
        "|---|---|---:|---:|",
    ]
    for r in report["compile"]:
        diff = f"{r['max_diff']:.2e}" if "max_diff" in r else r.get("error", "")
        lines.append(f"| {r['option']} | {', '.join(f'{v:g}' for v in r['values'])} | {r['graphs']} | {diff} |")
    lines += [
        "",
        "## Cold start (fresh processes)",
        "",
        "| what | seconds | warm call s | kernels compiled / loaded |",
        "|---|---:|---:|---|",
    ]
    for r in report["cold"]:
        warm = f"{r['warm_s']:.5f}" if "warm_s" in r else ""
        counts = f"{r['compiled']} / {r['loaded']}" if "compiled" in r else ""
        lines.append(f"| {r['what']} | {r['s']:.3f} | {warm} | {counts} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=25, help="interleaved timing rounds per table")
    parser.add_argument("--out", type=Path, default=RESULTS / "overhead.md")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads for torch and Numba in the timing tables (default: theirs); 1 keeps a busy shared"
        " machine from stalling multi-threaded calls",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        import numba
        import torch

        torch.set_num_threads(args.threads)
        numba.set_num_threads(args.threads)
    if args.worker:
        work = {"jax": _jax_worker, "tensorflow": _tensorflow_worker}[args.worker]
        print("RESULT " + json.dumps(work(args.rounds)), flush=True)
        return 0

    load_before = " ".join(f"{v:.1f}" for v in os.getloadavg())
    report: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python"
        f" {platform.python_version()}, {_versions()}",
        "load_before": load_before,
        "threads": "default" if not args.threads else str(args.threads),
    }
    print("PyTorch and NumPy, side by side", flush=True)
    report["torch"] = torch_rows(args.rounds)
    report["numpy"] = numpy_rows(args.rounds)
    print("JAX and TensorFlow workers", flush=True)
    report["jax"] = _run_worker("jax", args.rounds)
    report["tensorflow"] = _run_worker("tensorflow", args.rounds)
    print("torch.compile graph counts", flush=True)
    report["compile"] = compile_rows()
    print("cold start", flush=True)
    report["cold"] = cold_rows()
    report["load_after"] = " ".join(f"{v:.1f}" for v in os.getloadavg())
    text = markdown(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
