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
12 float64 per rank per call is divided by N).

Then the vocabulary-parallel LM head, ``(N, H) @ W_r.T`` with W (V, H) split by rows over 2 and 4 processes
(``--linear-*``), forward + backward, each method in fresh processes:

- fused: ``lsx.torch.linear_loss(h, W_r, labels, process_group=group)`` (row chunks, the rank's logits
  never held);
- unfused: ``lsx.torch.loss(h @ W_r.T, labels, process_group=group)`` with the input's gradient all-reduced
  in the backward (this rank's (N, V/P) logits and their gradient held).

Peak extra memory per rank: the resident-set high-water mark (``VmHWM`` after ``/proc/self/clear_refs``,
as in :mod:`benchmarks.linear`) over the first full-size call, the largest over the ranks; it counts the
gradients of h and W_r.
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


class _ReduceGradient(torch.autograd.Function):
    """Identity forward; the backward sums the gradient over the group (the unfused head's input)."""

    @staticmethod
    def forward(ctx, tensor):
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def _linear_worker(rank, size, port, method, rows, hidden, classes, repeats, queue):
    import lsx.torch
    from benchmarks.linear import _reset_peak, _status_kib

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    group = dist.group.WORLD
    width = classes // size

    def make(n, v):
        gen = torch.Generator().manual_seed(0)
        h = torch.randn(n, hidden, generator=gen).requires_grad_(True)
        w = (torch.randn(v, hidden, generator=gen) / hidden**0.5)[rank * (v // size) : (rank + 1) * (v // size)]
        labels = torch.randint(0, v, (n,), generator=gen)
        return h, w.clone().requires_grad_(True), labels

    def step(h, w, labels):
        h.grad = w.grad = None
        if method == "fused":
            loss = lsx.torch.linear_loss(h, w, labels, label_smoothing=0.1, process_group=group)
        else:
            loss = lsx.torch.loss(_ReduceGradient.apply(h) @ w.T, labels, label_smoothing=0.1, process_group=group)
        loss.backward()
        return loss

    step(*make(64, 64 * size))  # warm-up: lazy imports, the allocator's first arenas
    inputs = make(rows, classes)
    dist.barrier()
    _reset_peak()
    start_kib = _status_kib("VmRSS") or 0
    step(*inputs)
    peak = torch.tensor([((_status_kib("VmHWM") or 0) - start_kib) / 1024], dtype=torch.float64)
    times = []
    for _ in range(repeats):
        dist.barrier()
        begin = time.perf_counter()
        step(*inputs)
        times.append(time.perf_counter() - begin)
    slowest = torch.tensor([statistics.median(times)], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        queue.put((float(slowest), float(peak), rows * width * 4 / 2**20))
    dist.barrier()
    dist.destroy_process_group()


def _linear_table(args, context) -> list[str]:
    lines = [
        "",
        f"## Vocabulary-parallel LM head: (N, H, V) = ({args.linear_rows}, {args.linear_hidden}, {args.classes})"
        " float32, ε = 0.1, mean",
        "",
        "| processes | method | time (ms) | peak extra memory per rank (MiB) | this rank's logits (MiB) |",
        "|---:|---|---:|---:|---:|",
    ]
    for size in (int(p) for p in args.linear_processes.split(",")):
        for method, label in (("fused", "lsx linear_loss, fused"), ("unfused", "h @ W_r.T, then lsx loss")):
            queue = context.SimpleQueue()
            work = (size, _free_port(), method, args.linear_rows, args.linear_hidden, args.classes, args.repeats)
            mp.start_processes(_linear_worker, args=(*work, queue), nprocs=size, join=True, start_method="spawn")
            seconds, peak, logits = queue.get()
            lines.append(f"| {size} | {label} | {seconds * 1e3:.1f} | {peak:.0f} | {logits:.0f} |")
            print(lines[-1], flush=True)
    lines += [
        "",
        "The fused head never holds this rank's (N, V/P) logits: its peak is the gradients of h and W_r plus one",
        "chunk of logits (the default 2**22 elements) and its temporaries, and it sends the same 48 bytes per row;",
        "the unfused head holds the logits and their gradient. Both all-reduce the (N, H) input gradient.",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=32768)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--linear-rows", type=int, default=1024)
    parser.add_argument("--linear-hidden", type=int, default=128)
    parser.add_argument("--linear-processes", default="2,4", help="empty: skip the LM-head table")
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
        "12-number header per call); all-gathering sends 4·V/P bytes per row and every rank then holds and",
        "differentiates the full (N, V) logits. Times on a shared, loaded machine are indicative only.",
    ]
    if args.linear_processes:
        lines += _linear_table(args, context)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
