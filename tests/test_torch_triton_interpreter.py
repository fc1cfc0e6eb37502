"""lsx.torch through the Triton engine without a GPU: ``TRITON_INTERPRET=1`` and ``LSX_TORCH_ENGINE=triton`` set
before lsx.torch is imported, so CPU tensors run through the Triton kernels in Triton's interpreter.

:func:`test_selected_suites_in_the_interpreter` runs, in a subprocess with that environment, a small-shaped
selection of the cross-backend matrix (the torch cases in float32 and bfloat16, eager; a few in float64 and
under ``torch.compile``), of the ``linear_loss`` tests, and a 2-rank gloo case (:func:`test_two_ranks_in_the_interpreter`,
which runs only there); all compare against the float64 reference or the single-device loss. It then
compiles every kernel specialisation those tests launched to a cubin for sm_80 and sm_90 (no GPU needed).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None,
    reason="needs triton and torch (pip install 'lsx[torch,triton]')",
)

ROOT = Path(__file__).resolve().parents[1]
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("LSX_TORCH_ENGINE") == "triton"

#: (file, -k expression): small shapes only (the interpreter runs each program in Python)
SELECTION = [
    ("tests/test_matrix.py", "torch and eager and (float32 or bfloat16) and not k70000 and not wide and not k300"),
    ("tests/test_matrix.py", "torch and float64 and eager and (plain or eps0.1 or probs-eps or class-mask-others)"),
    ("tests/test_matrix.py", "torch and float32 and compiled and (plain or softcap-eager or probs-eps)"),
    ("tests/test_torch_linear.py", "equals_loss_of_logits and lead1-4 and mean"),
    ("tests/test_torch_linear.py", "label_dtypes or bad_shapes_and_labels or zero_denominator"),
    ("tests/test_torch_triton_interpreter.py", "two_ranks"),
]


def test_selected_suites_in_the_interpreter(tmp_path):
    launches = tmp_path / "launches.json"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "TRITON_INTERPRET": "1",
        "LSX_TORCH_ENGINE": "triton",
        "LSX_TRITON_LAUNCHES": str(launches),
    }
    files = list(dict.fromkeys(path for path, _ in SELECTION))
    expression = " or ".join(f"({Path(path).stem} and ({selected}))" for path, selected in SELECTION)
    command = [sys.executable, "-m", "pytest", *files, "-k", expression, "-q", "-n", "0"]
    command += ["-p", "tests.triton_launches", "-p", "no:cacheprovider"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 0, f"{summary}\n{done.stdout[-6000:]}\n{done.stderr[-4000:]}"
    assert " passed" in summary and "skipped" not in summary, summary
    record = json.loads(launches.read_text())
    names = {spec["name"] for spec in record["launched"]}
    assert names == {"_label_statistics", "_probability_statistics", "_label_gradient", "_probability_gradient"}
    assert record["count"] > 100, record["count"]
    # every specialisation launched there compiles for sm_80 and sm_90 (the kernel tests' compile step)
    specs = tmp_path / "launched.json"
    specs.write_text(json.dumps(record["launched"]))
    code = f"from tests.test_triton_kernels import _compile_main; _compile_main({str(specs)!r})"
    compile_env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_CACHE_DIR": str(tmp_path / "cache")}
    compile_env.pop("TRITON_INTERPRET", None)
    compiled = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=compile_env, capture_output=True, text=True, timeout=900
    )
    lines = [line for line in compiled.stdout.splitlines() if line.startswith("RESULT ")]
    assert compiled.returncode == 0 and lines, f"{compiled.stdout[-4000:]}\n{compiled.stderr[-4000:]}"
    result = json.loads(lines[-1][len("RESULT ") :])
    assert not result["failures"], "compile:\n" + "\n".join(result["failures"])
    assert result["compiled"] == 2 * result["variants"] > 0, result


# --------------------------------------------------------------------------------------------------------
# A 2-rank gloo group, run by the subprocess above (in the interpreter)
# --------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bootstrap(rank: int, size: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=120))
    try:
        _two_rank_worker(rank, size)
    finally:
        dist.destroy_process_group()


def _two_rank_worker(rank: int, size: int) -> None:
    import torch
    import torch.distributed as dist

    import lsx.torch
    from lsx.torch._engines import triton as engine

    assert engine.interpreted()
    group = dist.group.WORLD
    splits = (5, 8)
    k, n, h = sum(splits), 6, 4
    start = sum(splits[:rank])
    part = slice(start, start + splits[rank])
    gen = torch.Generator().manual_seed(7)
    mask = torch.ones(k, dtype=torch.bool)
    mask[[1, 11]] = False
    weight = torch.rand(k, generator=gen, dtype=torch.float64) + 0.2
    cases = [
        ("index", dict(label_smoothing=0.1, spread="others", z_loss=0.01)),
        ("index", dict(label_smoothing=0.1, softcap=2.0, class_mask=mask, weight=weight, ignore_index=3)),
        ("probs", dict(label_smoothing=0.2, normalize=True, weight=weight)),
    ]
    before = engine.launch_count()
    for dtype, kind, options in [(torch.float64, *case) for case in cases] + [(torch.float32, *cases[1])]:
        tol = 1e-10 if dtype == torch.float64 else 2e-5
        x = (3 * torch.randn(n, k, generator=gen, dtype=torch.float64)).to(dtype)
        if kind == "index":
            y = torch.tensor([0, 12, 3, 5, 7, 9])
        else:
            y = torch.rand(n, k, generator=gen, dtype=torch.float64).to(dtype)
            y = y / y.sum(dim=1, keepdim=True)
        sliced = {key: (value[part] if key in ("weight", "class_mask") else value) for key, value in options.items()}
        target = y if kind == "index" else y[:, part].contiguous()
        # loss
        leaf = x.clone().requires_grad_(True)
        expected = lsx.torch.loss(leaf, y, **options)
        (expected_grad,) = torch.autograd.grad(expected, leaf)
        mine = x[:, part].clone().requires_grad_(True)
        value = lsx.torch.loss(mine, target, process_group=group, **sliced)
        (grad,) = torch.autograd.grad(value, mine)
        torch.testing.assert_close(value, expected, rtol=tol, atol=tol)
        torch.testing.assert_close(grad, expected_grad[:, part], rtol=tol, atol=tol)
        # linear_loss (mean: each chunk's logits once; none: recomputed in the backward)
        hidden = torch.randn(n, h, generator=gen, dtype=dtype)
        w = torch.randn(k, h, generator=gen, dtype=dtype)
        for reduction in ("mean", "none"):
            leaves = (hidden.clone().requires_grad_(True), w.clone().requires_grad_(True))
            expected = lsx.torch.linear_loss(*leaves, y, reduction=reduction, chunk_size=4, **options)
            expected_grads = torch.autograd.grad(expected.sum(), leaves)
            mine = (hidden.clone().requires_grad_(True), w[part].clone().requires_grad_(True))
            value = lsx.torch.linear_loss(
                *mine, target, reduction=reduction, chunk_size=4, process_group=group, **sliced
            )
            grads = torch.autograd.grad(value.sum(), mine)
            torch.testing.assert_close(value, expected, rtol=tol, atol=tol)
            torch.testing.assert_close(grads[0], expected_grads[0], rtol=tol, atol=tol)
            torch.testing.assert_close(grads[1], expected_grads[1][part], rtol=tol, atol=tol)
    assert engine.launch_count() > before, "the Triton kernels never ran"


@pytest.mark.skipif(not _INTERPRETED, reason="runs inside test_selected_suites_in_the_interpreter's subprocess")
def test_two_ranks_in_the_interpreter():
    import torch.multiprocessing as mp

    mp.spawn(_bootstrap, args=(2, _free_port()), nprocs=2, join=True)
