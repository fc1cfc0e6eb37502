"""The Triton engine's kernels (``lsx.torch._engines.triton``), without a GPU.

(a) In Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors), a small harness merges the kernels'
per-row statistics as the vocabulary-parallel path does (``spec.label_row`` / ``spec.probability_row``),
writes the gradient with the gradient kernel, and compares loss and gradient with ``spec.reference_loss`` /
``spec.reference_grad`` over the options, dtypes, shapes and bad inputs the engine must handle.
(b) Every kernel specialisation those checks launched, in the block size and warp count a GPU uses for long
rows, compiles to a cubin for sm_80 and sm_90 (``triton.compile`` needs no GPU: Triton ships ptxas).

Both run in subprocesses: the interpreter must be switched on before the module is imported, and importing
triton in a process that already imported TensorFlow aborts it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or importlib.util.find_spec("torch") is None,
    reason="needs triton and torch (pip install 'lsx[torch,triton]')",
)

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, env: dict[str, str], timeout: float) -> dict[str, Any]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    if "TRITON_INTERPRET" not in env:  # compiled kernels, whatever the caller's environment says
        full_env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (
        f"subprocess failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def test_kernels_in_the_interpreter_and_compiled_for_sm80_sm90(tmp_path):
    """(a) then (b): the compile step takes its specialisations from the interpreter run."""
    code = "from tests.test_triton_kernels import _kernel_checks_main; _kernel_checks_main()"
    results = _run(code, {"TRITON_INTERPRET": "1"}, timeout=300)
    if results.get("unusable_interpreter"):  # an old Triton with a new NumPy: nothing can run in it
        pytest.skip(results["unusable_interpreter"])
    assert results["checked"] >= 45, results
    assert not results["failures"], "interpreter:\n" + "\n".join(results["failures"])
    launched = results["launched"]
    names = {spec["name"] for spec in launched}
    assert names == {"_label_statistics", "_probability_statistics", "_label_gradient", "_probability_gradient"}
    path = tmp_path / "launched.json"
    path.write_text(json.dumps(launched))
    code = f"from tests.test_triton_kernels import _compile_main; _compile_main({str(path)!r})"
    compiled = _run(code, {"TRITON_CACHE_DIR": str(tmp_path / "cache")}, timeout=600)
    assert not compiled["failures"], "compile:\n" + "\n".join(compiled["failures"])
    assert compiled["compiled"] == 2 * compiled["variants"] >= len(launched), compiled


@pytest.mark.skipif(
    importlib.util.find_spec("torch") is None or not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU"
)
def test_kernels_on_a_gpu():
    code = "from tests.test_triton_kernels import _kernel_checks_main; _kernel_checks_main('cuda')"
    results = _run(code, {}, timeout=600)
    assert results["checked"] >= 50, results
    assert not results["failures"], "GPU:\n" + "\n".join(results["failures"])


# ---- (b) in a subprocess without the interpreter ---------------------------------------------------------
def _gpu_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """A launched specialisation as a GPU runs it on long rows: blocks of MAX_BLOCK classes, 8 warps (the
    interpreter's launches use small blocks; the code paths, dtypes and constexprs are the same)."""
    from lsx.torch._engines import triton as engine

    gpu = json.loads(json.dumps(spec))
    gpu["constexprs"]["BLOCK_K"] = engine.MAX_BLOCK
    gpu["options"]["num_warps"] = 8
    return gpu


def _compile_one(job: tuple[dict[str, Any], int]) -> str | None:
    import triton
    from triton.backends.compiler import GPUTarget

    from lsx.torch._engines import triton as engine

    spec, cap = job
    try:
        kernel = getattr(engine, spec["name"])
        source = triton.compiler.ASTSource(fn=kernel, signature=spec["signature"], constexprs=spec["constexprs"])
        binary = triton.compile(source, target=GPUTarget("cuda", cap, 32), options=spec["options"])
        if not binary.asm.get("cubin"):
            return f"sm_{cap} {spec}: no cubin"
    except Exception as error:  # reported with the specialisation
        return f"sm_{cap} {spec}: {type(error).__name__}: {str(error)[:2000]}"
    return None


def _compile_main(path: str) -> None:
    """Compile the GPU variant of every launched specialisation for sm_80 and sm_90 (a few processes)."""
    import concurrent.futures
    import multiprocessing

    launched = json.loads(Path(path).read_text())
    variants = list({json.dumps(v, sort_keys=True): v for v in map(_gpu_variant, launched)}.values())
    jobs = [(spec, cap) for spec in variants for cap in (80, 90)]
    workers = max(1, min(4, os.cpu_count() or 1))
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        outcomes = list(pool.map(_compile_one, jobs, chunksize=4))
    failures = [outcome for outcome in outcomes if outcome is not None]
    print("RESULT " + json.dumps({"failures": failures, "compiled": outcomes.count(None), "variants": len(variants)}))


# ---- (a) in a subprocess with TRITON_INTERPRET=1 ---------------------------------------------------------
def _merge(stats, slices, kind, coefficients, opts, labels, k, weight, mask, sample_weight):
    """The single-device harness of the engine interface: every slice's statistics merged in slice order as
    ``_parallel._Call.merge`` does; returns (loss before reduction, denominator, per-slice gradient factors)."""
    import torch

    from lsx import spec

    stats = torch.stack([s.to(torch.float64) for s in stats])  # (P, 6, N)
    n = stats.shape[-1]
    raws = stats[:, 0]
    top = raws.amax(dim=0)
    m = torch.where(torch.isfinite(top), top, 0.0)
    delta = torch.where(torch.isfinite(raws), raws - m, 0.0)
    factor = torch.exp(delta)
    sum_exp = (stats[:, 1] * factor).sum(dim=0)
    sum_exp = torch.where(top == math.inf, math.nan, sum_exp)
    log_sum_exp = sum_exp.log()
    sw = None if sample_weight is None else torch.as_tensor(sample_weight, dtype=torch.float64)
    if kind == "index":
        owner_shift = torch.where(stats[:, 5] != 0, delta, 0.0).sum(dim=0)
        w64 = torch.ones(k, dtype=torch.float64) if weight is None else weight.to(torch.float64)
        if mask is not None:
            w64 = w64.masked_fill(~mask, 0)
        totals = torch.stack([w64[a:b].sum() for a, b in slices]).unsqueeze(1)
        weighted = (stats[:, 4] + torch.where(totals != 0, totals * delta, 0.0)).sum(dim=0)
        w_y = stats[:, 3].sum(dim=0)
        loss, coef = spec.label_row(
            coefficients,
            log_sum_exp=log_sum_exp,
            row_max=m,
            w_y=w_y,
            x_y=stats[:, 2].sum(dim=0) + owner_shift,
            weighted_sum=weighted,
            where=torch.where,
            log=torch.log,
        )
        active = torch.ones(n, dtype=torch.bool) if opts.ignore_index is None else labels != opts.ignore_index
        invalid = active & ((labels < 0) | (labels >= k))
        nan_rows = invalid | (stats[:, 5] == 2).any(dim=0)
        local = torch.where(active, w_y, 0.0)
        denominator = (local if sw is None else local * sw).sum()
    else:
        mass = stats[:, 2]
        loss, coef = spec.probability_row(
            coefficients,
            log_sum_exp=log_sum_exp,
            row_max=m,
            target_mass=mass.sum(dim=0),
            weighted_sum=(stats[:, 3] + torch.where(mass != 0, mass * delta, 0.0)).sum(dim=0),
            weighted_xlogx=stats[:, 4].sum(dim=0),
        )
        active = torch.ones(n, dtype=torch.bool)
        nan_rows = (stats[:, 5] != 0).any(dim=0)
        denominator = torch.tensor(float(n), dtype=torch.float64) if sw is None else sw.sum()
    scale = spec.reduction_scale(opts.reduction, denominator, where=torch.where)
    row_scale = torch.full_like(m, scale) if isinstance(scale, float) else scale.expand_as(m)
    if sw is not None:
        loss = loss * sw
        row_scale = row_scale * sw
    row_scale = torch.where(active, row_scale, 0.0)
    loss = torch.where(active, loss, 0.0).masked_fill(nan_rows, math.nan)
    factors = []
    for r in range(len(slices)):
        local_max = torch.where(torch.isfinite(raws[r]), raws[r], 0.0)
        factors.append((local_max, coef * row_scale * factor[r] / sum_exp, row_scale))
    return loss, denominator, factors, nan_rows


def _harness(
    x,
    target,
    *,
    kind,
    weight=None,
    class_mask=None,
    split=None,
    in_place=False,
    grad_dtype=None,
    tensor_coefficients=False,
    row_padding=0,
    **options,
):
    """(reduced loss, gradient (N, K) as float64) of lsx's options through the Triton kernels, on the device of
    this run (CPU tensors in the interpreter)."""
    import torch

    with torch.device(_DEVICE[0]):
        return _harness_on_device(
            x.to(_DEVICE[0]),
            target.to(_DEVICE[0]),
            kind=kind,
            weight=weight,
            class_mask=class_mask,
            split=split,
            in_place=in_place,
            grad_dtype=grad_dtype,
            tensor_coefficients=tensor_coefficients,
            row_padding=row_padding,
            **options,
        )


def _harness_on_device(
    x, target, *, kind, weight, class_mask, split, in_place, grad_dtype, tensor_coefficients, row_padding, **options
):
    import torch

    from lsx import spec
    from lsx.torch._engines import triton as engine

    if isinstance(options.get("sample_weight"), torch.Tensor):
        options["sample_weight"] = options["sample_weight"].cpu().numpy()
    opts = spec.resolve_options(**options)
    n, k = x.shape
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    if row_padding:  # a row stride larger than k
        wide = torch.zeros(n, k + row_padding, dtype=x.dtype)
        wide[:, :k] = x
        x = wide[:, :k]
    mask = None if class_mask is None else torch.as_tensor(class_mask, dtype=torch.bool, device=x.device)
    w = None if weight is None else torch.as_tensor(weight, dtype=compute, device=x.device)
    valid = k if mask is None else int(mask.sum())
    total = valid if w is None else float((w if mask is None else w.masked_fill(~mask, 0)).sum())
    coefficients = spec.RowCoefficients.of(opts, valid, total)
    a, b = coefficients.a, coefficients.b
    if tensor_coefficients:
        a, b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    labels = target.to(torch.int64) if kind == "index" else None
    slices = [(0, k)] if split is None else [(0, split), (split, k)]
    common = dict(
        softcap=opts.softcap,
        a=a,
        b=b,
        smoothing=opts.label_smoothing != 0,
        num_classes=k,
        ignore_index=opts.ignore_index,
    )
    stats = []
    for lo, hi in slices:
        out = torch.full((6, n), 7.0, dtype=compute)  # every entry must be written
        piece = dict(
            labels=labels,
            probs=None if kind == "index" else target[:, lo:hi],
            weight=None if w is None else w[lo:hi],
            class_mask=None if mask is None else mask[lo:hi],
        )
        engine.statistics(x[:, lo:hi], out, normalize=opts.normalize, offset=lo, **piece, **common)
        stats.append(out)
    loss, denominator, factors, nan_rows = _merge(
        stats, slices, kind, coefficients, opts, labels, k, w, mask, opts.sample_weight
    )
    grad_dtype = grad_dtype or x.dtype
    grad = x.clone() if in_place else torch.full((n, k), 5.0, dtype=grad_dtype)
    source = grad if in_place else x
    for (lo, hi), (local_max, p_scale, row_scale) in zip(slices, factors):
        piece = dict(
            labels=labels,
            probs=None if kind == "index" else target[:, lo:hi],
            weight=None if w is None else w[lo:hi],
            class_mask=None if mask is None else mask[lo:hi],
        )
        engine.gradient(
            source[:, lo:hi],
            grad[:, lo:hi],
            offset=lo,
            local_max=local_max.to(compute),
            p_scale=p_scale.to(compute),
            row_scale=row_scale.to(compute),
            nan_rows=nan_rows if len(slices) > 1 else None,
            **piece,
            **common,
        )
    if opts.reduction == "none":
        value = loss
    else:
        value = spec.reduce_total(opts.reduction, loss.sum(), denominator, opts.empty_mean, where=torch.where)
    return value.cpu().numpy(), grad.to(torch.float64).cpu().numpy()


_TOLERANCES = {"float64": (1e-10, 1e-12), "float32": (2e-5, 2e-6), "float16": (3e-3, 3e-3), "bfloat16": (2e-2, 2e-2)}


def _cases():
    """(name, logits, target, harness keywords, rows expected NaN or None)."""
    import torch

    g = torch.Generator().manual_seed(0)

    def logits(n, k, dtype=torch.float32, spread=3.0):
        return (torch.randn(n, k, generator=g, dtype=torch.float64) * spread).to(dtype)

    def labels(n, k, dtype=torch.int64):
        return torch.randint(0, k, (n,), generator=g).to(dtype)

    def probs(n, k, dtype=torch.float32):
        return torch.softmax(torch.randn(n, k, generator=g, dtype=torch.float64), dim=1).to(dtype)

    weight = torch.rand(37, generator=g, dtype=torch.float64) + 0.25
    weight[3] = 0.0
    mask = torch.ones(37, dtype=torch.bool)
    mask[[1, 5, 20, 36]] = False
    k = 37  # not a power of two, longer than the interpreter's block of 16

    def masked_labels(n):
        y = labels(n, k)
        return torch.where(mask[y], y, torch.full_like(y, 2))

    def masked_probs(n, dtype=torch.float32):
        t = probs(n, k, torch.float64).masked_fill(~mask, 0)
        return (t / t.sum(dim=1, keepdim=True)).to(dtype)

    cases = [
        ("plain", logits(5, k), labels(5, k), {}),
        ("smoothing all", logits(5, k), labels(5, k), dict(label_smoothing=0.1)),
        ("smoothing others", logits(5, k), labels(5, k), dict(label_smoothing=0.2, spread="others")),
        ("weight smoothing", logits(5, k), labels(5, k), dict(weight=weight, label_smoothing=0.1)),
        (
            "ignore_index",
            logits(6, k),
            torch.tensor([3, -100, 7, 0, -100, 36]),
            dict(label_smoothing=0.1, weight=weight),
        ),
        ("ignore_index 4", logits(4, k), torch.tensor([4, 9, 4, 2]), dict(label_smoothing=0.1, ignore_index=4)),
        ("all ignored", logits(3, k), torch.full((3,), -100), dict(label_smoothing=0.1)),
        ("z_loss sum", logits(5, k), labels(5, k), dict(label_smoothing=0.1, z_loss=1e-3, reduction="sum")),
        (
            "normalize",
            logits(5, k),
            labels(5, k),
            dict(label_smoothing=0.2, spread="others", normalize=True, z_loss=1e-4),
        ),
        ("class_mask", logits(5, k), masked_labels(5), dict(class_mask=mask, label_smoothing=0.1)),
        (
            "class_mask weight others",
            logits(5, k),
            masked_labels(5),
            dict(class_mask=mask, weight=weight, label_smoothing=0.3, spread="others", normalize=True),
        ),
        ("softcap", logits(5, k, spread=20.0), labels(5, k), dict(softcap=7.5, label_smoothing=0.1)),
        (
            "softcap mask weight none",
            logits(5, k, spread=20.0),
            masked_labels(5),
            dict(softcap=2.0, class_mask=mask, weight=weight, label_smoothing=0.1, reduction="none"),
        ),
        ("sample_weight", logits(5, k), labels(5, k), dict(label_smoothing=0.1, sample_weight=np.linspace(0.5, 2, 5))),
        ("K=1", logits(4, 1), torch.zeros(4, dtype=torch.int64), dict(label_smoothing=0.1)),
        ("K=1 ignore", logits(3, 1), torch.tensor([0, -100, 0]), {}),
        ("K=16 one block", logits(3, 16), labels(3, 16), dict(label_smoothing=0.1)),
        ("K=48 three full blocks", logits(3, 48), labels(3, 48), dict(label_smoothing=0.1, spread="others")),
        ("in place", logits(5, k), labels(5, k), dict(label_smoothing=0.1, weight=weight, in_place=True)),
        ("row stride", logits(5, k), labels(5, k), dict(label_smoothing=0.1, row_padding=5)),
        (
            "tensor coefficients",
            logits(5, k),
            masked_labels(5),
            dict(label_smoothing=0.1, class_mask=mask, tensor_coefficients=True),
        ),
        (
            "-inf logits",
            logits(3, k).index_put_((torch.tensor([0, 1]), torch.tensor([4, 8])), torch.tensor(-math.inf)),
            torch.tensor([2, 6, 10]),
            dict(label_smoothing=0.1),
        ),
        # the class axis split in two slices (offset != 0), merged as across ranks
        ("split labels", logits(5, k), labels(5, k), dict(label_smoothing=0.1, weight=weight, split=20)),
        (
            "split mask softcap",
            logits(5, k, spread=10.0),
            masked_labels(5),
            dict(
                label_smoothing=0.2, spread="others", class_mask=mask, weight=weight, softcap=4.0, z_loss=1e-3, split=11
            ),
        ),
        ("split with an empty slice", logits(5, k), labels(5, k), dict(label_smoothing=0.1, weight=weight, split=0)),
        ("split probs", logits(5, k), probs(5, k), dict(label_smoothing=0.1, weight=weight, normalize=True, split=20)),
        # probability targets
        ("probs", logits(5, k), probs(5, k), {}),
        (
            "probs smoothing z normalize",
            logits(5, k),
            probs(5, k),
            dict(label_smoothing=0.1, z_loss=1e-3, normalize=True),
        ),
        (
            "probs weight mask softcap",
            logits(5, k, spread=10.0),
            masked_probs(5),
            dict(weight=weight, class_mask=mask, softcap=3.0, label_smoothing=0.2, spread="others", normalize=True),
        ),
        ("probs fp16 target", logits(5, k), probs(5, k, torch.float16), dict(label_smoothing=0.1)),
        (
            "probs tensor coefficients",
            logits(5, k),
            masked_probs(5),
            dict(class_mask=mask, label_smoothing=0.1, tensor_coefficients=True),
        ),
    ]
    for name in ("int8", "int16", "int32", "uint8", "int64"):
        cases.append((f"labels {name}", logits(3, k), labels(3, k, getattr(torch, name)), dict(label_smoothing=0.1)))
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        name = str(dtype).split(".")[-1]
        cases += [
            (f"{name} smoothing weight", logits(5, k, dtype), labels(5, k), dict(label_smoothing=0.1, weight=weight)),
            (
                f"{name} mask softcap others",
                logits(5, k, dtype, spread=10.0),
                masked_labels(5),
                dict(label_smoothing=0.2, spread="others", class_mask=mask, softcap=5.0, z_loss=1e-3, normalize=True),
            ),
            (f"{name} probs", logits(5, k, dtype), probs(5, k, dtype), dict(label_smoothing=0.1, normalize=True)),
        ]
    cases.append(
        (
            "float64 split",
            logits(5, k, torch.float64),
            masked_labels(5),
            dict(label_smoothing=0.1, class_mask=mask, weight=weight, softcap=3.0, split=17),
        )
    )
    cases.append(
        (
            "bfloat16 float32 grad",
            logits(5, k, torch.bfloat16),
            labels(5, k),
            dict(label_smoothing=0.1, grad_dtype=torch.float32),
        )
    )
    return [(name, x, t, kw) for name, x, t, kw in cases]


def _long_rows():
    """Rows of more than one GPU block (GPU runs only: the interpreter would take minutes)."""
    import torch

    g = torch.Generator().manual_seed(2)
    k = 3 * 4096 + 123
    weight = torch.rand(k, generator=g, dtype=torch.float64) + 0.5
    mask = torch.rand(k, generator=g) > 0.1
    cases = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = (torch.randn(4, k, generator=g, dtype=torch.float64) * 4).to(dtype)
        y = torch.tensor([0, k - 1, 4096, -100])
        y = torch.where((y >= 0) & ~mask[y.clamp(min=0)], torch.full_like(y, int(mask.nonzero()[0])), y)
        t = torch.softmax(torch.randn(4, k, generator=g, dtype=torch.float64), dim=1).to(dtype)
        name = str(dtype).split(".")[-1]
        cases += [
            (
                f"{name} labels",
                x,
                y,
                dict(label_smoothing=0.1, weight=weight, class_mask=mask, softcap=8.0, z_loss=1e-4),
            ),
            (f"{name} labels split", x, y, dict(label_smoothing=0.1, spread="others", split=5000)),
            (f"{name} probs", x, t, dict(label_smoothing=0.1, normalize=True, weight=weight)),
        ]
    return cases


def _check_case(name, x, t, keywords, failures):
    import torch

    from lsx import spec

    harness_only = ("split", "in_place", "grad_dtype", "tensor_coefficients", "row_padding")
    options = {key: value for key, value in keywords.items() if key not in harness_only}
    kind = "index" if not t.is_floating_point() else "probs"
    loss, grad = _harness(x, t, kind=kind, **keywords)
    x64 = x.to(torch.float64).numpy()
    t_ref = t.to(torch.float64).numpy() if kind == "probs" else t.numpy()
    for key in ("weight", "class_mask"):
        if isinstance(options.get(key), torch.Tensor):
            options[key] = options[key].numpy()
    ref_loss = spec.reference_loss(x64, t_ref, **options)
    ref_grad = spec.reference_grad(x64, t_ref, **options)
    dtype = str(x.dtype).split(".")[-1]
    rtol, atol = _TOLERANCES[dtype]
    grad_tol = atol * max(1.0, float(np.abs(ref_grad).max()))
    if keywords.get("grad_dtype") == torch.float32:
        grad_tol = _TOLERANCES["float32"][1]
    if not np.allclose(loss, ref_loss, rtol=rtol, atol=atol, equal_nan=True):
        failures.append(f"{name}: loss {loss} != reference {ref_loss}")
    if not np.allclose(grad, ref_grad, rtol=rtol, atol=grad_tol, equal_nan=True):
        worst = np.unravel_index(np.argmax(np.abs(grad - ref_grad)), grad.shape)
        failures.append(f"{name}: gradient differs at {worst}: {grad[worst]} != {ref_grad[worst]}")


def _check_bad_rows(failures):
    """Rows with a label outside [0, K), on a masked class, or probability mass on a masked class: NaN loss and
    gradient there (masked classes stay 0), the other rows exact."""
    import torch

    from lsx import spec

    g = torch.Generator().manual_seed(1)
    k = 21
    x = torch.randn(6, k, generator=g, dtype=torch.float64).float()
    mask = torch.ones(k, dtype=torch.bool)
    mask[[2, 17]] = False
    y = torch.tensor([0, 21, 4, 17, -3, 9])  # 21 and -3 outside [0, 21), 17 on a masked class
    bad = np.array([False, True, False, True, True, False])
    good_y = torch.where(torch.as_tensor(bad), torch.full_like(y, -100), y)
    t = torch.softmax(torch.randn(6, k, generator=g), dim=1).masked_fill(~mask, 0)
    t[1, 2] = 0.25  # mass on a masked class: rows 1 and 4
    t[4, 17] = 1e-3
    t_bad = np.array([False, True, False, False, True, False])
    opts = dict(label_smoothing=0.1, class_mask=mask, reduction="none")
    for split in (None, 8, 18):
        name = f"bad rows split={split}"
        for kind, target, rows, ref_target in (
            ("index", y, bad, good_y),
            ("probs", t, t_bad, t.masked_fill(torch.as_tensor(t_bad)[:, None], 0).masked_fill(~mask, 0)),
        ):
            loss, grad = _harness(x, target, kind=kind, split=split, **opts)
            ref_opts = dict(opts, class_mask=mask.numpy())
            ref_loss = spec.reference_loss(x.double().numpy(), ref_target.numpy(), **ref_opts)
            ref_grad = spec.reference_grad(x.double().numpy(), ref_target.numpy(), **ref_opts)
            ok = (
                np.isnan(loss[rows]).all()
                and np.isnan(grad[rows][:, mask.numpy()]).all()
                and (grad[rows][:, ~mask.numpy()] == 0).all()
                and np.allclose(loss[~rows], ref_loss[~rows], rtol=2e-5, atol=2e-6)
                and np.allclose(grad[~rows], ref_grad[~rows], rtol=2e-5, atol=2e-6)
            )
            if not ok:
                failures.append(f"{name} {kind}: loss {loss}, reference {ref_loss}")


def _check_empty(failures):
    """N = 0 launches nothing and succeeds."""
    import torch

    with torch.device(_DEVICE[0]):
        _check_empty_on_device(failures)


def _check_empty_on_device(failures):
    import torch

    from lsx.torch._engines import triton as engine

    before = len(engine.launched())
    x = torch.empty(0, 9)
    y = torch.empty(0, dtype=torch.int64)
    out = torch.empty(6, 0)
    engine.statistics(x, out, labels=y)
    empty = torch.empty(0)
    engine.gradient(x, torch.empty(0, 9), labels=y, local_max=empty, p_scale=empty, row_scale=empty)
    if len(engine.launched()) != before:
        failures.append("N = 0 launched a kernel")


def _check_errors(failures):
    """Contract violations are clear errors, not wrong numbers."""
    import torch

    with torch.device(_DEVICE[0]):
        _check_errors_on_device(failures)


def _check_errors_on_device(failures):
    import torch

    from lsx.torch._engines import triton as engine

    x = torch.zeros(3, 8)
    out = torch.empty(6, 3)
    bad_calls = [
        (
            "column stride",
            lambda: engine.statistics(torch.zeros(8, 3).T, out, labels=torch.zeros(3, dtype=torch.int64)),
        ),
        ("int32 labels", lambda: engine.statistics(x, out, labels=torch.zeros(3, dtype=torch.int32))),
        (
            "out dtype",
            lambda: engine.statistics(
                x, torch.empty(6, 3, dtype=torch.float64), labels=torch.zeros(3, dtype=torch.int64)
            ),
        ),
        ("no target", lambda: engine.statistics(x, out)),
        ("strided labels", lambda: engine.statistics(x, out, labels=torch.zeros(6, dtype=torch.int64)[::2])),
    ]
    for what, call in bad_calls:
        try:
            call()
        except (TypeError, ValueError):
            continue
        failures.append(f"{what}: no error")


#: the device the kernel checks run on: "cpu" in the interpreter, "cuda" on a GPU
_DEVICE = ["cpu"]


def _kernel_checks_main(device: str = "cpu") -> None:
    """Every check, on CPU tensors in the interpreter or on a CUDA GPU (there twice: with the interpreter's
    small blocks, so that rows span several blocks, and with the GPU's own on rows longer than one block)."""
    import torch

    from lsx.torch._engines import triton as engine

    _DEVICE[0] = device
    assert engine.interpreted() == (device == "cpu"), "the interpreter runs CPU tensors, a GPU runs CUDA tensors"
    if device == "cpu":
        try:
            engine._check_interpreter()
        except RuntimeError as error:
            print("RESULT " + json.dumps({"unusable_interpreter": str(error)}))
            return
    torch.set_num_threads(1)
    failures: list[str] = []
    checked = 0
    cases = _cases()
    if device != "cpu":
        cases += [(f"GPU blocks: {name}", x, t, kw) for name, x, t, kw in _long_rows()]
    for name, x, t, keywords in cases:
        if device != "cpu":
            engine.MAX_BLOCK = 4096 if name.startswith("GPU blocks") else engine.INTERPRETER_MAX_BLOCK
        try:
            _check_case(name, x, t, keywords, failures)
        except Exception as error:  # one case's crash must not hide the others
            failures.append(f"{name}: {type(error).__name__}: {error}")
        checked += 1
    engine.MAX_BLOCK = engine.INTERPRETER_MAX_BLOCK if device != "cpu" else engine.MAX_BLOCK
    for check in (_check_bad_rows, _check_empty, _check_errors):
        try:
            check(failures)
        except Exception as error:
            failures.append(f"{check.__name__}: {type(error).__name__}: {error}")
        checked += 1
    launched = [
        {"name": spec.name, "signature": spec.signature, "constexprs": spec.constexprs, "options": spec.options}
        for spec in engine.launched()
    ]
    print("RESULT " + json.dumps({"failures": failures, "checked": checked, "launched": launched}))
