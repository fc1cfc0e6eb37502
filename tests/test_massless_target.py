"""A target without mass (ε = 1, spread="others": q_y = 0) contributes nothing, even at x_y = −inf, in every
lsx.torch engine and front door: the fused Numba kernel (also in place, as linear_loss's chunks run it), the
plain-torch engine, and the two steps (statistics, merge, gradient) that process_group= uses."""

from __future__ import annotations

import numpy as np
import pytest

from lsx import spec

torch = pytest.importorskip("torch")
import lsx.torch  # noqa: E402
from lsx.torch import _engines  # noqa: E402

F64 = torch.float64
ENGINES = ["torch", pytest.param("numba", marks=pytest.mark.skipif(not _engines._numba_available(), reason="numba"))]
OPTIONS = {
    "plain": dict(),
    "z-normalize": dict(z_loss=0.01, normalize=True),
    "softcap": dict(softcap=3.0, z_loss=1e-3),
    "weighted-masked": dict(weighted=True, masked=True, normalize=True),
}


def _data(options, *, minus_inf=True):
    gen = torch.Generator().manual_seed(7)
    x = 3 * torch.randn(6, 8, generator=gen, dtype=F64)
    y = torch.tensor([0, 3, 5, 2, 3, 1])
    if minus_inf:  # the massless target at −inf
        x[0, 0] = -torch.inf
        x[2, 5] = -torch.inf
    options = dict(options, label_smoothing=1.0, spread="others")
    extra = {}
    if options.pop("weighted", False):
        extra["weight"] = torch.rand(8, generator=gen, dtype=F64) + 0.2
        extra["weight"][4] = 0.0
    if options.pop("masked", False):
        extra["class_mask"] = torch.tensor([True] * 7 + [False])
        x[:, 7] = torch.where(torch.arange(6) % 2 == 0, -torch.inf, 1e3)
    return x, y, options, extra


def _reference(x, y, options, extra, reduction, cotangent):
    arrays = {name: value.numpy() for name, value in extra.items()}
    loss = spec.reference_loss(x.numpy(), y.numpy(), axis=1, reduction=reduction, **arrays, **options)
    grad = spec.reference_grad(
        x.numpy(), y.numpy(), axis=1, reduction=reduction, cotangent=cotangent.numpy(), **arrays, **options
    )
    return torch.from_numpy(np.asarray(loss)), torch.from_numpy(grad)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_loss_massless_target_at_minus_inf(monkeypatch, engine, reduction, name):
    monkeypatch.setenv(_engines.ENVIRONMENT, engine)
    x, y, options, extra = _data(OPTIONS[name])
    leaf = x.clone().requires_grad_(True)
    value = lsx.torch.loss(leaf, y, reduction=reduction, **extra, **options)
    cotangent = torch.rand(value.shape, generator=torch.Generator().manual_seed(3), dtype=F64) + 0.5
    (grad,) = torch.autograd.grad(value, leaf, cotangent)
    loss, want = _reference(x, y, options, extra, reduction, cotangent)
    assert torch.isfinite(value).all()
    torch.testing.assert_close(value.detach(), loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_two_steps_massless_target_at_minus_inf(monkeypatch, engine, name):
    """The statistics/merge/gradient path (one block: what process_group= runs per rank) with the target's
    logit at −inf."""
    monkeypatch.setenv(_engines.ENVIRONMENT, engine)
    x, y, options, extra = _data(OPTIONS[name])
    opts = spec.Options(**dict(options, reduction="sum"))
    grad = torch.empty_like(x)
    per_element, _ = _engines.run(engine, x, y, "index", opts, extra.get("weight"), extra.get("class_mask"), grad)
    loss, want = _reference(x, y, options, extra, "none", torch.ones(6, dtype=F64))
    torch.testing.assert_close(per_element, loss, rtol=1e-12, atol=1e-12)
    _, want = _reference(x, y, options, extra, "sum", torch.ones((), dtype=F64))
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_linear_loss_massless_target(monkeypatch, engine, reduction, name):
    """linear_loss with autograd (the fused Numba kernel runs in place on each chunk's logits) against the
    reference on the same logits: the target left out, not its exponential."""
    monkeypatch.setenv(_engines.ENVIRONMENT, engine)
    _, y, options, extra = _data(OPTIONS[name], minus_inf=False)
    gen = torch.Generator().manual_seed(5)
    h = torch.randn(6, 4, generator=gen, dtype=F64)
    head = 2 * torch.randn(8, 4, generator=gen, dtype=F64)
    bias = torch.randn(8, generator=gen, dtype=F64)
    leaves = [t.clone().requires_grad_(True) for t in (h, head, bias)]
    value = lsx.torch.linear_loss(
        leaves[0], leaves[1], y, linear_bias=leaves[2], reduction=reduction, chunk_size=4, **extra, **options
    )
    cotangent = torch.rand(value.shape, generator=gen, dtype=F64) + 0.5
    grads = torch.autograd.grad(value, leaves, cotangent)
    logits = h @ head.T + bias
    loss, g = _reference(logits, y, options, extra, reduction, cotangent)
    torch.testing.assert_close(value.detach(), loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], g @ head, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grads[1], g.T @ h, rtol=1e-11, atol=1e-11)
    torch.testing.assert_close(grads[2], g.sum(dim=0), rtol=1e-11, atol=1e-11)


@pytest.mark.skipif(not _engines._numba_available(), reason="numba")
@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("minus_inf", [False, True])
def test_numba_kernel_in_place_massless_target(softcap, minus_inf):
    """The fused kernel in place (``out2`` is the logits' memory) gives the same loss and gradient as with a
    separate buffer: the sum over the other classes reads the logits, not their exponentials."""
    from lsx.numpy import _numba

    x, y, options, _ = _data(dict(z_loss=0.01, normalize=True), minus_inf=minus_inf)
    opts = spec.Options(**dict(options, softcap=softcap, reduction="none"))
    x_np = x.numpy().copy()
    apart = _numba.forward_backward(x_np, y.numpy(), "index", opts, None, None, np.float64, True)
    buffer = x_np.copy()
    inside = _numba.forward_backward(buffer, y.numpy(), "index", opts, None, None, np.float64, True, out2=buffer)
    assert np.shares_memory(inside[2], buffer)
    reference = spec.reference_loss(x_np, y.numpy(), axis=1, reduction="none", softcap=softcap, **options)
    np.testing.assert_allclose(apart[0], reference, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(inside[0], apart[0])
    np.testing.assert_array_equal(inside[2], apart[2])
