"""Fused linear + loss in JAX: ``lsx.jax.linear_loss`` against the materialised logits.

One command::

    python -m benchmarks.linear_jax              # N=4096, H=512, V=32768, float32, CPU
    python -m benchmarks.linear_jax --shape 1024,256,8192 --repeats 3

Workload: ``jit(value_and_grad)`` with respect to hidden (N, H) and kernel (H, V) of the mean label-smoothed
cross-entropy (ε = 0.1, int32 labels with 1/8 of the rows set to -100) of the logits ``hidden @ kernel``:

- ``lsx.jax.linear_loss`` (chunked, default chunk: 2**22 // V rows, and twice that);
- ``hidden @ kernel`` then ``lsx.jax.loss`` (the logits and their gradient materialised).

Each method runs in a fresh subprocess (``--worker``). Time: median of ``--repeats`` warm calls (compilation
excluded). Memory: the compiled program's temporary buffers (``memory_analysis().temp_size_in_bytes``), and
the process's peak resident memory over the first call after compilation beyond what was resident before it
(the kernel's high-water mark reset through ``/proc/self/clear_refs``; no buffer is cached yet by then), which
counts the outputs (the gradients) too.

Writes ``benchmarks/results/linear_jax.md`` and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
EPS = 0.1
IGNORE = -100
METHODS = (
    "lsx.jax.linear_loss (chunked, default chunk)",
    "matmul + lsx.jax.loss (materialised)",
    "lsx.jax.linear_loss (chunked, 2 × default chunk)",
)


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


def worker(method: str, n: int, hidden_size: int, v: int, repeats: int) -> dict:
    import jax
    import jax.numpy as jnp

    import lsx.jax

    rng = np.random.default_rng(0)
    h = jax.device_put(rng.normal(size=(n, hidden_size)).astype(np.float32))
    kernel = jax.device_put((rng.normal(size=(hidden_size, v)) / np.sqrt(hidden_size)).astype(np.float32))
    labels = rng.integers(0, v, size=n).astype(np.int32)
    labels[::8] = IGNORE
    y = jax.device_put(labels)

    if method != METHODS[1]:
        from lsx.jax._linear import CHUNK_ELEMENTS

        chunk = None if method == METHODS[0] else 2 * max(1, CHUNK_ELEMENTS // v)

        def fn(h, kernel, y):
            return lsx.jax.linear_loss(h, kernel, y, label_smoothing=EPS, chunk_size=chunk)
    else:

        def fn(h, kernel, y):
            return lsx.jax.loss(jnp.dot(h, kernel), y, label_smoothing=EPS)

    jitted = jax.jit(jax.value_and_grad(fn, (0, 1)))
    compiled = jitted.lower(h, kernel, y).compile()
    analysis = compiled.memory_analysis()
    record = dict(method=method, shape=[n, hidden_size, v], temp_bytes=int(analysis.temp_size_in_bytes))
    # memory: the first call after compilation, before any buffer could be cached by an allocator
    measure = _reset_peak()
    before = _status("VmRSS")
    result = jax.block_until_ready(compiled(h, kernel, y))
    if measure:
        record["peak_extra_bytes"] = max(0, _status("VmHWM") - before)
    record["loss"] = float(result[0])
    del result
    samples, cpu = [], []
    for _ in range(repeats):  # time: warm calls; wall clock, and the process's CPU time (less sensitive to load)
        start, start_cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(compiled(h, kernel, y))
        samples.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    record.update(
        median_s=statistics.median(samples), min_s=min(samples), cpu_s=statistics.median(cpu), runs=len(samples)
    )
    return record


def run(method: str, shape: tuple[int, int, int], repeats: int, timeout: int) -> dict:
    command = [sys.executable, "-m", "benchmarks.linear_jax", "--worker", method]
    command += ["--shape", ",".join(map(str, shape)), "--repeats", str(repeats)]
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(method=method, note=f"timed out after {timeout} s")
    lines = [line[7:] for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["?"])[-1]
        return dict(method=method, note=f"exit {done.returncode}: {tail[:200]}")
    return json.loads(lines[-1])


def markdown(records: list[dict], shape: tuple[int, int, int]) -> str:
    n, hidden_size, v = shape
    logits_mib = n * v * 4 / 2**20
    base = next((r for r in records if r["method"] == METHODS[1] and "median_s" in r), None)
    lines = [
        "# Fused linear + loss, JAX",
        "",
        f"CPU float32, N={n}, H={hidden_size}, V={v} (logits {logits_mib:.0f} MiB): `jit(value_and_grad)` with "
        f"respect to hidden and kernel of the mean loss, ε = {EPS}, 1/8 of the labels ignored. Generated by "
        "`python -m benchmarks.linear_jax`.",
        "",
        "| method | time (s, median) | × materialised | CPU time (s, median) | × materialised "
        "| compiled temporaries (MiB) | peak extra RSS (MiB) | RSS × materialised |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "median_s" not in r:
            lines.append(f"| {r['method']} | {r.get('note', '')} | | | | | | |")
            continue
        ratio_t = f"{r['median_s'] / base['median_s']:.2f}" if base else ""
        ratio_c = f"{r['cpu_s'] / base['cpu_s']:.2f}" if base else ""
        peak = r.get("peak_extra_bytes")
        ratio_m = f"{peak / base['peak_extra_bytes']:.2f}" if base and peak and base.get("peak_extra_bytes") else ""
        lines.append(
            f"| {r['method']} | {r['median_s']:.2f} | {ratio_t} | {r['cpu_s']:.2f} | {ratio_c} "
            f"| {r['temp_bytes'] / 2**20:.0f} | "
            f"{'' if peak is None else f'{peak / 2**20:.0f}'} | {ratio_m} |"
        )
    lines += [
        "",
        "Peak extra RSS: the process's resident-memory high-water mark over the first call after compilation "
        "beyond what was resident before it (the inputs), outputs included (the gradients: hidden's 8 MiB and kernel's 64 MiB at the "
        "default shape). Compiled temporaries: XLA's `memory_analysis().temp_size_in_bytes`.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="4096,512,32768", help="N,H,V")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print the table without writing it")
    args = parser.parse_args(argv)
    shape = tuple(int(s) for s in args.shape.split(","))
    if args.worker:
        print("RESULT " + json.dumps(worker(args.worker, *shape, args.repeats)), flush=True)
        return 0
    records = [run(method, shape, args.repeats, args.timeout) for method in METHODS]
    table = markdown(records, shape)
    print(table)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "linear_jax.md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
