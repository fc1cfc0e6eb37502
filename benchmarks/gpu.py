"""The GPU benchmark: lsx's Triton engine against the plain-torch engine and the peers, on one CUDA GPU.

One command (at most about 8 minutes; each part stops early, with a line saying so, when its time is up)::

    python -m benchmarks.gpu            # the shapes below
    python -m benchmarks.gpu --quick    # 8× smaller shapes, a smoke run (not written to results/)

Loss, forward + backward, at (N, K) = (8192, 131072) and (16384, 256000), bfloat16 and float32 logits;
int64 labels with 1/8 of the rows set to -100, ε = 0.1 over all classes (torch's smoothing, which every peer
here implements), mean reduction:

- ``lsx (Triton)``: ``lsx.torch.loss`` with ``LSX_TORCH_ENGINE=triton`` (read at call time); the row is only
  reported when the call launched the Triton engine's kernels (``lsx.torch._engines.triton.launched()``);
- ``lsx (torch ops)``: the same with ``LSX_TORCH_ENGINE=torch``; ``lsx (Triton), ε over K−1 others``: lsx's
  other spread, which no peer offers;
- ``F.cross_entropy`` eager and ``torch.compile(F.cross_entropy)``; Liger's ``LigerCrossEntropyLoss``.

Time (median of the timed calls, CUDA events), achieved bandwidth counting 2 reads + 1 write of the logits
against the card's (from the memory clock and bus width, and a measured device-to-device copy), and
``torch.cuda.max_memory_allocated`` over the first call after the inputs were made (the inputs included).

Linear + loss, forward + backward with the gradients of h and W, bfloat16: (N, H, V) = (8192, 4096, 131072)
(Liger's benchmark shape) and (8192, 2304, 256000) with softcap 30 (Gemma 2 2B):

- ``lsx.torch.linear_loss`` (Triton engine) with ε = 0 and with ε = 0.1 over the K−1 others;
- matmul + ``F.cross_entropy`` (logits upcast to float32, as transformers' models do; soft-capped by
  ``c·tanh(x/c)``); torch's chunked ``F.linear_cross_entropy`` (it has no softcap: at the Gemma shape it runs
  without one, and says so); Liger's ``LigerFusedLinearCrossEntropyLoss``; Cut Cross-Entropy's
  ``linear_cross_entropy`` with ``impl="cce"`` (gradient filtering on, its default) and ``"cce_exact"``.

Time, TFLOP/s counting 6·N·H·V (the logits' matmul and the two gradient matmuls) against a measured bf16
matmul, and peak memory. Every row shows its loss value, so a method that computes something else is seen.
A peer that is not installed is skipped with a line saying so; so is a method that runs out of memory.

Writes ``benchmarks/results/gpu.md`` and prints it. Published anchors, for comparison: Liger reports 50.4 ms
forward + backward (698 TFLOP/s counting 8·N·H·V) at Liger's shape on an H100; CCE reports 134.8 ms and
1164 MB at the Gemma 2 2B shape on an A100.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
LOSS_SHAPES = [(8192, 131072), (16384, 256000)]
LOSS_DTYPES = ["bfloat16", "float32"]
#: (name, N, H, V, softcap)
LINEAR_SHAPES = [("Liger's shape", 8192, 4096, 131072, None), ("Gemma 2 2B", 8192, 2304, 256000, 30.0)]
EPSILON = 0.1
DEVICE = "cuda"
#: seconds for the whole run, split between the loss part and the linear part
BUDGET_S = 450.0


@dataclass
class Row:
    method: str
    time_s: float | None = None
    peak_bytes: int | None = None
    loss: float | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


# ---- the card --------------------------------------------------------------------------------------------
def _card_bandwidth(torch: Any) -> float | None:
    """Bytes/s from the memory clock (kHz, double data rate) and the bus width (bits), where torch reports them."""
    props = torch.cuda.get_device_properties(0)
    clock = getattr(props, "memory_clock_rate", None)
    width = getattr(props, "memory_bus_width", None)
    if not clock or not width:
        return None
    return 2.0 * clock * 1e3 * width / 8


def _time_cuda(torch: Any, fn: Callable[[], Any], repeats: int) -> float:
    """Median seconds of ``repeats`` calls of ``fn`` (CUDA events around each)."""
    times = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return statistics.median(times)


def _copy_bandwidth(torch: Any) -> float:
    """Bytes/s of a 4 GiB device-to-device copy (one read + one write)."""
    src = torch.empty(1 << 30, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    seconds = _time_cuda(torch, lambda: dst.copy_(src), 5)
    return 2 * (1 << 32) / seconds


def _matmul_flops(torch: Any) -> float:
    """FLOP/s of an (8192, 8192) × (8192, 8192) bf16 matmul: the dense peak this card reaches in practice."""
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEVICE)
    a @ b
    seconds = _time_cuda(torch, lambda: a @ b, 10)
    return 2 * 8192**3 / seconds


# ---- running one method ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _engine(name: str | None):
    """LSX_TORCH_ENGINE=name while the block runs (lsx reads it at every call)."""
    old = os.environ.get("LSX_TORCH_ENGINE")
    if name is not None:
        os.environ["LSX_TORCH_ENGINE"] = name
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LSX_TORCH_ENGINE", None)
        else:
            os.environ["LSX_TORCH_ENGINE"] = old


def _triton_launches() -> int:
    """How many kernels lsx's Triton engine has launched in this process (0 where it cannot be imported)."""
    try:
        from lsx.torch._engines import triton as engine
    except Exception:  # triton not installed, or an lsx without the engine
        return 0
    return engine.launch_count()


