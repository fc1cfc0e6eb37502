"""The engine interface of lsx.torch (``lsx.torch._engines``): the engine choice (``LSX_TORCH_ENGINE``) and the
two steps (statistics of a slice of the class axis, merge, gradient) of every engine against the fused loss."""

from __future__ import annotations

import itertools
import math

import pytest

torch = pytest.importorskip("torch")

import lsx.torch  # noqa: E402
from lsx import spec  # noqa: E402
from lsx.torch import _engines  # noqa: E402

F64 = torch.float64
ENGINES = ["torch"] + (["numba"] if _engines.engine("numba").kernel() is not None else [])


# --------------------------------------------------------------------------------------------------------
# The choice
# --------------------------------------------------------------------------------------------------------
def test_auto_takes_numba_for_cpu_float32_and_float64_and_plain_torch_otherwise(monkeypatch):
    monkeypatch.delenv(_engines.ENVIRONMENT, raising=False)
    expected = "numba" if "numba" in ENGINES else "torch"
    assert _engines.choose(torch.zeros(2, 3)) == expected
    assert _engines.choose(torch.zeros(2, 3, dtype=F64)) == expected
    assert _engines.choose(torch.zeros(2, 3, dtype=torch.float16)) == "torch"
    assert _engines.choose(torch.zeros(2, 3, dtype=torch.bfloat16)) == "torch"
    assert _engines.choose(torch.zeros(2, 3, device="meta")) == "torch"
    strided = torch.zeros(3, 2).T
    assert _engines.choose(strided, strided=False) == "torch"
    # linear_loss computes float16 inputs' logits in float32: the Numba kernel takes those
    assert _engines.choose(torch.zeros(2, 3, dtype=torch.float16), dtype=torch.float32) == expected
    monkeypatch.setenv(_engines.ENVIRONMENT, "auto")
    assert _engines.choose(torch.zeros(2, 3)) == expected


def test_forced_engines(monkeypatch):
    monkeypatch.setenv(_engines.ENVIRONMENT, "torch")
    assert _engines.choose(torch.zeros(2, 3)) == "torch"
    monkeypatch.setenv(_engines.ENVIRONMENT, "numba")
    if "numba" in ENGINES:
        assert _engines.choose(torch.zeros(2, 3)) == "numba"
    with pytest.raises(RuntimeError, match=r"LSX_TORCH_ENGINE=numba cannot serve .*float16"):
        _engines.choose(torch.zeros(2, 3, dtype=torch.float16))
    with pytest.raises(RuntimeError, match=r"LSX_TORCH_ENGINE=numba cannot serve .*meta"):
        _engines.choose(torch.zeros(2, 3, device="meta"))
    with pytest.raises(RuntimeError, match=r"LSX_TORCH_ENGINE=numba cannot serve"):
        lsx.torch.loss(torch.zeros(2, 3, dtype=torch.float16), torch.tensor([0, 1]))
    monkeypatch.setenv(_engines.ENVIRONMENT, "cuda-please")
    with pytest.raises(ValueError, match=r"LSX_TORCH_ENGINE must be one of .*'cuda-please'"):
        lsx.torch.loss(torch.zeros(2, 3), torch.tensor([0, 1]))


