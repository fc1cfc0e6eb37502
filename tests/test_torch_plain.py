"""lsx.torch's short path for the usual eager call (lsx.torch._plain) against the general path.

The general path is reached by the same call with ``axis=1`` (the short path takes only ``axis=None``): both
must give the same loss and gradient bit for bit, raise the same errors, and behave the same under autograd.
"""

from __future__ import annotations

import itertools
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")

import lsx.numpy  # noqa: E402
import lsx.torch  # noqa: E402

F = torch.nn.functional


def _data(n, k, seed, dtype=torch.float32, ignore=None):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(n, k, generator=gen, dtype=torch.float64)).to(dtype)
    y = torch.randint(0, k, (n,), generator=gen)
    if ignore is not None:
        y = torch.where(torch.rand(n, generator=gen) < 0.3, torch.tensor(ignore), y)
    return x, y


def _run(x, y, grad_output=None, **options):
    x = x.detach().clone().requires_grad_(True)
    value = lsx.torch.loss(x, y, **options)
    upstream = torch.ones_like(value) if grad_output is None else grad_output
    value.backward(upstream)
    return value.detach(), x.grad, value


OPTIONS = [
    {},
    {"label_smoothing": 0.1},
    {"label_smoothing": 0.3, "spread": "others"},
    {"label_smoothing": 0.2, "z_loss": 1e-3},
    {"label_smoothing": 0.1, "normalize": True},
    {"label_smoothing": 1.0},
    {"reduction": "sum", "label_smoothing": 0.05},
    {"reduction": "none", "label_smoothing": 0.05},
    {"ignore_index": 3, "label_smoothing": 0.1},
    {"ignore_index": None},
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 1), (64, 10), (7, 196), (300, 257), (4099, 17)])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "plain")
def test_short_path_equals_the_general_path_bit_for_bit(options, shape, dtype):
    n, k = shape
    if k < 2 and options.get("spread") == "others":
        pytest.skip("spread='others' needs two classes")
    x, y = _data(n, k, zlib_seed(options, shape), dtype, ignore=options.get("ignore_index"))
    upstream = None
    if options.get("reduction") == "none":
        upstream = torch.linspace(-1.0, 2.0, n, dtype=dtype)
    value, grad, node = _run(x, y, upstream, **options)
    assert type(node.grad_fn).__name__ == "_PlainBackward"  # the short path served it
    general_value, general_grad, general_node = _run(x, y, upstream, axis=1, **options)
    assert type(general_node.grad_fn).__name__ != "_PlainBackward"
    assert value.dtype == dtype and grad.dtype == dtype
    assert torch.equal(value, general_value) or (value.isnan().all() and general_value.isnan().all())
    assert torch.equal(grad, general_grad)
    expected = lsx.numpy.loss(x.numpy(), y.numpy(), **options)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=1e-6)


def zlib_seed(options, shape):
    return zlib.crc32(repr((sorted(options.items()), shape)).encode())


def test_matches_torch_cross_entropy_with_its_own_options():
    x, y = _data(64, 10, 1, torch.float64, ignore=-100)
    for eps, reduction in itertools.product([0.0, 0.1], ["mean", "sum", "none"]):
        value, grad, _ = _run(x, y, label_smoothing=eps, reduction=reduction)
        xt = x.clone().requires_grad_(True)
        expected = F.cross_entropy(xt, y, label_smoothing=eps, reduction=reduction)
        expected.backward(torch.ones_like(expected))
        torch.testing.assert_close(value, expected.detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grad, xt.grad, rtol=1e-12, atol=1e-12)


def test_every_label_ignored_follows_empty_mean():
    x, _ = _data(4, 5, 2)
    y = torch.full((4,), -100)
    value, grad, _ = _run(x, y)
    assert value.isnan()
    assert torch.equal(grad, torch.zeros_like(grad))
    value, grad, _ = _run(x, y, empty_mean="zero")
    assert value.item() == 0.0


@pytest.mark.parametrize("bad", [10, -1, -100, 2**40])
def test_a_label_out_of_range_raises_the_general_paths_error(bad):
    x, y = _data(8, 10, 3)
    y[5] = bad
    options = {"ignore_index": None} if bad == -100 else {}
    with pytest.raises(ValueError) as short:
        lsx.torch.loss(x.requires_grad_(True), y, **options)
    with pytest.raises(ValueError) as general:
        lsx.torch.loss(x, y, axis=1, **options)
    assert str(short.value) == str(general.value)
    assert str(bad) in str(short.value)


def test_bad_options_raise_the_general_paths_errors():
    x, y = _data(8, 10, 4)
    for options in ({"label_smoothing": 1.5}, {"label_smoothing": True}, {"spread": "none"}, {"reduction": "avg"}):
        with pytest.raises((ValueError, TypeError)) as short:
            lsx.torch.loss(x, y, **options)
        with pytest.raises((ValueError, TypeError)) as general:
            lsx.torch.loss(x, y, axis=1, **options)
        assert type(short.value) is type(general.value) and str(short.value) == str(general.value)
    with pytest.raises(ValueError, match="spread"):
        lsx.torch.loss(torch.zeros(3, 1), torch.zeros(3, dtype=torch.long), label_smoothing=0.1, spread="others")