def _run(
    torch: Any,
    name: str,
    make: Callable[[], tuple[Callable[[], Any], Any]],
    repeats: int,
    engine: str | None,
    needs_triton: bool = False,
) -> Row:
    """Warm up (compilation, autotuning) on one set of inputs, then, on fresh ones, one call with the
    peak-memory counter reset (its loss is the row's) and ``repeats`` timed calls. ``make`` builds the inputs
    and returns (step, leaves): ``step()`` runs forward + backward and returns the loss."""
    row = Row(name)
    step = None
    try:
        with _engine(engine):
            step, _ = make()
            before = _triton_launches()
            step()  # warm-up
            torch.cuda.synchronize()
            used = _triton_launches() > before
            if used != needs_triton:  # a row must measure the engine it names
                row.note = f"not measured: LSX_TORCH_ENGINE={engine} {'launched no' if needs_triton else 'launched a'} Triton kernel"
                return row
            # fresh inputs for the counted calls (Liger's loss overwrites its logits with their gradient)
            step = None
            gc.collect()
            torch.cuda.empty_cache()
            step, _ = make()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            loss = step()
            torch.cuda.synchronize()
            row.peak_bytes = torch.cuda.max_memory_allocated()
            row.loss = float(loss)
            del loss
            row.time_s = _time_cuda(torch, step, repeats)
    except torch.cuda.OutOfMemoryError:
        row.note = "out of memory"
        row.time_s = row.peak_bytes = None
    except Exception as error:  # a peer's API drift or a refusal: the line says which
        row.note = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:160] if str(error) else ''}"
        row.time_s = None
    finally:
        step = None
        gc.collect()
        torch.cuda.empty_cache()
    return row


