"""Forward+backward timings of every installed lsx backend against its framework's built-in.

One command::

    python -m benchmarks.run            # every shape
    python -m benchmarks.run --quick    # (4096, 32768) and (64, 10) only

Each (framework, shape) pair runs in a fresh subprocess (``--worker``) so that frameworks do not share
threads or allocators and memory figures start clean. Workload: float32 logits, int64 labels with 1/8 of the
rows set to the ignore index, label smoothing ε = 0.1, mean reduction; one timed call computes the loss and
the gradient with respect to the logits. Times are medians over several calls (3 by default) after a
warm-up call (compilation excluded); on the tiny shape each sample is the mean of a batch of 50 calls, so it
measures per-call overhead.

Peak extra memory: for every method alike, before its first timed call the worker resets the kernel's
resident-set high-water mark (``/proc/self/clear_refs``) and reads the resident set; after the call, with its
results still held, it reads the high-water mark (``VmHWM``). The difference is the memory the call touched beyond the inputs, the gradient
included, whatever allocator the framework uses; it is reported as a multiple of the logits' size.
The copy floor is ``np.copyto`` of the logits into a preallocated buffer: one read and one write.

Writes ``benchmarks/results/results.json``, ``results.md`` and ``results.png``, and prints the table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = [(4096, 32768), (1024, 131072), (131072, 1024), (64, 10)]
QUICK_SHAPES = [(4096, 32768), (64, 10)]
GROUPS = ("numpy", "torch", "jax", "tensorflow")
EPS = 0.1
SOFTCAP = 30.0  # Gemma 2's final-logit soft-capping, timed next to the uncapped call
IGNORE = -100

# which built-ins each lsx method is compared with (method names as the workers report them)
BASELINES = {
    "lsx.numpy (Numba)": ["torch F.cross_entropy eager", "TF XLA built-in"],
    "lsx.numpy out=buffer (preallocated)": ["torch F.cross_entropy eager", "TF XLA built-in"],
    "lsx.numpy out=logits (in place)": ["torch F.cross_entropy eager", "TF XLA built-in"],
    "lsx.numpy (pure NumPy)": ["torch F.cross_entropy eager"],
    "lsx.torch": ["torch F.cross_entropy eager", "torch.compile(F.cross_entropy)"],
    "lsx.jax jit": ["optax one-hot recipe jit"],
    "lsx.tensorflow XLA": ["Keras one-hot CategoricalCrossentropy", "TF XLA built-in"],
    # soft-capped calls against the same call without capping
    f"lsx.numpy (Numba) softcap={SOFTCAP:g}": ["lsx.numpy (Numba)"],
    f"lsx.torch softcap={SOFTCAP:g}": ["lsx.torch"],
    f"lsx.jax jit softcap={SOFTCAP:g}": ["lsx.jax jit"],
    f"lsx.tensorflow XLA softcap={SOFTCAP:g}": ["lsx.tensorflow XLA"],
}


# --------------------------------------------------------------------------------------------------------
# Worker side: one framework, one shape
# --------------------------------------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current resident set
    except OSError:
        return False
    return True


def _measure(call: Callable[[], Any], big: bool, repeats: int) -> dict[str, Any]:
    """Median time of warm calls, and the peak extra resident memory of the first timed one."""
    call()  # warm-up: compilation and first-touch allocations
    record: dict[str, Any] = {}
    samples = []
    if big:
        for i in range(repeats):
            measure_memory = i == 0 and _reset_peak()
            before = _status("VmRSS") if measure_memory else 0
            start = time.perf_counter()
            result = call()
            samples.append(time.perf_counter() - start)
            if measure_memory:
                record["peak_extra_bytes"] = max(0, _status("VmHWM") - before)
            del result
    else:
        call()
        batch = 50
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(batch):
                call()
            samples.append((time.perf_counter() - start) / batch)
    record.update(median_ms=1e3 * statistics.median(samples), min_ms=1e3 * min(samples), runs=len(samples))
    return record


def _data(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    n, k = shape
    logits = rng.standard_normal(shape, dtype=np.float32)
    labels = rng.integers(0, k, n)
    labels[rng.permutation(n)[: n // 8]] = IGNORE
    return logits, labels


def _numpy_methods(logits, labels):
    import lsx.numpy

    buffer = np.empty_like(logits)
    yield "copy floor (np.copyto)", "NumPy", lambda: np.copyto(buffer, logits)
    yield "allocating copy (logits.copy())", "NumPy", lambda: logits.copy()
    if lsx.numpy._numba_kernel() is None:
        yield "lsx.numpy (Numba)", "NumPy", None  # reported as unavailable
    else:
        yield "lsx.numpy (Numba)", "NumPy", lambda: lsx.numpy.loss_and_grad(logits, labels, label_smoothing=EPS)
        yield (
            f"lsx.numpy (Numba) softcap={SOFTCAP:g}",
            "NumPy",
            lambda: lsx.numpy.loss_and_grad(logits, labels, label_smoothing=EPS, softcap=SOFTCAP),
        )
        yield (
            "lsx.numpy out=buffer (preallocated)",
            "NumPy",
            lambda: lsx.numpy.loss_and_grad(logits, labels, label_smoothing=EPS, out=buffer),
        )
        scratch = logits.copy()
        # the logits are overwritten by their gradient at every call; timings run on those (finite) values
        yield (
            "lsx.numpy out=logits (in place)",
            "NumPy",
            lambda: lsx.numpy.loss_and_grad(scratch, labels, label_smoothing=EPS, out=scratch),
        )
        del scratch

    def pure():
        saved = lsx.numpy._numba_kernel
        lsx.numpy._numba_kernel = lambda: None
        try:
            return lsx.numpy.loss_and_grad(logits, labels, label_smoothing=EPS)
        finally:
            lsx.numpy._numba_kernel = saved

    yield "lsx.numpy (pure NumPy)", "NumPy", pure


def _torch_methods(logits, labels):
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(logits).requires_grad_(True)
    y = torch.from_numpy(labels)

    def step(fn):
        def call():
            value = fn(x, y)
            value.backward()
            grad, x.grad = x.grad, None  # the caller holds the gradient; nothing stays behind between calls
            return value, grad

        return call

    builtin = lambda x, y: F.cross_entropy(x, y, label_smoothing=EPS, ignore_index=IGNORE)
    yield "torch F.cross_entropy eager", "PyTorch", step(builtin)
    yield "torch.compile(F.cross_entropy)", "PyTorch", step(torch.compile(builtin))
    if importlib.util.find_spec("lsx.torch") is None:
        yield "lsx.torch", "PyTorch", "lsx.torch not written yet"
    else:
        import lsx.torch

        yield "lsx.torch", "PyTorch", step(lambda x, y: lsx.torch.loss(x, y, label_smoothing=EPS))
        yield (
            f"lsx.torch softcap={SOFTCAP:g}",
            "PyTorch",
            step(lambda x, y: lsx.torch.loss(x, y, label_smoothing=EPS, softcap=SOFTCAP)),
        )


def _jax_methods(logits, labels):
    import jax
    import jax.numpy as jnp
    import optax

    x = jax.device_put(logits)
    y = jax.device_put(labels)
    k = logits.shape[1]

    def optax_recipe(x, y):
        active = y != IGNORE
        targets = optax.smooth_labels(jax.nn.one_hot(jnp.where(active, y, 0), k, dtype=x.dtype), EPS)
        per_row = optax.softmax_cross_entropy(x, targets)
        return jnp.sum(jnp.where(active, per_row, 0)) / jnp.sum(active)

    def block(fn):
        compiled = jax.jit(jax.value_and_grad(fn))
        return lambda: jax.block_until_ready(compiled(x, y))

    if importlib.util.find_spec("lsx.jax") is None:
        yield "lsx.jax jit", "JAX", "lsx.jax not written yet"
    else:
        import lsx.jax

        yield "lsx.jax jit", "JAX", block(lambda x, y: lsx.jax.loss(x, y, label_smoothing=EPS))
        yield (
            f"lsx.jax jit softcap={SOFTCAP:g}",
            "JAX",
            block(lambda x, y: lsx.jax.loss(x, y, label_smoothing=EPS, softcap=SOFTCAP)),
        )
    yield "optax one-hot recipe jit", "JAX", block(optax_recipe)


def _tensorflow_methods(logits, labels):
    from lsx import _compat

    _compat.load_triton_first()  # Triton loaded after TensorFlow aborts the process (lsx._compat)
    import tensorflow as tf

    x = tf.constant(logits)
    y = tf.constant(labels)
    k = logits.shape[1]

    def with_grad(fn, jit):
        @tf.function(jit_compile=jit)
        def step(x, y):
            with tf.GradientTape() as tape:
                tape.watch(x)
                value = fn(x, y)
            return value, tape.gradient(value, x)

        return lambda: [t.numpy() for t in step(x, y)]

    if importlib.util.find_spec("lsx.tensorflow") is None:
        yield "lsx.tensorflow XLA", "TensorFlow", "lsx.tensorflow not written yet"
    else:
        import lsx.tensorflow

        yield (
            "lsx.tensorflow XLA",
            "TensorFlow",
            with_grad(lambda x, y: lsx.tensorflow.loss(x, y, label_smoothing=EPS), True),
        )
        yield (
            f"lsx.tensorflow XLA softcap={SOFTCAP:g}",
            "TensorFlow",
            with_grad(lambda x, y: lsx.tensorflow.loss(x, y, label_smoothing=EPS, softcap=SOFTCAP), True),
        )

    import keras

    cce = keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=EPS)

    def keras_one_hot(x, y):
        active = tf.cast(y != IGNORE, x.dtype)
        return cce(tf.one_hot(tf.where(y != IGNORE, y, 0), k, dtype=x.dtype), x, sample_weight=active)

    def tf_builtin(x, y):
        active = tf.cast(y != IGNORE, x.dtype)
        targets = tf.one_hot(tf.where(y != IGNORE, y, 0), k, dtype=x.dtype) * (1 - EPS) + EPS / k
        per_row = tf.nn.softmax_cross_entropy_with_logits(targets, x)
        return tf.reduce_sum(per_row * active) / tf.reduce_sum(active)

    yield "Keras one-hot CategoricalCrossentropy", "TensorFlow", with_grad(keras_one_hot, False)
    yield "TF XLA built-in", "TensorFlow", with_grad(tf_builtin, True)


def worker(group: str, shape: tuple[int, int], repeats: int) -> None:
    logits, labels = _data(shape)
    big = shape[0] * shape[1] >= 1 << 20
    methods = {
        "numpy": _numpy_methods,
        "torch": _torch_methods,
        "jax": _jax_methods,
        "tensorflow": _tensorflow_methods,
    }[group](logits, labels)
    for name, framework, call in methods:
        record: dict[str, Any] = {"method": name, "framework": framework, "shape": list(shape)}
        if call is None or isinstance(call, str):
            record["note"] = call or "unavailable"
        else:
            try:
                record.update(_measure(call, big, repeats if big else max(repeats, 7)))
                if "peak_extra_bytes" in record:
                    record["peak_extra_x_logits"] = record["peak_extra_bytes"] / logits.nbytes
            except Exception as error:  # a backend that fails is reported, not fatal
                record["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}"
        print("RESULT " + json.dumps(record), flush=True)
        call = None


# --------------------------------------------------------------------------------------------------------
# Driver side
# --------------------------------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    memory = None
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    versions = {}
    for module in ("numpy", "numba", "torch", "jax", "tensorflow", "keras"):
        if importlib.util.find_spec(module) is not None:
            from importlib.metadata import PackageNotFoundError, version

            try:
                versions[module] = version(module if module != "tensorflow" else "tensorflow-cpu")
            except PackageNotFoundError:
                try:
                    versions[module] = version(module)
                except PackageNotFoundError:
                    versions[module] = "?"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(memory / 2**30, 1) if memory else None,
        "python": platform.python_version(),
        "system": platform.platform(),
        "versions": versions,
    }


def run_group(group: str, shape: tuple[int, int], repeats: int, timeout: int) -> list[dict[str, Any]]:
    requirement = {"numpy": "numpy", "torch": "torch", "jax": "jax", "tensorflow": "tensorflow"}[group]
    if importlib.util.find_spec(requirement) is None:
        return [{"method": f"{group} backend", "shape": list(shape), "note": f"{requirement} not installed"}]
    command = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--worker",
        group,
        "--shape",
        f"{shape[0]},{shape[1]}",
        "--repeats",
        str(repeats),
    ]
    env = dict(
        os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), TF_CPP_MIN_LOG_LEVEL="2"
    )
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        records = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
        return records + [{"method": f"{group} (rest)", "shape": list(shape), "note": f"timed out after {timeout} s"}]
    records = [json.loads(line[7:]) for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
        records.append(
            {"method": f"{group} worker", "shape": list(shape), "note": f"exit {done.returncode}: {tail[0][:200]}"}
        )
    return records


def add_ratios(records: list[dict[str, Any]]) -> None:
    by_key = {(r["method"], tuple(r["shape"])): r for r in records if "median_ms" in r}
    for r in records:
        if "median_ms" not in r:
            continue
        shape = tuple(r["shape"])
        floor = by_key.get(("copy floor (np.copyto)", shape))
        if floor:
            r["x_copy_floor"] = r["median_ms"] / floor["median_ms"]
        speedups = {}
        for baseline in BASELINES.get(r["method"], []):
            other = by_key.get((baseline, shape))
            if other:
                speedups[baseline] = other["median_ms"] / r["median_ms"]
        if speedups:
            r["speedup_vs"] = speedups


def markdown(records: list[dict[str, Any]], info: dict[str, Any]) -> str:
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; Python {info['python']}; "
        + ", ".join(f"{k} {v}" for k, v in info["versions"].items()),
        "",
        "fp32 logits, int64 labels with 1/8 ignored, ε = 0.1, mean; forward + backward; median of "
        "several warm calls. Peak extra memory: resident-set high-water mark of one call over the inputs, "
        "gradient included, in units of the logits' size.",
        "",
        "| shape | method | median ms | × copy floor | peak extra (× logits) | speed-up vs built-in (soft-capped: vs uncapped) |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in records:
        shape = "×".join(map(str, r["shape"]))
        if "median_ms" not in r:
            lines.append(f"| {shape} | {r['method']} | — | — | — | {r.get('note', '')} |")
            continue
        ms = r["median_ms"]
        ms_text = f"{ms:.3f}" if ms < 1 else f"{ms:.1f}"
        floor = f"{r['x_copy_floor']:.2f}" if "x_copy_floor" in r and r["shape"][0] * r["shape"][1] > 1000 else ""
        peak = (
            f"{r['peak_extra_x_logits']:.2f}"
            if "peak_extra_x_logits" in r and r["shape"][0] * r["shape"][1] > 1000
            else ""
        )
        speed = "; ".join(f"{v:.1f}× vs {k}" for k, v in r.get("speedup_vs", {}).items())
        lines.append(f"| {shape} | {r['method']} | {ms_text} | {floor} | {peak} | {speed} |")
    return "\n".join(lines) + "\n"


def chart(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = []
    for r in records:
        if tuple(r["shape"]) not in shapes:
            shapes.append(tuple(r["shape"]))
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 6), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        rows = [r for r in records if tuple(r["shape"]) == shape and "median_ms" in r]
        names = [r["method"] for r in rows]
        values = [r["median_ms"] for r in rows]
        colors = [
            "tab:grey"
            if "copy" in n and not n.startswith("lsx")
            else "tab:blue"
            if n.startswith("lsx")
            else "tab:orange"
            for n in names
        ]
        ax.barh(range(len(rows)), values, color=colors)
        ax.set_yticks(range(len(rows)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("ms per forward+backward (log scale)")
        ax.set_title("×".join(map(str, shape)))
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    fig.suptitle("Label-smoothed cross-entropy, fp32, ε=0.1: lsx (blue) vs built-ins (orange), copies (grey)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="main shape and tiny shape only")
    parser.add_argument("--groups", default=",".join(GROUPS), help="frameworks to run, comma-separated")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per method (big shapes)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for results.{json,md,png}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        worker(args.worker, tuple(int(v) for v in args.shape.split(",")), args.repeats or 5)
        return 0

    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats = args.repeats or 3
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB", flush=True)
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for shape in shapes:
        for group in [g.strip() for g in args.groups.split(",") if g.strip()]:
            t0 = time.perf_counter()
            found = run_group(group, shape, repeats, timeout=600)
            records.extend(found)
            print(f"  {group:<10} {shape}: {len(found)} results in {time.perf_counter() - t0:.0f} s", flush=True)
    add_ratios(records)

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "machine": info,
        "epsilon": EPS,
        "ignored_fraction": 1 / 8,
        "dtype": "float32",
        "quick": args.quick,
        "wall_s": time.perf_counter() - started,
        "results": records,
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=2) + "\n")
    table = markdown(records, info)
    (args.out / "results.md").write_text(table)
    try:
        chart(records, args.out / "results.png")
    except ImportError:
        print("matplotlib not installed: no chart")
    print()
    print(table)
    print(f"written to {args.out}/results.{{json,md,png}} in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