def test_without_grad_there_is_no_node():
    x, y = _data(16, 10, 5)
    value = lsx.torch.loss(x, y, label_smoothing=0.1)
    assert value.grad_fn is None and not value.requires_grad
    with torch.no_grad():
        value_no_grad = lsx.torch.loss(x.requires_grad_(True), y, label_smoothing=0.1)
    assert value_no_grad.grad_fn is None
    assert torch.equal(value, value_no_grad)


def test_retain_graph_second_backward_and_create_graph():
    x, y = _data(16, 10, 6)
    x.requires_grad_(True)
    value = lsx.torch.loss(x, y, label_smoothing=0.1)
    (first,) = torch.autograd.grad(value, x, retain_graph=True)
    (second,) = torch.autograd.grad(value * 3, x, retain_graph=True)
    torch.testing.assert_close(second, 3 * first)
    (third,) = torch.autograd.grad(value, x)
    assert torch.equal(third, first)
    with pytest.raises(RuntimeError, match="second time"):
        torch.autograd.grad(value, x)
    value = lsx.torch.loss(x, y)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(value, x, create_graph=True)


def test_gradient_accumulates_and_the_buffer_is_the_gradient():
    x, y = _data(16, 10, 7)
    x.requires_grad_(True)
    lsx.torch.loss(x, y).backward()
    once = x.grad.clone()
    lsx.torch.loss(x, y).backward()
    torch.testing.assert_close(x.grad, 2 * once)


def test_saved_tensor_hooks_see_the_gradient_buffer():
    x, y = _data(16, 10, 8)
    x.requires_grad_(True)
    packed = []

    def pack(tensor):
        packed.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        value = lsx.torch.loss(x, y)
    assert packed == [(16, 10)]
    value.backward()


def test_other_calls_take_the_general_path(monkeypatch):
    """Layouts, dtypes, forced engines and transforms the short path does not serve give the same numbers."""
    x, y = _data(12, 10, 9)
    cases = {
        "int32 labels": (x, y.int()),
        "strided logits": (x.t().contiguous().t(), y),
        "3-d logits": (x.reshape(12, 10, 1), y.reshape(12, 1)),
    }
    _, expected, _ = _run(x, y, label_smoothing=0.1)
    for name, (xi, yi) in cases.items():
        _, grad, node = _run(xi, yi, label_smoothing=0.1)
        assert type(node.grad_fn).__name__ != "_PlainBackward", name
        torch.testing.assert_close(grad.reshape(12, 10), expected, rtol=1e-6, atol=1e-7)
    monkeypatch.setenv("LSX_TORCH_ENGINE", "torch")
    _, grad, node = _run(x, y, label_smoothing=0.1)
    assert type(node.grad_fn).__name__ != "_PlainBackward"
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-7)
    monkeypatch.setenv("LSX_TORCH_ENGINE", "bogus")
    with pytest.raises(ValueError, match="LSX_TORCH_ENGINE"):
        lsx.torch.loss(x, y)
    monkeypatch.delenv("LSX_TORCH_ENGINE")
    grad_func = torch.func.grad(lambda x: lsx.torch.loss(x, y, label_smoothing=0.1))(x)
    torch.testing.assert_close(grad_func, expected, rtol=1e-6, atol=1e-7)


def test_module_takes_the_short_path():
    x, y = _data(16, 10, 10)
    x.requires_grad_(True)
    value = lsx.torch.CrossEntropyLoss(label_smoothing=0.1, spread="others")(x, y)
    assert type(value.grad_fn).__name__ == "_PlainBackward"
    torch.testing.assert_close(value, lsx.torch.loss(x, y, axis=1, label_smoothing=0.1, spread="others"))


def test_an_ignore_index_outside_the_classes():
    """ignore_index may be any int64 (torch's -100, a large pad id): those labels are ignored, others checked."""
    x, y = _data(8, 10, 11)
    y[2] = 2**62
    value, grad, node = _run(x, y, ignore_index=2**62)
    assert type(node.grad_fn).__name__ == "_PlainBackward"
    general, general_grad, _ = _run(x, y, axis=1, ignore_index=2**62)
    assert torch.equal(value, general) and torch.equal(grad, general_grad)
    assert torch.equal(grad[2], torch.zeros(10))


@pytest.mark.parametrize("route", [{}, {"axis": 1}, {"weight": "ones"}, {"label_smoothing": 0.1, "reduction": "none"}])
def test_a_lazily_negated_view_is_read_negated(route):
    """A tensor with torch's negative bit (``torch._neg_view``) holds its values un-negated in memory: every
    path that reads memory must see ``-x``, and the gradient must flow back through the view."""
    options = dict(route)
    if options.get("weight") == "ones":
        options["weight"] = torch._neg_view(-torch.linspace(0.5, 2.0, 10))
    base, y = _data(12, 10, 12)
    probs = torch.softmax(torch.randn(12, 10, generator=torch.Generator().manual_seed(3)), dim=1)
    for target, truth_target in ((y, y), (torch._neg_view(-y), y), (torch._neg_view(-probs), probs)):
        leaf = base.clone().requires_grad_(True)
        value = lsx.torch.loss(torch._neg_view(leaf), target, **options)
        value.backward(torch.ones_like(value))
        expected_leaf = base.clone().requires_grad_(True)
        plain_options = {**options, "weight": None if "weight" not in options else options["weight"].resolve_neg()}
        expected = lsx.torch.loss(-expected_leaf, truth_target, **plain_options)
        expected.backward(torch.ones_like(expected))
        torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=1e-6, atol=1e-7)