# ---- the loss --------------------------------------------------------------------------------------------
def _loss_methods(torch: Any, n: int, k: int, dtype: Any) -> list[tuple[str, Callable, str | None, bool]]:
    import torch.nn.functional as F

    import lsx.torch

    def inputs():
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        logits = torch.randn(n, k, generator=gen, device=DEVICE, dtype=dtype).requires_grad_(True)
        labels = torch.randint(0, k, (n,), generator=gen, device=DEVICE)
        labels[torch.rand(n, generator=gen, device=DEVICE) < 1 / 8] = -100
        return logits, labels

    def stepper(fn):
        def make():
            logits, labels = inputs()

            def step():
                logits.grad = None
                loss = fn(logits, labels)
                loss.backward()
                return loss

            return step, (logits, labels)

        return make

    methods = [
        ("lsx (Triton)", stepper(lambda x, y: lsx.torch.loss(x, y, label_smoothing=EPSILON)), "triton", True),
        (
            "lsx (Triton), ε over K−1 others",
            stepper(lambda x, y: lsx.torch.loss(x, y, label_smoothing=EPSILON, spread="others")),
            "triton",
            True,
        ),
        ("lsx (torch ops)", stepper(lambda x, y: lsx.torch.loss(x, y, label_smoothing=EPSILON)), "torch", False),
        ("F.cross_entropy", stepper(lambda x, y: F.cross_entropy(x, y, label_smoothing=EPSILON)), None, False),
    ]
    compiled = torch.compile(F.cross_entropy, dynamic=False)
    methods.append(
        ("torch.compile(F.cross_entropy)", stepper(lambda x, y: compiled(x, y, label_smoothing=EPSILON)), None, False)
    )
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss
    except ImportError:
        methods.append(("Liger LigerCrossEntropyLoss", None, None, False))
    else:
        liger = LigerCrossEntropyLoss(label_smoothing=EPSILON, ignore_index=-100)
        methods.append(("Liger LigerCrossEntropyLoss", stepper(lambda x, y: liger(x, y)), None, False))
    return methods


# ---- linear + loss ---------------------------------------------------------------------------------------
def _linear_methods(torch: Any, n: int, h: int, v: int, softcap: float | None):
    import torch.nn.functional as F

    import lsx.torch

    dtype = torch.bfloat16

    def inputs():
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        hidden = torch.randn(n, h, generator=gen, device=DEVICE, dtype=dtype).requires_grad_(True)
        weight = (torch.randn(v, h, generator=gen, device=DEVICE, dtype=dtype) / h**0.5).requires_grad_(True)
        labels = torch.randint(0, v, (n,), generator=gen, device=DEVICE)
        labels[torch.rand(n, generator=gen, device=DEVICE) < 1 / 8] = -100
        return hidden, weight, labels

    def stepper(fn):
        def make():
            hidden, weight, labels = inputs()

            def step():
                hidden.grad = None
                weight.grad = None
                loss = fn(hidden, weight, labels)
                loss.backward()
                return loss

            return step, (hidden, weight, labels)

        return make

    def materialised(hidden, weight, labels):
        logits = (hidden @ weight.T).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return F.cross_entropy(logits, labels)

    methods: list[tuple[str, Any, str | None, bool]] = [
        (
            "lsx.torch.linear_loss (Triton)",
            stepper(lambda hd, w, y: lsx.torch.linear_loss(hd, w, y, softcap=softcap)),
            "triton",
            True,
        ),
        (
            "lsx.torch.linear_loss (Triton), ε = 0.1 others",
            stepper(
                lambda hd, w, y: lsx.torch.linear_loss(
                    hd, w, y, softcap=softcap, label_smoothing=EPSILON, spread="others"
                )
            ),
            "triton",
            True,
        ),
        ("matmul + F.cross_entropy", stepper(materialised), None, False),
    ]
    chunked = "F.linear_cross_entropy (chunked)" + (", without softcap (it has none)" if softcap is not None else "")
    if hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions"):
        options = torch.nn.LinearCrossEntropyOptions()
        methods.append(
            (chunked, stepper(lambda hd, w, y: F.linear_cross_entropy(hd, w, y, options=options)), None, False)
        )
    else:
        methods.append((chunked + ": not in this torch", None, None, False))
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        methods.append(("Liger LigerFusedLinearCrossEntropyLoss", None, None, False))
    else:
        liger = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, softcap=softcap)
        methods.append(
            ("Liger LigerFusedLinearCrossEntropyLoss", stepper(lambda hd, w, y: liger(w, hd, y)), None, False)
        )
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except ImportError:
        methods += [
            ("CCE linear_cross_entropy, impl=cce", None, None, False),
            ("CCE linear_cross_entropy, impl=cce_exact", None, None, False),
        ]
    else:
        for impl in ("cce", "cce_exact"):
            methods.append(
                (
                    f"CCE linear_cross_entropy, impl={impl}",
                    stepper(lambda hd, w, y, impl=impl: cce(hd, w, y, softcap=softcap, impl=impl)),
                    None,
                    False,
                )
            )
    return methods