@pytest.mark.parametrize("engine", ENGINES)
def test_forced_engine_gives_the_same_loss(engine, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 9, generator=gen, dtype=F64, requires_grad=True)
    y = torch.tensor([0, 8, -100, 3, 4])
    options = dict(label_smoothing=0.2, spread="others", z_loss=0.01, softcap=4.0)
    expected = lsx.torch.loss(x, y, **options)
    (expected_grad,) = torch.autograd.grad(expected, x)
    monkeypatch.setenv(_engines.ENVIRONMENT, engine)
    value = lsx.torch.loss(x, y, **options)
    (grad,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------------------------------------
# The two steps against the fused loss, on one slice and on uneven slices of the class axis
# --------------------------------------------------------------------------------------------------------
CASES = {
    "plain": ("index", {}),
    "smoothing": ("index", dict(label_smoothing=0.1)),
    "others-weighted": ("index", dict(label_smoothing=0.2, spread="others", weighted=True)),
    "z-normalize-ignore": ("index", dict(label_smoothing=0.1, z_loss=0.02, normalize=True, ignore_index=2)),
    "masked-softcap": ("index", dict(label_smoothing=0.1, masked=True, softcap=2.5, weighted=True)),
    "probs": ("probs", dict(label_smoothing=0.1, z_loss=0.01)),
    "probs-masked-weighted": ("probs", dict(label_smoothing=0.1, masked=True, weighted=True, normalize=True)),
    "probs-softcap": ("probs", dict(softcap=3.0, normalize=True)),
}
SPLITS = {"one": (11,), "two": (4, 7), "three-one-empty": (5, 0, 6)}


def _problem(kind, options, dtype, seed=0):
    options = dict(options)
    gen = torch.Generator().manual_seed(seed)
    n, k = 7, 11
    x = (3 * torch.randn(n, k, generator=gen, dtype=F64)).to(dtype)
    x[1, 4] = -math.inf
    mask = None
    if options.pop("masked", False):
        mask = torch.ones(k, dtype=torch.bool)
        mask[[2, 9]] = False
    weight = torch.rand(k, generator=gen, dtype=F64) + 0.1 if options.pop("weighted", False) else None
    if kind == "index":
        target = torch.tensor([0, 3, 10, 5, 2, 7, 1])
        if mask is not None:
            target = torch.where(mask[target], target, 0)
    else:
        target = torch.rand(n, k, generator=gen, dtype=F64)
        if mask is not None:
            target[:, ~mask] = 0
        target = (target / target.sum(dim=1, keepdim=True)).to(dtype)
    return x, target, weight, mask, options


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("splits", list(SPLITS))
def test_two_steps_merged_equal_the_fused_loss(engine, dtype, case, splits):
    kind, options = CASES[case]
    x, target, weight, mask, options = _problem(kind, options, dtype)
    n, k = x.shape
    opts = spec.resolve_options(None, reduction="sum", **options)
    module = _engines.engine(engine)
    valid = k if mask is None else int(mask.sum())
    total = valid if weight is None else float(weight[mask].sum() if mask is not None else weight.sum())
    coefficients = spec.RowCoefficients.of(opts, valid, total)
    bounds = list(itertools.accumulate((0,) + SPLITS[splits]))
    slices = [slice(start, stop) for start, stop in itertools.pairwise(bounds)]
    compute = F64 if dtype == F64 else torch.float32
    arguments = []
    for part in slices:
        arguments.append(
            dict(
                weight=None if weight is None else weight[part].to(compute),
                class_mask=None if mask is None else mask[part],
                softcap=opts.softcap,
                a=coefficients.a,
                b=coefficients.b,
                smoothing=opts.label_smoothing != 0,
                offset=part.start,
                num_classes=k,
                ignore_index=opts.ignore_index,
            )
        )
        arguments[-1].update(dict(labels=target) if kind == "index" else dict(probs=target[:, part]))
    stats = []
    for part, args in zip(slices, arguments):
        out = torch.empty((6, n), dtype=F64)
        module.statistics(x[:, part].contiguous(), out, normalize=opts.normalize, **args)
        stats.append(out)
    stats = torch.stack(stats)

    def weight_total(part):  # each slice's Σ w over its valid classes (its valid class count without weights)
        valid = torch.ones(part.stop - part.start, dtype=torch.bool) if mask is None else mask[part]
        return float(valid.sum()) if weight is None else float(torch.where(valid, weight[part], 0.0).sum())

    totals = [weight_total(part) for part in slices]
    active = torch.ones(n, dtype=torch.bool) if kind != "index" else target != opts.ignore_index
    grads, losses = [], []
    for rank, (part, args) in enumerate(zip(slices, arguments)):
        merged = _engines.merge(
            stats,
            rank=rank,
            kind=kind,
            coefficients=coefficients,
            smoothing=opts.label_smoothing != 0,
            weight_totals=totals,
        )
        row_scale = active.to(F64)
        grad = x[:, part].clone()
        module.gradient(
            grad,
            grad,  # in place
            local_max=merged["local_max"],
            p_scale=merged["coef"] * merged["own_factor"] / merged["sum_exp"] * row_scale,
            row_scale=row_scale,
            nan_rows=merged["flagged"],
            **args,
        )
        grads.append(grad)
        losses.append(torch.where(active, merged["loss"], 0.0))
    for other in losses[1:]:  # every slice's holder gets the same loss, bit for bit
        assert torch.equal(other, losses[0])
    leaf = x.clone().requires_grad_(True)
    extra = dict(weight=weight, class_mask=mask)
    expected = lsx.torch.loss(leaf, target, **{**options, **extra}, reduction="none")
    (expected_grad,) = torch.autograd.grad(expected.sum(), leaf)
    tol = 1e-11 if dtype == F64 else 2e-5
    torch.testing.assert_close(losses[0].to(dtype), expected, rtol=tol, atol=tol)
    torch.testing.assert_close(torch.cat(grads, dim=1), expected_grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("engine", ENGINES)
def test_bad_rows_in_the_two_steps(engine):
    """An out-of-range label and a label on a masked class: flagged by the statistics, NaN in the gradient row
    (0 on the masked classes); an ignored row: zeros."""
    module = _engines.engine(engine)
    x = torch.randn(4, 5, dtype=F64)
    mask = torch.tensor([True, True, False, True, True])
    labels = torch.tensor([7, 2, -100, 1])
    args = dict(class_mask=mask, offset=0, num_classes=5, ignore_index=-100, a=1.0, b=0.0)
    out = torch.empty((6, 4), dtype=F64)
    module.statistics(x, out, labels=labels, **args)
    assert out[5].tolist() == [0.0, 2.0, 0.0, 1.0]
    assert math.isnan(out[2, 1]) and out[2, 0] == 0.0
    ones = torch.ones(4, dtype=F64)
    grad = torch.empty_like(x)
    module.gradient(x, grad, local_max=out[0], p_scale=ones / out[1], row_scale=ones, labels=labels, **args)
    for row in (0, 1):
        assert torch.isnan(grad[row, mask]).all() and (grad[row, ~mask] == 0).all()
    assert (grad[2] == 0).all()
    assert torch.isfinite(grad[3]).all() and grad[3, 2] == 0
