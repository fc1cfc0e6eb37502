"""Peak memory of one training step of a small Llama-shaped causal LM on CPU, with and without
``lsx.transformers.apply``.

``python -m benchmarks.transformers_memory`` builds ``LlamaForCausalLM`` from a config (random weights,
nothing downloaded): vocabulary 32,000 (Llama 2's), hidden 512, 2 layers, float32, a batch of 4 × 512 tokens,
and times one step (forward, backward, SGD update) of each variant, each in a fresh process:

- ``hf``: ``model(input_ids, labels=labels).loss``, HF's own cross-entropy (ε = 0) on the logits;
- ``hf-label-smoother``: what the Trainer does with ``label_smoothing_factor=0.1``: the model without labels,
  then ``LabelSmoother(0.1)(outputs, labels, shift_labels=True)`` on the logits;
- ``lsx``: after ``lsx.transformers.apply(model, label_smoothing=0.1, spread="others")``, the same call as
  ``hf``: the loss is fused with the LM head and the logits are never held.

Memory probe (torch's CPU allocator keeps no statistics): each process first runs a small warm-up step
(lazy initialisation, kernel compilation), then resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``) and reads the resident set; after the full-size step it reads the high-water mark
(``VmHWM``). The difference is the step's peak extra memory: activations, logits and their gradients, the
parameters' gradients (the same 149 MiB in every variant) and every temporary. Where ``clear_refs`` is
unavailable, ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` before and after the step. The time is the median
of ``--repeats`` further steps (indicative only on a shared machine).

Writes ``benchmarks/results/transformers_memory.md`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("hf", "hf-label-smoother", "lsx")
RESULTS = Path(__file__).resolve().parent / "results" / "transformers_memory.md"


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _worker(variant: str, vocab: int, hidden: int, batch: int, seq: int, repeats: int) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    import transformers
    from transformers.trainer_pt_utils import LabelSmoother

    import lsx.transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 8 // 3,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=8,
    )
    model = transformers.LlamaForCausalLM(config).train()
    if variant == "lsx":
        lsx.transformers.apply(model, label_smoothing=0.1, spread="others")
    smoother = LabelSmoother(epsilon=0.1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(ids: torch.Tensor) -> float:
        if variant == "hf-label-smoother":
            loss = smoother(model(input_ids=ids), ids, shift_labels=True)
        else:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss)

    step(torch.randint(0, vocab, (1, 16)))  # warm-up: lazy initialisation, kernel compilation
    ids = torch.randint(0, vocab, (batch, seq))
    uses_clear_refs = _reset_peak()
    start_kib = _status_kib("VmRSS") if uses_clear_refs else None
    maxrss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = step(ids)
    if uses_clear_refs and start_kib is not None:
        peak_kib = (_status_kib("VmHWM") or 0) - start_kib
    else:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_start
    times = []
    for _ in range(repeats):
        begin = time.perf_counter()
        step(ids)
        times.append(time.perf_counter() - begin)
    return {
        "variant": variant,
        "loss": loss,
        "peak_extra_mib": peak_kib / 1024,
        "time_s": statistics.median(times) if times else float("nan"),
        "memory_probe": "VmHWM after clear_refs" if uses_clear_refs else "ru_maxrss",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    sizes = (args.vocab, args.hidden, args.batch, args.seq, args.repeats)
    if args.worker:
        print(json.dumps(_worker(args.worker, *sizes)))
        return
    rows = []
    for variant in VARIANTS:
        command = [sys.executable, "-m", "benchmarks.transformers_memory", "--worker", variant]
        command += ["--vocab", str(args.vocab), "--hidden", str(args.hidden), "--batch", str(args.batch)]
        command += ["--seq", str(args.seq), "--repeats", str(args.repeats)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    logits_mib = args.batch * args.seq * args.vocab * 4 / 2**20
    lines = [
        f"One training step of LlamaForCausalLM (V={args.vocab}, H={args.hidden}, 2 layers, float32), "
        f"batch {args.batch} × {args.seq} tokens, CPU; the float32 logits alone are {logits_mib:.0f} MiB.",
        "",
        "| variant | loss | peak extra memory (MiB) | step time (s) |",
        "|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['variant']} | {row['loss']:.4f} | {row['peak_extra_mib']:.0f} | {row['time_s']:.2f} |")
    lines += ["", f"Memory probe: {rows[0]['memory_probe']}, one fresh process per variant."]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(text + "\n")


if __name__ == "__main__":
    main()