# ---- the tables ------------------------------------------------------------------------------------------
def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def loss_table(
    title: str, rows: list[Row], n: int, k: int, itemsize: int, bandwidth: float | None, copy_bw: float
) -> str:
    """A markdown table of one (shape, dtype): time, GB/s (2 reads + 1 write of the logits), % of the card's
    bandwidth and of the measured copy, peak memory, loss."""
    moved = 3 * n * k * itemsize
    head = f"### {title}\n\n| method | time (ms) | GB/s | % of card | % of copy | peak memory (GiB) | loss |\n|---|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for row in rows:
        if row.time_s is None:
            lines.append(f"| {row.method} | {row.note or 'skipped'} | | | | | |")
            continue
        rate = moved / row.time_s
        card = None if bandwidth is None else 100 * rate / bandwidth
        lines.append(
            f"| {row.method} | {row.time_s * 1e3:.2f} | {rate / 1e9:.0f} | {_fmt(card)} | {100 * rate / copy_bw:.1f} | "
            f"{_fmt(None if row.peak_bytes is None else row.peak_bytes / 2**30, 2)} | {_fmt(row.loss, 6)} |"
        )
    return head + "\n".join(lines) + "\n"


def linear_table(title: str, rows: list[Row], n: int, h: int, v: int, matmul_flops: float) -> str:
    """A markdown table of one linear shape: time, TFLOP/s counting 6·N·H·V, % of the measured bf16 matmul,
    peak memory, loss."""
    flop = 6 * n * h * v
    head = f"### {title}\n\n| method | time (ms) | TFLOP/s (6·N·H·V) | % of matmul peak | peak memory (GiB) | loss |\n|---|---:|---:|---:|---:|---:|\n"
    lines = []
    for row in rows:
        if row.time_s is None:
            lines.append(f"| {row.method} | {row.note or 'skipped'} | | | | |")
            continue
        rate = flop / row.time_s
        lines.append(
            f"| {row.method} | {row.time_s * 1e3:.1f} | {rate / 1e12:.0f} | {100 * rate / matmul_flops:.1f} | "
            f"{_fmt(None if row.peak_bytes is None else row.peak_bytes / 2**30, 2)} | {_fmt(row.loss, 6)} |"
        )
    return head + "\n".join(lines) + "\n"


def _versions() -> str:
    parts = []
    for module in ("torch", "triton", "liger_kernel", "cut_cross_entropy"):
        try:
            from importlib.metadata import version

            name = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}.get(module, module)
            parts.append(f"{module} {version(name)}")
        except Exception:
            parts.append(f"{module} not installed")
    return ", ".join(parts)


