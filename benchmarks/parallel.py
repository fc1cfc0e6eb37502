"""Vocabulary-parallel loss: bytes communicated per row and time, lsx ``process_group=`` against all-gathering
the logits, on gloo process groups over loopback (CPU).

``python -m benchmarks.parallel`` (about a minute on a 2-core machine) runs 1, 2 and 4 processes on
(N, V) = (2048, 32768) float32 logits split evenly over the classes, ε = 0.1, mean reduction, and writes
``benchmarks/results/parallel.md``. Each time is the median of ``--repeats`` warm forward + backward calls,
the slowest rank's.

- lsx: ``lsx.torch.loss(local_logits, labels, process_group=group)``: a header all-gather and one all-gather
  of six float64 statistics per row.
- all-gather: every rank all-gathers the logit slices, computes the single-device ``lsx.torch.loss`` on the
  full logits and keeps its slice of the gradient (what a loss without vocabulary-parallel support needs).

Bytes are what one rank sends per row, counted from the tensors handed to the collectives (the header's
11 float64 per rank per call is divided by N).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

RESULTS = Path(__file__).parent / "results" / "parallel.md"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _count_bytes():
    """Wrap the collectives to count the bytes this rank sends; returns the counter."""
    counter = {"bytes": 0}
    original = dist.all_gather

    def all_gather(tensors, tensor, *args, **kwargs):
        counter["bytes"] += tensor.numel() * tensor.element_size()
        return original(tensors, tensor, *args, **kwargs)

    dist.all_gather = all_gather
    return counter


def _worker(rank, size, port, rows, classes, repeats, queue):
    import lsx.torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    group = dist.group.WORLD
    counter = _count_bytes()
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, classes, (rows,), generator=gen)
    width = classes // size
    local = torch.randn(rows, width, generator=gen)

    def parallel():
        x = local.clone().requires_grad_(True)
        lsx.torch.loss(x, labels, label_smoothing=0.1, process_group=group).backward()
        return x.grad

    def gathered():
        parts = [torch.empty_like(local) for _ in range(size)]
        dist.all_gather(parts, local.contiguous(), group=group)
        x = torch.cat(parts, dim=1).requires_grad_(True)
        lsx.torch.loss(x, labels, label_smoothing=0.1).backward()
        return x.grad[:, rank * width : (rank + 1) * width]

    results = {}
    for name, fn in (("lsx process_group", parallel), ("all-gather logits", gathered)):
        fn()  # warm-up
        times = []
        counter["bytes"] = 0
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        results[name] = (float(slowest), counter["bytes"] / repeats / rows)
    # the two agree (the gradient slices)
    torch.testing.assert_close(parallel(), gathered(), rtol=1e-4, atol=1e-7)
    if rank == 0:
        queue.put((size, results))
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=32768)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    context = mp.get_context("spawn")
    lines = [
        f"# Vocabulary-parallel loss: (N, V) = ({args.rows}, {args.classes}) float32, ε = 0.1, mean, gloo on loopback",
        "",
        f"CPU cores: {os.cpu_count()}; median of {args.repeats} warm forward + backward calls (slowest rank).",
        "Bytes: sent by one rank per row per call.",
        "",
        "| processes | method | time (ms) | bytes sent per row |",
        "|---:|---|---:|---:|",
    ]
    for size in (int(p) for p in args.processes.split(",")):
        queue = context.SimpleQueue()
        mp.start_processes(
            _worker,
            args=(size, _free_port(), args.rows, args.classes, args.repeats, queue),
            nprocs=size,
            join=True,
            start_method="spawn",
        )
        _, results = queue.get()
        for name, (seconds, per_row) in results.items():
            lines.append(f"| {size} | {name} | {seconds * 1e3:.1f} | {per_row:.1f} |")
            print(lines[-1], flush=True)
    lines += [
        "",
        "With one process nothing travels (the bytes are what the collectives are handed); the all-gather column",
        "then is the single-device `lsx.torch.loss` (the Numba kernel on CPU), while `process_group=` runs the",
        "plain-torch statistics pass. lsx sends 48 bytes per row whatever V and the number of processes (plus an",
        "11-number header per call); all-gathering sends 4·V/P bytes per row and every rank then holds and",
        "differentiates the full (N, V) logits. Times on a shared, loaded machine are indicative only.",
    ]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
