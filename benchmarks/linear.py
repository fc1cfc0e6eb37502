"""Fused linear + loss on the CPU: time and peak memory of forward + backward through ``hidden @ W.T``.

One command::

    python -m benchmarks.linear            # N=4096, H=512, V=32768, float32 (the logits alone are 512 MiB)
    python -m benchmarks.linear --n 1024   # a smaller shape

Methods (each in a fresh subprocess, so that allocators and thread pools start clean):

- ``matmul + F.cross_entropy``: the materialised path, ``F.cross_entropy(h @ W.T, y)``;
- ``matmul + lsx.torch.loss``: the same logits through lsx's fused loss;
- ``F.linear_cross_entropy (chunked)``: torch's own op with ``options=LinearCrossEntropyOptions()``, which
  selects its chunked path (label_smoothing = 0, int64 labels, no K-dimensional loss; on CPU float32 the
  "auto" options resolve to ``acc_policy="compact"``, ``chunking_method="aspect_ratio:2"``);
- ``lsx.torch.linear_loss``: the chunked lsx loss (default chunk size), and once more with ε = 0.1 over
  the K−1 others (which torch's chunked path refuses).

Workload: int64 labels with 1/8 of the rows set to -100, mean reduction, gradients with respect to the
hidden states and W (no bias); ε = 0 except where stated, so that every method computes the same loss.
Peak extra memory: after a warm-up on a small problem (Numba compilation) and with the full-size inputs made,
the worker resets the kernel's resident-set high-water mark (``/proc/self/clear_refs``) and reads the
resident set; after the first full-size call, with the loss and the gradients still held, it reads the
high-water mark (``VmHWM``); where ``clear_refs`` is unavailable, ``resource.getrusage(RUSAGE_SELF).ru_maxrss``
before and after that call. Being the first full-size call, it finds no allocator cache from an earlier one.
Times are the median of the 3 calls that follow it. The difference counts the gradients
of h and W (72 MiB) and every temporary.

Writes ``benchmarks/results/linear.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = {
    "matmul + F.cross_entropy": "materialised-torch",
    "matmul + lsx.torch.loss": "materialised-lsx",
    "F.linear_cross_entropy (chunked)": "torch-chunked",
    "lsx.torch.linear_loss": "lsx-linear",
    "lsx.torch.linear_loss, ε = 0.1 others": "lsx-linear-smoothed",
}


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _worker(method: str, n: int, h: int, v: int, repeats: int) -> dict:
    import torch
    import torch.nn.functional as F

    import lsx.torch

    def make(n, v):
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(n, h, generator=gen).requires_grad_(True)
        weight = (torch.randn(v, h, generator=gen) / h**0.5).requires_grad_(True)
        labels = torch.randint(0, v, (n,), generator=gen)
        labels[torch.rand(n, generator=gen) < 1 / 8] = -100
        return hidden, weight, labels

    if method == "materialised-torch":

        def call(hidden, weight, labels):
            return F.cross_entropy(hidden @ weight.T, labels)
    elif method == "materialised-lsx":

        def call(hidden, weight, labels):
            return lsx.torch.loss(hidden @ weight.T, labels)
    elif method == "torch-chunked":
        options = torch.nn.LinearCrossEntropyOptions()

        def call(hidden, weight, labels):
            return F.linear_cross_entropy(hidden, weight, labels, options=options)
    elif method == "lsx-linear":

        def call(hidden, weight, labels):
            return lsx.torch.linear_loss(hidden, weight, labels)
    elif method == "lsx-linear-smoothed":

        def call(hidden, weight, labels):
            return lsx.torch.linear_loss(hidden, weight, labels, label_smoothing=0.1, spread="others")
    else:
        raise ValueError(f"unknown method {method!r}")

    def step(hidden, weight, labels):
        hidden.grad = None
        weight.grad = None
        loss = call(hidden, weight, labels)
        loss.backward()
        return loss

    # warm-up on a small problem (Numba compilation, lazy imports), so that the first full-size call, which
    # is measured, finds no allocator cache from an earlier full-size call
    step(*make(64, 512))
    inputs = make(n, v)
    maxrss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    uses_clear_refs = _reset_peak()
    start_kib = _status_kib("VmRSS") if uses_clear_refs else None
    loss = step(*inputs)
    if uses_clear_refs and start_kib is not None:
        peak_kib = (_status_kib("VmHWM") or 0) - start_kib
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_start
    value = float(loss)
    del loss
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        step(*inputs)
        times.append(time.perf_counter() - begin)
    return {
        "time_s": statistics.median(times),
        "peak_extra_mib": peak_kib / 1024,
        "loss": value,
        "memory_probe": "VmHWM after clear_refs" if uses_clear_refs else "ru_maxrss",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--h", type=int, default=512)
    parser.add_argument("--v", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.n, args.h, args.v, args.repeats)))
        return

    rows = {}
    for label, method in METHODS.items():
        command = [sys.executable, "-m", "benchmarks.linear", "--worker", method]
        command += ["--n", str(args.n), "--h", str(args.h), "--v", str(args.v), "--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"{label} failed:\n{done.stderr}")
        rows[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{label}: {rows[label]}", flush=True)

    base_time = rows["matmul + lsx.torch.loss"]["time_s"]
    base_memory = rows["matmul + F.cross_entropy"]["peak_extra_mib"]
    logits_mib = args.n * args.v * 4 / 2**20
    lines = [
        "# Fused linear + loss (CPU, float32, forward + backward)",
        "",
        f"N = {args.n}, H = {args.h}, V = {args.v} (the logits alone: {logits_mib:.0f} MiB); int64 labels, 1/8 "
        "ignored (-100), mean reduction, gradients of h and W. "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
        f"`python -m benchmarks.linear`. Memory probe: {rows['lsx.torch.linear_loss']['memory_probe']}.",
        "",
        "| method | time (s, median of 3) | × matmul + lsx.torch.loss | peak extra memory (MiB) "
        "| × materialised (F.cross_entropy) | loss |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        lines.append(
            f"| {label} | {row['time_s']:.2f} | {row['time_s'] / base_time:.2f} | {row['peak_extra_mib']:.0f} "
            f"| {row['peak_extra_mib'] / base_memory:.1%} | {row['loss']:.6f} |"
        )
    from lsx.torch import _linear

    grads_mib = (args.n + args.v) * args.h * 4 / 2**20
    chunk_mib = _linear._rows_per_chunk(args.n, args.v, None) * args.v * 4 / 2**20
    lines += [
        "",
        f"Floor for the fused methods: the gradients of h and W ({grads_mib:.0f} MiB) plus one chunk of logits "
        f"({chunk_mib:.0f} MiB at the default chunk size), {grads_mib + chunk_mib:.0f} MiB.",
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "linear.md").write_text(table)


if __name__ == "__main__":
    main()