# ---- main ------------------------------------------------------------------------------------------------
def _run_part(torch, methods, repeats: int, deadline: float) -> list[Row]:
    rows = []
    for name, make, engine, needs_triton in methods:
        if make is None:
            rows.append(Row(name, note="skipped: not installed"))
            continue
        if time.monotonic() > deadline:
            rows.append(Row(name, note="skipped: the run's time budget was spent"))
            continue
        rows.append(_run(torch, name, make, repeats, engine, needs_triton))
        print(f"  {name}: {rows[-1].time_s} s {rows[-1].note}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8x smaller shapes; prints, writes nothing")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per method (default 5)")
    parser.add_argument(
        "--budget", type=float, default=BUDGET_S, help=f"seconds for the whole run (default {BUDGET_S:.0f})"
    )
    args = parser.parse_args(argv)
    try:
        import torch
    except ImportError:
        sys.exit("benchmarks.gpu needs PyTorch with CUDA: pip install 'lsx[torch,triton]'")
    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks.gpu needs a CUDA GPU: torch.cuda.is_available() is False on this machine; nothing was measured"
        )
    start = time.monotonic()
    scale = 8 if args.quick else 1
    loss_shapes = [(n // scale, k // scale) for n, k in LOSS_SHAPES]
    linear_shapes = [(name, n // scale, h // scale, v // scale, cap) for name, n, h, v, cap in LINEAR_SHAPES]

    props = torch.cuda.get_device_properties(0)
    bandwidth = _card_bandwidth(torch)
    copy_bw = _copy_bandwidth(torch)
    matmul = _matmul_flops(torch)
    print(
        f"{props.name}: card {_fmt(None if bandwidth is None else bandwidth / 1e9, 0)} GB/s, copy {copy_bw / 1e9:.0f} GB/s, bf16 matmul {matmul / 1e12:.0f} TFLOP/s",
        flush=True,
    )

    out = [
        "# GPU benchmark: loss and linear + loss, forward + backward\n",
        f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {_versions()}, Python {platform.python_version()}; "
        f"`python -m benchmarks.gpu{' --quick' if args.quick else ''}`. Card bandwidth "
        f"{_fmt(None if bandwidth is None else bandwidth / 1e9, 0)} GB/s (memory clock × bus width), measured "
        f"device-to-device copy {copy_bw / 1e9:.0f} GB/s, measured bf16 matmul (8192³) {matmul / 1e12:.0f} TFLOP/s. "
        f"Times: median of {args.repeats} calls after a warm-up; peak memory: `torch.cuda.max_memory_allocated` "
        "over one call, inputs included.\n",
        f"## Loss (ε = {EPSILON} over all classes, 1/8 of the labels -100, mean)\n",
    ]
    loss_deadline = start + 0.5 * args.budget
    for n, k in loss_shapes:
        for dtype_name in LOSS_DTYPES:
            dtype = getattr(torch, dtype_name)
            print(f"loss ({n}, {k}) {dtype_name}", flush=True)
            rows = _run_part(torch, _loss_methods(torch, n, k, dtype), args.repeats, loss_deadline)
            out.append(loss_table(f"({n}, {k}) {dtype_name}", rows, n, k, dtype.itemsize, bandwidth, copy_bw))
    out.append("## Linear + loss (bf16, gradients of h and W, 1/8 of the labels -100, mean)\n")
    deadline = start + args.budget
    for name, n, h, v, cap in linear_shapes:
        print(f"linear {name} ({n}, {h}, {v}) softcap={cap}", flush=True)
        rows = _run_part(torch, _linear_methods(torch, n, h, v, cap), args.repeats, deadline)
        title = f"{name}: (N, H, V) = ({n}, {h}, {v})" + (f", softcap {cap:g}" if cap is not None else "")
        out.append(linear_table(title, rows, n, h, v, matmul))
    out.append(
        "Published anchors: Liger reports 50.4 ms forward + backward (698 TFLOP/s counting 8·N·H·V) at Liger's "
        "shape on an H100; CCE reports 134.8 ms and 1164 MB at the Gemma 2 2B shape on an A100.\n"
    )
    out.append(f"Whole run: {time.monotonic() - start:.0f} s.\n")
    text = "\n".join(out)
    print(text)
    if not args.quick:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "gpu.md").write_text(text)
        print(f"wrote {RESULTS / 'gpu.md'}")


if __name__ == "__main__":
    main()
