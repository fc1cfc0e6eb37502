"""lsx.torch against torch's own cross-entropy, the float64 reference, gradcheck and torch.compile."""

from __future__ import annotations

import itertools
import math
import re
import zlib

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import lsx.numpy  # noqa: E402
import lsx.torch  # noqa: E402
from lsx import spec  # noqa: E402
from lsx.torch import _function as _torch_function  # noqa: E402
from lsx.torch._engines import numba as _numba_engine  # noqa: E402
from lsx.torch._engines import ops as _ops_engine  # noqa: E402

F64 = torch.float64
# raised by torch's own imports when torch.compile loads Inductor
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(params=["default", "plain-torch"])
def engine(request, monkeypatch):
    """Both CPU engines: the default (the Numba kernel where installed) and the plain-torch one."""
    if request.param == "plain-torch":
        monkeypatch.setenv("LSX_TORCH_ENGINE", "torch")
    return request.param


def _data(shape, kind, seed, *, ignore=None, k_axis=None, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    axis = (1 if len(shape) >= 2 else 0) if k_axis is None else k_axis
    k = shape[axis]
    x = (2 * torch.randn(shape, generator=gen, dtype=F64)).to(dtype)
    if kind == "index":
        lead = shape[:axis] + shape[axis + 1 :]
        y = torch.randint(0, k, lead, generator=gen)
        if ignore is not None:
            y = torch.where(torch.rand(lead, generator=gen) < 0.3, torch.tensor(ignore), y)
    else:
        y = torch.softmax(torch.randn(shape, generator=gen, dtype=F64), dim=axis)
    return x, y


def _loss_and_grad(fn, x, *args, grad_output=None, **kwargs):
    x = x.detach().clone().requires_grad_(True)
    value = fn(x, *args, **kwargs)
    (grad,) = torch.autograd.grad(value, x, grad_output if grad_output is not None else torch.ones_like(value))
    return value.detach(), grad


def _assert_close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, equal_nan=True)


# --------------------------------------------------------------------------------------------------------
# Parity with torch.nn.functional.cross_entropy, float64, loss and gradient
# --------------------------------------------------------------------------------------------------------
SHAPES = {"1d": (5,), "2d": (7, 5), "3d": (3, 5, 4), "4d": (2, 5, 3, 2)}


@pytest.mark.parametrize("ignore", ["no-ignored", "default-ignore", "custom-ignore"])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_parity_with_torch_cross_entropy(engine, shape, kind, weighted, ignore):
    """Every reduction × ε in {0, 0.1, 1} for this shape, target kind, weighting and ignore_index."""
    ignore_index = {"no-ignored": None, "default-ignore": -100, "custom-ignore": 2}[ignore]
    for case, (reduction, eps) in enumerate(itertools.product(["mean", "sum", "none"], [0.0, 0.1, 1.0])):
        seed = zlib.crc32(f"{shape}-{kind}-{weighted}-{ignore}-{case}".encode())
        x, y = _data(SHAPES[shape], kind, seed, ignore=ignore_index)
        k = x.shape[1 if x.dim() > 1 else 0]
        weight = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=F64) + 0.2 if weighted else None
        kwargs = dict(reduction=reduction, label_smoothing=eps)
        if ignore == "custom-ignore":
            kwargs["ignore_index"] = 2
        loss_shape = y.shape if kind == "index" else y.sum(dim=1 if y.dim() > 1 else 0).shape
        grad_output = torch.randn(loss_shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
        grad_output = grad_output if reduction == "none" else None
        actual = _loss_and_grad(lsx.torch.loss, x, y, weight, grad_output=grad_output, **kwargs)
        if kind == "probs":  # torch refuses a custom ignore_index with probabilities; it has no effect on them
            kwargs.pop("ignore_index", None)
        expected = _loss_and_grad(F.cross_entropy, x, y, weight, grad_output=grad_output, **kwargs)
        _assert_close(actual[0], expected[0])
        _assert_close(actual[1], expected[1])


@pytest.mark.parametrize("weighted", [False, True])
def test_all_ignored_mean_is_nan_with_zero_gradient(engine, weighted):
    x, _ = _data((4, 5), "index", 0)
    y = torch.full((4,), -100)
    weight = torch.linspace(0.5, 2, 5, dtype=F64) if weighted else None
    expected = _loss_and_grad(F.cross_entropy, x, y, weight, label_smoothing=0.1)
    actual = _loss_and_grad(lsx.torch.loss, x, y, weight, label_smoothing=0.1)
    assert torch.isnan(actual[0]) and torch.isnan(expected[0])
    _assert_close(actual[1], expected[1])
    assert not actual[1].any()
    zero = _loss_and_grad(lsx.torch.loss, x, y, weight, label_smoothing=0.1, empty_mean="zero")
    assert zero[0].item() == 0.0 and not zero[1].any()


# --------------------------------------------------------------------------------------------------------
# Every lsx option: gradcheck, and the float64 reference with a random upstream gradient
# --------------------------------------------------------------------------------------------------------
MASK = torch.tensor([True, True, False, True, True, False])
OPTION_SETS = {
    "others": dict(label_smoothing=0.2, spread="others"),
    "z-loss-weight": dict(label_smoothing=0.1, z_loss=0.05, weight=torch.linspace(0.3, 2.0, 6, dtype=F64)),
    "normalize": dict(label_smoothing=0.2, normalize=True, spread="others"),
    "class-mask": dict(label_smoothing=0.1, class_mask=MASK),
    "class-mask-others-weight": dict(
        label_smoothing=0.3, spread="others", class_mask=MASK, weight=torch.linspace(0.3, 2.0, 6, dtype=F64)
    ),
    "weight-ignore": dict(label_smoothing=0.1, weight=torch.linspace(0.3, 2.0, 6, dtype=F64), ignore_index=0),
    "none": dict(label_smoothing=0.1, reduction="none", z_loss=0.01),
    "sum-normalize-z": dict(label_smoothing=0.1, reduction="sum", normalize=True, z_loss=0.02),
    "t5x": dict(convention="t5x", label_smoothing=0.1),
    "fairseq": dict(convention="fairseq", label_smoothing=0.1),
}


def _option_data(name, kind, shape=(4, 6)):
    x, y = _data(shape, kind, len(name))
    options = OPTION_SETS[name]
    if "class_mask" in options:
        x = x.clone()
        if kind == "index":
            y = torch.where(MASK[y.clamp(0, 5)], y, torch.zeros_like(y))
        else:
            y = torch.softmax(torch.where(MASK.view(1, -1, *([1] * (y.dim() - 2))), y.log(), -torch.inf), dim=1)
    return x, y, options


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("name", OPTION_SETS)
def test_gradcheck_every_option(engine, name, kind):
    x, y, options = _option_data(name, kind)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: lsx.torch.loss(x, y, **options), (x,))


@pytest.mark.parametrize("shape", [(4, 6), (2, 6, 3)], ids=str)
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("name", OPTION_SETS)
def test_matches_reference_with_random_upstream_gradient(engine, name, kind, shape):
    x, y, options = _option_data(name, kind, shape)
    value = lsx.torch.loss(x, y, **options)
    cotangent = torch.randn(value.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
    value, grad = _loss_and_grad(lsx.torch.loss, x, y, grad_output=cotangent, **options)
    plain = {n: v.numpy() if isinstance(v, torch.Tensor) else v for n, v in options.items()}
    ref_loss = spec.reference_loss(x.numpy(), y.numpy(), axis=1, **plain)
    ref_grad = spec.reference_grad(x.numpy(), y.numpy(), axis=1, cotangent=cotangent.numpy(), **plain)
    np.testing.assert_allclose(value.numpy(), ref_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-12, atol=1e-12)


def test_double_backward_is_refused():
    x, y = _data((3, 5), "index", 1)
    x.requires_grad_(True)
    (grad,) = torch.autograd.grad(lsx.torch.loss(x, y), x, create_graph=False)
    assert grad.shape == x.shape
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(lsx.torch.loss(x, y), x, create_graph=True)


def test_retain_graph_and_scaled_backward_keep_the_saved_gradient():
    x, y = _data((6, 5), "index", 2, ignore=-100)
    x.requires_grad_(True)
    value = lsx.torch.loss(x, y, label_smoothing=0.1)
    (once,) = torch.autograd.grad(value, x, retain_graph=True)
    once = once.clone()
    value.backward(retain_graph=True)
    (2.5 * value).backward()
    _assert_close(x.grad, 3.5 * once)


def test_saves_one_gradient_buffer_and_hands_it_on():
    """fwd+bwd keeps a single logits-sized buffer: the one saved for backward becomes ``.grad``."""
    x = torch.randn(16, 40, requires_grad=True)
    y = torch.randint(0, 40, (16,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        value = lsx.torch.loss(x, y, label_smoothing=0.1)
    assert [tuple(t.shape) for t in saved] == [(16, 40)]
    pointer = saved[0].data_ptr()
    saved.clear()  # drop the test's reference, as autograd hands the buffer on only when unshared
    value.backward()
    assert x.grad.data_ptr() == pointer


# --------------------------------------------------------------------------------------------------------
# The eager fast path (no custom-op dispatch) and its shortcuts
# --------------------------------------------------------------------------------------------------------
EAGER_CASES = {
    "index-mean": ("index", dict(label_smoothing=0.1)),
    "index-none-z": ("index", dict(label_smoothing=0.1, reduction="none", z_loss=0.01)),
    "index-sum-weight": ("index", dict(label_smoothing=0.2, reduction="sum", weight=torch.linspace(0.3, 2, 6))),
    "index-mask-others": ("index", dict(label_smoothing=0.3, spread="others", class_mask=MASK)),
    "probs-mean-normalize": ("probs", dict(label_smoothing=0.1, normalize=True)),
}


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("case", EAGER_CASES)
def test_eager_path_equals_the_custom_op(engine, monkeypatch, case, dtype):
    """Plain eager calls skip the custom op; forcing them through it gives bit-identical loss and gradient."""
    kind, options = EAGER_CASES[case]
    x, y, _ = _option_data("class-mask" if "class_mask" in options else "others", kind, (5, 6, 3))
    x = x.to(dtype)
    options = {n: v.to(dtype) if n == "weight" else v for n, v in options.items()}
    op_calls = []
    op = _torch_function._fused

    def counting_op(*args):
        op_calls.append(1)
        return op(*args)

    monkeypatch.setattr(_torch_function, "_fused", counting_op)
    cotangent = torch.randn(lsx.torch.loss(x, y, **options).shape, dtype=dtype)
    eager = _loss_and_grad(lsx.torch.loss, x, y, grad_output=cotangent, **options)
    without_grad = lsx.torch.loss(x, y, **options)
    assert not op_calls
    monkeypatch.setattr(_torch_function, "_route", lambda *tensors: "op")
    through_op = _loss_and_grad(lsx.torch.loss, x, y, grad_output=cotangent, **options)
    assert len(op_calls) == 1
    for a, b in zip(eager + (without_grad,), through_op + (through_op[0],)):
        assert a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_eager_routes_modes_to_the_op_and_transforms_to_the_function():
    x, y = _data((4, 5), "index", 8, ignore=-100)
    route = _torch_function._route
    assert route(x, y, None, None) == "direct"
    assert route(x.requires_grad_(), y, None, None) == "function"
    with torch.no_grad():
        assert route(x, y, None, None) == "direct"
    with torch.device("cpu"):  # a torch-function mode
        assert route(x, y, None, None) == "op"
        _assert_close(lsx.torch.loss(x, y, label_smoothing=0.1), F.cross_entropy(x, y, label_smoothing=0.1))
    seen = []
    torch.func.vmap(lambda row: seen.append(route(row)) or row)(x.detach())
    assert seen == ["transform"]
    with torch.autograd.forward_ad.dual_level():
        assert route(x.detach(), y) == "function"
    assert route(torch.nn.Parameter(x.detach())) == "op"  # subclasses too


LABEL_DTYPES = [torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8]


@pytest.mark.parametrize("ignore_index", [None, -100, 2, 300, -(2**40)])
@pytest.mark.parametrize("dtype", LABEL_DTYPES, ids=str)
def test_quick_label_check_agrees_with_spec(dtype, ignore_index):
    """The shortcut accepts exactly what spec.check_labels accepts, and otherwise raises its message."""
    k = 7
    opts = spec.resolve_options(None, ignore_index=ignore_index)
    info = torch.iinfo(dtype)
    specials = [v for v in (-1, k, -100, 300, info.min, info.max, 2) if info.min <= v <= info.max]
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}-{ignore_index}".encode()))
    for trial in range(40):
        labels = torch.randint(0, k, (trial % 9 + 1,), generator=gen).to(dtype)
        if trial % 2:
            labels[torch.randint(0, labels.numel(), (1,), generator=gen)] = specials[trial % len(specials)]
        labels = labels.numpy()
        try:
            spec.check_labels(labels, k, opts)
        except ValueError as error:
            with pytest.raises(ValueError, match=f"^{re.escape(str(error))}$"):
                _torch_function._check_labels(labels, k, opts, None)
        else:
            _torch_function._check_labels(labels, k, opts, None)


def test_option_cache_keeps_passed_values_apart_from_defaults():
    """The resolved options are cached; an explicit value equal to a default still beats the convention."""
    x, y = _data((6, 5), "index", 9, ignore=-100)
    for _ in range(2):
        passed = lsx.torch.loss(x, y, convention="keras", ignore_index=-100)  # keras ignores nothing
        _assert_close(passed, F.cross_entropy(x, y))
        with pytest.raises(ValueError, match="label -100"):
            lsx.torch.loss(x, y, convention="keras")
    assert lsx.torch.loss(x, y, label_smoothing=1).isfinite()
    with pytest.raises(TypeError, match="label_smoothing"):
        lsx.torch.loss(x, y, label_smoothing=True)
    assert lsx.torch.loss(x, y, normalize=True).isfinite()
    with pytest.raises(TypeError, match="normalize"):
        lsx.torch.loss(x, y, normalize=1)
    with pytest.raises(TypeError, match="label_smoothing"):  # unhashable: resolved without the cache
        lsx.torch.loss(x, y, label_smoothing=[0.1])


# --------------------------------------------------------------------------------------------------------
# Engines, dtypes, layouts
# --------------------------------------------------------------------------------------------------------
def test_cpu_engine_choice_and_the_kernel_contract(monkeypatch):
    """The kernel gets contiguous float32/64 CPU logits only; any engine with its contract gives the same loss."""
    calls = []

    def counting_engine(*args, **kwargs):
        calls.append(args[0].dtype)
        return lsx.numpy._numpy_engine(*args)

    monkeypatch.setattr(_numba_engine, "kernel", lambda: counting_engine)
    x, y = _data((6, 7), "index", 4, ignore=-100)
    options = dict(label_smoothing=0.1, z_loss=0.01, weight=torch.linspace(0.5, 1.5, 7, dtype=F64))
    for dtype in (F64, torch.float32):
        value, grad = _loss_and_grad(lsx.torch.loss, x.to(dtype), y, **options)
        expected = _loss_and_grad(F.cross_entropy, x.to(dtype), y, options["weight"].to(dtype), label_smoothing=0.1)
        assert value.dtype == grad.dtype == dtype
        tol = 1e-12 if dtype == F64 else 1e-5
        z_term = 0.01 * (options["weight"][y.clamp(0)] * (y != -100) * torch.logsumexp(x, 1) ** 2).sum()
        z_term = z_term / (options["weight"][y.clamp(0)] * (y != -100)).sum()
        _assert_close(value.double(), expected[0].double() + z_term, tol)
    assert calls == [np.dtype(np.float64), np.dtype(np.float32)]
    _loss_and_grad(lsx.torch.loss, x.half(), y)
    _loss_and_grad(lsx.torch.loss, x.t().contiguous().t(), y)
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    k = 3000
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(8, k, generator=gen).to(dtype)
    y = torch.randint(0, k, (8,), generator=gen)
    x[torch.arange(8), y] = 12.0  # p_y ≈ q_y: the target-class gradient is a small difference
    value, grad = _loss_and_grad(lsx.torch.loss, x, y, label_smoothing=0.1, reduction="sum")
    assert value.dtype == grad.dtype == dtype
    ref_loss = spec.reference_loss(x.double().numpy(), y.numpy(), axis=1, label_smoothing=0.1, reduction="sum")
    ref_grad = spec.reference_grad(x.double().numpy(), y.numpy(), axis=1, label_smoothing=0.1, reduction="sum")
    unit = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    assert abs(value.double().item() - float(ref_loss)) <= unit * abs(float(ref_loss))
    target_grad = grad.double().numpy()[np.arange(8), y.numpy()]
    ref_target = ref_grad[np.arange(8), y.numpy()]
    np.testing.assert_array_less(np.abs(target_grad - ref_target), unit * np.abs(ref_target) + 1e-7)
    np.testing.assert_allclose(grad.double().numpy(), ref_grad, rtol=2 * unit, atol=1e-7)


def test_low_precision_probability_targets_and_none():
    x, y = _data((5, 6, 3), "probs", 6, dtype=torch.bfloat16)
    value, grad = _loss_and_grad(lsx.torch.loss, x, y, label_smoothing=0.1, reduction="none")
    assert value.dtype == grad.dtype == torch.bfloat16 and value.shape == (5, 3)
    ref = spec.reference_loss(x.double().numpy(), y.numpy(), axis=1, label_smoothing=0.1, reduction="none")
    np.testing.assert_allclose(value.double().numpy(), ref, rtol=2**-7, atol=1e-6)


def test_non_contiguous_inputs(engine):
    base = torch.randn(5, 9, dtype=F64)
    x = base.t()  # (9, 5), strided
    y = torch.randint(0, 5, (9,))
    assert not x.is_contiguous()
    _assert_close(lsx.torch.loss(x, y, label_smoothing=0.1), F.cross_entropy(x, y, label_smoothing=0.1))
    actual = _loss_and_grad(lsx.torch.loss, x, y, label_smoothing=0.1)
    expected = _loss_and_grad(F.cross_entropy, x, y, label_smoothing=0.1)
    _assert_close(actual[1], expected[1])
    x4 = torch.randn(2, 3, 4, 5, dtype=F64).permute(0, 3, 1, 2)  # (2, 5, 3, 4) channels-last-like
    y4 = torch.randint(0, 5, (2, 3, 4))
    actual = _loss_and_grad(lsx.torch.loss, x4, y4, label_smoothing=0.1, reduction="sum")
    expected = _loss_and_grad(F.cross_entropy, x4, y4, label_smoothing=0.1, reduction="sum")
    _assert_close(actual[0], expected[0])
    _assert_close(actual[1], expected[1])


def test_single_row_input_and_explicit_axis():
    x = torch.randn(5, dtype=F64)
    y = torch.tensor(3)
    _assert_close(lsx.torch.loss(x, y, label_smoothing=0.2), F.cross_entropy(x, y, label_smoothing=0.2))
    last = torch.randn(4, 3, 5, dtype=F64)
    labels = torch.randint(0, 5, (4, 3))
    _assert_close(
        lsx.torch.loss(last, labels, axis=-1, label_smoothing=0.1),
        F.cross_entropy(last.movedim(-1, 1), labels, label_smoothing=0.1),
    )


# --------------------------------------------------------------------------------------------------------
# torch.compile
# --------------------------------------------------------------------------------------------------------
def test_torch_compile_fullgraph_inductor():
    def step(x, y, weight):
        return lsx.torch.loss(x, y, weight, label_smoothing=0.1, z_loss=1e-3, spread="others")

    compiled = torch.compile(step, fullgraph=True)
    x, y = _data((6, 7), "index", 7, ignore=-100, dtype=torch.float32)
    weight = torch.linspace(0.5, 1.5, 7)
    expected = _loss_and_grad(step, x, y, weight)
    actual = _loss_and_grad(compiled, x, y, weight)
    _assert_close(actual[0], expected[0], 1e-6)
    _assert_close(actual[1], expected[1], 1e-6)


def test_torch_compile_module_with_convention_and_none():
    model = torch.nn.Sequential(torch.nn.Linear(4, 5).double())
    criterion = lsx.torch.CrossEntropyLoss(convention="fairseq", label_smoothing=0.1, reduction="none")

    def step(inputs, y):
        return criterion(model(inputs), y)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    inputs = torch.randn(6, 4, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 4, 1])  # 1 is fairseq's padding index
    eager = step(inputs, y)
    out = compiled(inputs, y)
    _assert_close(out, eager)
    assert out[1].item() == 0.0 and out[5].item() == 0.0
    cotangent = torch.rand(6, dtype=F64)
    (eager_grad,) = torch.autograd.grad(eager, model[0].weight, cotangent)
    (compiled_grad,) = torch.autograd.grad(out, model[0].weight, cotangent)
    _assert_close(compiled_grad, eager_grad)


# --------------------------------------------------------------------------------------------------------
# The nn.Module drop-in
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "args, kwargs",
    [
        ((), {}),
        ((torch.linspace(0.5, 2, 5, dtype=F64),), dict(label_smoothing=0.1)),
        ((None, None, 3), dict(reduction="sum", label_smoothing=0.3)),
        ((torch.linspace(0.5, 2, 5, dtype=F64), None, -100, None, "none", 1.0), {}),
    ],
)
def test_module_is_a_drop_in(args, kwargs):
    ours = lsx.torch.CrossEntropyLoss(*args, **kwargs)
    theirs = torch.nn.CrossEntropyLoss(*args, **kwargs)
    x, y = _data((6, 5, 2), "index", 8, ignore=-100)
    y = torch.where(y == -100, torch.full_like(y, theirs.ignore_index), y)
    cot = torch.rand(y.shape, dtype=F64) if theirs.reduction == "none" else None
    _assert_close(_loss_and_grad(ours, x, y, grad_output=cot)[1], _loss_and_grad(theirs, x, y, grad_output=cot)[1])
    _assert_close(ours(x, y), theirs(x, y))
    assert set(ours.state_dict()) == set(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())


def test_module_weight_is_a_buffer_and_repr():
    weight = torch.linspace(0.5, 2, 5)
    criterion = lsx.torch.CrossEntropyLoss(
        weight, label_smoothing=0.1, z_loss=1e-4, class_mask=torch.ones(5, dtype=torch.bool)
    )
    assert "weight" in dict(criterion.named_buffers()) and "class_mask" in dict(criterion.named_buffers())
    assert not list(criterion.parameters())
    assert criterion.double().weight.dtype == F64
    assert (
        repr(criterion) == "CrossEntropyLoss(ignore_index=-100, reduction='mean', label_smoothing=0.1, z_loss=0.0001)"
    )
    x, y = _data((4, 5), "index", 9)
    _assert_close(criterion(x, y), lsx.torch.loss(x, y, weight.double(), label_smoothing=0.1, z_loss=1e-4))
    with pytest.raises(ValueError, match="label_smoothing"):
        lsx.torch.CrossEntropyLoss(label_smoothing=1.5)


def test_deprecated_size_average_and_reduce_follow_torch():
    x, y = _data((4, 5), "index", 10)
    for size_average, reduce in [(False, None), (None, False), (True, True)]:
        with pytest.warns(UserWarning):
            expected = F.cross_entropy(x, y, None, size_average, -100, reduce)
        with pytest.warns(UserWarning):
            actual = lsx.torch.loss(x, y, None, size_average, -100, reduce)
        _assert_close(actual, expected)


# --------------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [5, 17, -3, -101])
def test_out_of_range_labels_raise_naming_the_value(engine, bad):
    x = torch.randn(3, 5)
    y = torch.tensor([0, bad, 1])
    with pytest.raises(ValueError, match=f"label {bad}\\b"):
        lsx.torch.loss(x, y)


def test_bad_options_and_shapes_raise():
    x, y = torch.randn(3, 5), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="label_smoothing"):
        lsx.torch.loss(x, y, label_smoothing=-0.1)
    with pytest.raises(ValueError, match="spread"):
        lsx.torch.loss(x, y, spread="some")
    with pytest.raises(ValueError, match="weight"):
        lsx.torch.loss(x, y, torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="weight must have shape"):
        lsx.torch.loss(x, y, torch.ones(4))
    with pytest.raises(ValueError, match="target of integer labels"):
        lsx.torch.loss(x, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="class_mask"):
        lsx.torch.loss(x, y, class_mask=torch.tensor([True, True, False, True, True]))
    with pytest.raises(TypeError, match="floating"):
        lsx.torch.loss(torch.ones(3, 5, dtype=torch.int64), y)
    with pytest.raises(ValueError, match="detach"):
        lsx.torch.loss(x, torch.rand(3, 5, requires_grad=True))
    with pytest.raises(ValueError, match="convention"):
        lsx.torch.loss(x, y, convention="sklearn")


# --------------------------------------------------------------------------------------------------------
# Conventions, against the peers' formulas written out
# --------------------------------------------------------------------------------------------------------
def _hf_label_smoother(logits, labels, epsilon=0.1, ignore_index=-100):
    """transformers' LabelSmoother: K-spread over the last dim, mean over the active positions."""
    neg_log_probs = -torch.log_softmax(logits, dim=-1)
    padding = labels == ignore_index
    labels = labels.clamp(min=0)
    nll = neg_log_probs.gather(-1, labels.unsqueeze(-1)).squeeze(-1).masked_fill(padding, 0.0)
    smoothed = neg_log_probs.sum(-1).masked_fill(padding, 0.0)
    active = (~padding).sum()
    return (1 - epsilon) * nll.sum() / active + epsilon * smoothed.sum() / (active * logits.shape[-1])


def _fairseq_label_smoothed_nll(logits, target, epsilon, ignore_index=1):
    """fairseq's label_smoothed_nll_loss (2021 on): (K−1)-spread, padding dropped, summed."""
    lprobs = torch.log_softmax(logits, dim=-1)
    nll = -lprobs.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    smooth = -lprobs.sum(-1)
    padding = target == ignore_index
    nll, smooth = nll.masked_fill(padding, 0.0), smooth.masked_fill(padding, 0.0)
    eps_i = epsilon / (logits.shape[-1] - 1)
    return ((1.0 - epsilon - eps_i) * nll + eps_i * smooth).sum()


def test_convention_hf_matches_label_smoother():
    x, y = _data((3, 4, 7), "index", 11, ignore=-100, k_axis=2)
    _assert_close(lsx.torch.loss(x, y, axis=-1, convention="hf"), _hf_label_smoother(x, y))
    # an explicit option wins over the preset
    _assert_close(lsx.torch.loss(x, y, axis=-1, convention="hf", label_smoothing=0.0), _hf_label_smoother(x, y, 0.0))


def test_convention_fairseq_matches_its_formula():
    x, y = _data((10, 6), "index", 12, ignore=1)
    actual = _loss_and_grad(lsx.torch.loss, x, y, label_smoothing=0.1, convention="fairseq")
    expected = _loss_and_grad(_fairseq_label_smoothed_nll, x, y, 0.1)
    _assert_close(actual[0], expected[0])
    _assert_close(actual[1], expected[1])


def test_empty_mean_follows_the_convention_unless_passed():
    x = torch.randn(2, 5, dtype=F64)
    y = torch.tensor([-100, -100])
    assert torch.isnan(lsx.torch.loss(x, y, convention="torch"))
    assert lsx.torch.loss(x, y, convention="hf", empty_mean="zero").item() == 0.0


# --------------------------------------------------------------------------------------------------------
# Transforms: forward-mode AD, torch.func, meta tensors
# --------------------------------------------------------------------------------------------------------
TRANSFORM_CASES = {
    "mean-ignore": ("index", dict(label_smoothing=0.1)),
    "none-weight": (
        "index",
        dict(label_smoothing=0.2, reduction="none", weight=torch.linspace(0.3, 2.0, 6, dtype=F64)),
    ),
    "sum-custom-ignore": ("index", dict(label_smoothing=1.0, reduction="sum", ignore_index=2)),
    "probs-mean": ("probs", dict(label_smoothing=0.1)),
    "probs-none": ("probs", dict(reduction="none")),
}


def _transform_case(name, shape=(5, 6)):
    kind, options = TRANSFORM_CASES[name]
    x, y = _data(shape, kind, zlib.crc32(name.encode()), ignore=options.get("ignore_index", -100))
    return x, y, options


@pytest.mark.parametrize("case", TRANSFORM_CASES)
def test_forward_mode_ad_gives_cross_entropys_tangent(engine, case):
    """torch.func.jvp and torch.autograd.forward_ad: the tangent is Σ grad·dx (it used to be 0 / None)."""
    x, y, options = _transform_case(case)
    dx = torch.randn(x.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    value, tangent = torch.func.jvp(lambda x: lsx.torch.loss(x, y, **options), (x,), (dx,))
    expected_value, expected_tangent = torch.func.jvp(lambda x: F.cross_entropy(x, y, **options), (x,), (dx,))
    _assert_close(value, expected_value)
    _assert_close(tangent, expected_tangent)
    assert tangent.abs().max() > 1e-3  # not the trivial tangent
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(x, dx)
        unpacked = torch.autograd.forward_ad.unpack_dual(lsx.torch.loss(dual, y, **options))
    _assert_close(unpacked.primal, expected_value)
    assert unpacked.tangent is not None
    _assert_close(unpacked.tangent, expected_tangent)


@pytest.mark.parametrize("case", TRANSFORM_CASES)
def test_torch_func_grad_vjp_jacrev_and_vmap(engine, case):
    x, y, options = _transform_case(case)

    def ours(x, y=y):
        return lsx.torch.loss(x, y, **options)

    def theirs(x, y=y):
        return F.cross_entropy(x, y, **options)

    if options.get("reduction") == "none":
        cotangent = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(2), dtype=F64)
        _assert_close(torch.func.jacrev(ours)(x), torch.func.jacrev(theirs)(x))
    else:
        cotangent = torch.tensor(1.7, dtype=F64)
        _assert_close(torch.func.grad(ours)(x), torch.func.grad(theirs)(x))
        grad, value = torch.func.grad_and_value(ours)(x)
        _assert_close(value, theirs(x))
        _assert_close(grad, torch.func.grad(theirs)(x))
        # per-sample gradients: vmap over a batch of problems, each with its own mean
        xs, ys = x.reshape(1, *x.shape).repeat(3, 1, 1), y.reshape(1, *y.shape).repeat(3, *([1] * y.dim()))
        xs = xs + torch.randn(xs.shape, generator=torch.Generator().manual_seed(3), dtype=F64)
        _assert_close(torch.func.vmap(torch.func.grad(ours))(xs, ys), torch.func.vmap(torch.func.grad(theirs))(xs, ys))
        _assert_close(torch.func.vmap(ours)(xs, ys), torch.func.vmap(theirs)(xs, ys))
    ours_value, ours_vjp = torch.func.vjp(ours, x)
    theirs_value, theirs_vjp = torch.func.vjp(theirs, x)
    _assert_close(ours_value, theirs_value)
    _assert_close(ours_vjp(cotangent)[0], theirs_vjp(cotangent)[0])


def test_second_derivatives_are_refused_under_torch_func():
    x, y = _data((3, 5), "index", 4)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.func.hessian(lambda x: lsx.torch.loss(x, y))(x)
    with pytest.raises(RuntimeError, match="first-order"):
        torch.func.grad(lambda x: torch.func.grad(lambda x: lsx.torch.loss(x, y))(x).sum())(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_meta_tensors_forward_and_backward(kind, reduction, dtype):
    """Shapes and dtypes on the meta device, as F.cross_entropy gives them (the backward read a scalar)."""
    x = torch.empty(4, 6, 3, device="meta", dtype=dtype, requires_grad=True)
    if kind == "index":
        y = torch.empty(4, 3, device="meta", dtype=torch.int64)
    else:
        y = torch.empty(4, 6, 3, device="meta", dtype=dtype)
    options = dict(label_smoothing=0.1, reduction=reduction, weight=torch.ones(6, device="meta", dtype=dtype))
    value = lsx.torch.loss(x, y, **options)
    expected = F.cross_entropy(x, y, **options)
    assert value.device.type == "meta" and value.shape == expected.shape and value.dtype == expected.dtype
    value.backward(torch.ones_like(value))
    assert x.grad.device.type == "meta" and x.grad.shape == x.shape and x.grad.dtype == dtype
    (grad,) = torch.autograd.grad(lsx.torch.loss(x, y, **options), x, torch.ones_like(value) * 2)
    assert grad.shape == x.shape and grad.dtype == dtype
    # the plain-torch engine reads no value on the host (as on accelerators): class_mask and z-loss too
    mask = torch.ones(6, device="meta", dtype=torch.bool)
    masked = lsx.torch.loss(x, y, **options, class_mask=mask, z_loss=1e-3, normalize=True, spread="others")
    assert masked.shape == expected.shape and masked.dtype == dtype
    (grad,) = torch.autograd.grad(masked, x, torch.ones_like(masked))
    assert grad.shape == x.shape and grad.dtype == dtype


# --------------------------------------------------------------------------------------------------------
# torch.compile with options that change between calls
# --------------------------------------------------------------------------------------------------------
def test_compile_follows_changing_option_values():
    """A label_smoothing schedule, a changed ignore_index or z_loss, and a module whose attribute changes:
    every call gives the value of its own options (it used to raise under dynamo's automatic dynamic)."""
    torch._dynamo.reset()
    x, y = _data((6, 5), "index", 13)
    y[1], y[2] = 3, 4

    def step(x, y, eps, ignore, z):
        return lsx.torch.loss(x, y, label_smoothing=eps, ignore_index=ignore, z_loss=z)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for eps, ignore, z in [(0.0, -100, 0.0), (0.1, -100, 0.0), (0.2, 3, 0.0), (0.3, 4, 0.0), (0.1, -100, 0.0)]:
        actual = _loss_and_grad(compiled, x, y, eps, ignore, z)
        expected = _loss_and_grad(F.cross_entropy, x, y, label_smoothing=eps, ignore_index=ignore)
        _assert_close(actual[0], expected[0])
        _assert_close(actual[1], expected[1])
    for z in (0.01, 0.02):
        _assert_close(compiled(x, y, 0.1, -100, z), lsx.torch.loss(x, y, label_smoothing=0.1, z_loss=z))
    with pytest.raises(ValueError, match="label_smoothing"):
        compiled(x, y, 1.5, -100, 0.0)

    criterion = lsx.torch.CrossEntropyLoss(label_smoothing=0.1, convention="hf")
    compiled_module = torch.compile(criterion, fullgraph=True, backend="aot_eager")
    for eps in (0.1, 0.2, 0.05):
        criterion.label_smoothing = eps
        _assert_close(compiled_module(x, y), F.cross_entropy(x, y, label_smoothing=eps))
    criterion.ignore_index = 3
    _assert_close(compiled_module(x, y), F.cross_entropy(x, y, label_smoothing=0.05, ignore_index=3))

    def preset(x, y, eps):  # the convention's ε unless passed; the others from the convention
        return lsx.torch.loss(x, y, convention="fairseq") + lsx.torch.loss(x, y, convention="hf", label_smoothing=eps)

    compiled_preset = torch.compile(preset, fullgraph=True, backend="aot_eager")
    for eps in (0.0, 0.3, 0.4):
        _assert_close(compiled_preset(x, y, eps), preset(x, y, eps))


@pytest.mark.parametrize(
    "option, values",
    [
        ("label_smoothing", [0.0, 0.02, 0.05, 0.1, 0.15, 0.2]),
        ("z_loss", [0.0, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3]),
        ("softcap", [10.0, 15.0, 20.0, 30.0, 40.0, 50.0]),
    ],
)
def test_compile_schedule_of_six_values_makes_at_most_two_graphs(option, values):
    """The numeric options reach the op as values: a schedule recompiles at most once (dynamo's automatic
    dynamic: one graph with the first value as a constant, then one for every later value), and every call
    gives the eager loss and gradient bit for bit."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    x, y = _data((16, 10), "index", 21, dtype=torch.float32)
    counter = CompileCounter()

    def step(x, y, value):
        return lsx.torch.loss(x, y, **{option: value})

    compiled = torch.compile(step, backend=counter, fullgraph=True)
    for value in values:
        actual = _loss_and_grad(compiled, x, y, value)
        expected = _loss_and_grad(step, x, y, value)
        assert torch.equal(actual[0], expected[0]), (option, value)
        assert torch.equal(actual[1], expected[1]), (option, value)
    assert counter.frame_count <= 2, (option, counter.frame_count)
    torch._dynamo.reset()


def test_import_does_not_load_dynamo_and_the_constant_mark_is_dynamos():
    """``import lsx.torch`` leaves torch._dynamo unloaded (it marks its trace-time constant itself, as
    ``torch.compiler.assume_constant_result`` does)."""
    import subprocess
    import sys

    code = "import sys, lsx.torch; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
    marked = torch.compiler.assume_constant_result(lambda: None)
    names = [name for name in dir(marked) if name.startswith("_dynamo")]
    assert names
    for name in names:
        assert getattr(_torch_function._resolve_constant, name) == getattr(marked, name)


def test_compile_inductor_label_smoothing_schedule():
    torch._dynamo.reset()
    x, y = _data((6, 7), "index", 14, ignore=-100, dtype=torch.float32)
    compiled = torch.compile(lambda x, y, eps: lsx.torch.loss(x, y, label_smoothing=eps), fullgraph=True)
    for eps in (0.1, 0.2, 0.3):
        actual = _loss_and_grad(compiled, x, y, eps)
        expected = _loss_and_grad(F.cross_entropy, x, y, label_smoothing=eps)
        _assert_close(actual[0], expected[0], 1e-6)
        _assert_close(actual[1], expected[1], 1e-6)


# --------------------------------------------------------------------------------------------------------
# Integer labels of every dtype, for any K
# --------------------------------------------------------------------------------------------------------
ALL_LABEL_DTYPES = [torch.int8, torch.uint8, torch.int16, torch.uint16, torch.int32, torch.uint32, torch.int64]
ALL_LABEL_DTYPES.append(torch.uint64)
LABEL_CASES = [  # (dtype, K, labels at the dtype's edges, ignore_index)
    (torch.int8, 200, [127, 0, 199 - 100], -100),
    (torch.uint8, 200, [199, 156, 0], -100),  # 156 is −100 wrapped to uint8
    (torch.uint8, 300, [255, 156, 254], -100),
    (torch.uint8, 300, [255, 156, 254], 255),
    (torch.int16, 70000, [32767, 0, 5], -1),
    (torch.uint16, 70000, [65535, 65436, 69999 - 65536], -100),
    (torch.int32, 300, [299, 0, 7], 7),
    (torch.uint32, 300, [299, 7, 0], 7),
    (torch.int64, 300, [299, 0, 1], 2**40),
    (torch.uint64, 300, [299, 7, 0], 7),
]


def _label_case(dtype, k, edges, ignore_index):
    gen = torch.Generator().manual_seed(k + len(str(dtype)))
    high = min(k, torch.iinfo(dtype).max + 1) if dtype != torch.uint64 else k
    labels = torch.randint(0, high, (6,), generator=gen)
    labels[: len(edges)] = torch.tensor(edges)
    if torch.iinfo(dtype).min <= ignore_index <= torch.iinfo(dtype).max and dtype != torch.uint64:
        labels[4] = ignore_index
    x = 2 * torch.randn(6, k, generator=gen, dtype=F64)
    return x, labels.to(dtype), dict(label_smoothing=0.1, ignore_index=ignore_index)


@pytest.mark.parametrize("mode", ["eager", "compiled"])
@pytest.mark.parametrize("dtype, k, edges, ignore_index", LABEL_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_every_integer_label_dtype_for_any_k(engine, mode, dtype, k, edges, ignore_index):
    """Labels keep their values whatever their dtype and K (nothing wraps), on both engines and compiled."""
    x, labels, options = _label_case(dtype, k, edges, ignore_index)
    fn = lsx.torch.loss
    if mode == "compiled":
        torch._dynamo.reset()  # each case compiles afresh (no recompile limit across the cases)
        fn = torch.compile(lsx.torch.loss, fullgraph=True, backend="aot_eager", dynamic=False)
    value, grad = _loss_and_grad(fn, x, labels, **options)
    ref_labels = labels.numpy().astype(np.int64)
    ref_loss = spec.reference_loss(x.numpy(), ref_labels, axis=1, **options)
    ref_grad = spec.reference_grad(x.numpy(), ref_labels, axis=1, **options)
    np.testing.assert_allclose(value.numpy(), ref_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "dtype, k, bad",
    [(torch.int8, 100, -1), (torch.int8, 100, -128), (torch.int8, 200, -128), (torch.int8, 200, -56),
     (torch.int16, 40000, -1), (torch.uint8, 200, 255), (torch.uint8, 200, 200),
     (torch.int16, 300, -100 - 1), (torch.uint16, 300, 65535), (torch.uint32, 300, 2**32 - 100),
     (torch.uint64, 300, 2**64 - 100), (torch.uint64, 300, 2**63)],
    ids=str,
)  # fmt: skip
def test_out_of_range_labels_of_every_dtype_raise(engine, dtype, k, bad):
    """An out-of-range label is an error naming the caller's value, never wrapped onto ignore_index."""
    x = torch.randn(3, k, dtype=F64)
    labels = torch.tensor([0, 1, 2], dtype=torch.int64).to(dtype)
    labels[1] = torch.tensor(bad, dtype=torch.uint64).to(dtype) if bad >= 2**63 else bad
    with pytest.raises(ValueError, match=f"label {bad}\\b"):
        lsx.torch.loss(x, labels)


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.uint64])
def test_unchecked_out_of_range_labels_give_nan_on_the_torch_engine(dtype):
    """Where labels are not checked (accelerators), a bad label is NaN for its element only, in any dtype."""
    k = 200
    x = torch.randn(4, k, dtype=F64)
    raw = {torch.int8: [-1, 5, -100, 7], torch.uint8: [255, 5, 200, 7], torch.int16: [-1, 5, 200, 7]}
    labels = torch.tensor(raw.get(dtype, [0, 5, 0, 7])).to(dtype)
    if dtype == torch.uint64:
        labels = torch.tensor([2**64 - 100, 5, 2**63, 7], dtype=torch.uint64)
    opts = spec.resolve_options(None, label_smoothing=0.1)
    grad = torch.empty_like(x)
    per_element, _ = _ops_engine.run(x, labels, "index", opts, None, None, grad)
    bad = torch.tensor([True, False, dtype != torch.int8, False])
    assert torch.isnan(per_element[bad]).all() and torch.isnan(grad[bad]).all()
    assert torch.isfinite(per_element[~bad]).all() and torch.isfinite(grad[~bad]).all()
    expected = F.cross_entropy(x[~bad], labels[~bad].to(torch.int64), label_smoothing=0.1, reduction="none")
    _assert_close(per_element[~bad], expected)


def test_quick_label_check_for_wide_k():
    """The shortcut's unsigned view never wraps against K beyond the dtype (K = 200, 300 for int8/uint8)."""
    for dtype, k in [(np.int8, 200), (np.int8, 300), (np.int16, 70000), (np.int32, 300)]:
        info = np.iinfo(dtype)
        for ignore_index in (None, -100, -1, 255):
            opts = spec.resolve_options(None, ignore_index=ignore_index)
            for value in (info.min, -100, -1, 0, info.max):
                labels = np.array([0, value, 1], dtype)
                try:
                    spec.check_labels(labels, k, opts)
                except ValueError as error:
                    with pytest.raises(ValueError, match=f"^{re.escape(str(error))}$"):
                        _torch_function._check_labels(labels, k, opts, None)
                else:
                    _torch_function._check_labels(labels, k, opts, None)


# --------------------------------------------------------------------------------------------------------
# Probability targets outside the simplex, huge and infinite logits
# --------------------------------------------------------------------------------------------------------
def _bad_probs(which):
    x, t = _data((4, 5), "probs", 15)
    t = t.clone()
    if which == "nan":
        t[1, 2] = torch.nan
    else:  # rows still summing to 1, with negative entries
        t[::2, 0] -= 0.5
        t[::2, 1] += 0.5
    return x, t


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("which", ["nan", "negative"])
def test_probability_targets_with_nan_or_negative_entries(engine, which, normalize):
    """A class counts wherever w·q ≠ 0, linearly: NaN spreads to its element, negative mass counts (torch's
    rule); in the KL form q·log q of a negative q is NaN."""
    x, t = _bad_probs(which)
    weight = torch.linspace(0.5, 1.5, 5, dtype=F64)
    options = dict(label_smoothing=0.1, reduction="none", z_loss=0.01, normalize=normalize, weight=weight)
    value, grad = _loss_and_grad(lsx.torch.loss, x, t, **options)
    plain = dict(options, weight=weight.numpy())
    ref_loss = spec.reference_loss(x.numpy(), t.numpy(), axis=1, **plain)
    ref_grad = spec.reference_grad(x.numpy(), t.numpy(), axis=1, **plain)
    np.testing.assert_allclose(value.numpy(), ref_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad.numpy(), ref_grad, rtol=1e-12, atol=1e-12)
    assert np.isnan(ref_loss).any() == (which == "nan" or normalize)
    if not normalize:  # torch's own cross-entropy agrees where it has the option
        expected = _loss_and_grad(F.cross_entropy, x, t, weight, reduction="none", label_smoothing=0.1)
        z = 0.01 * torch.logsumexp(x, 1) ** 2
        _assert_close(value, expected[0] + z)
    if which == "negative" and not normalize:  # the gradient is the loss's derivative
        x.requires_grad_(True)
        options["reduction"] = "sum"
        assert torch.autograd.gradcheck(lambda x: lsx.torch.loss(x, t, **options), (x,))


@pytest.mark.parametrize("kind", ["index", "probs"])
def test_huge_float64_logits_with_zero_z_loss_are_finite(engine, kind):
    x, y = _data((5, 6), kind, 16)
    x = x * 1e155  # L² overflows float64
    value, grad = _loss_and_grad(lsx.torch.loss, x, y, label_smoothing=0.1)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    ref_loss = spec.reference_loss(x.numpy(), y.numpy(), axis=1, label_smoothing=0.1)
    np.testing.assert_allclose(value.numpy(), ref_loss, rtol=1e-12)
    np.testing.assert_allclose(grad.numpy(), spec.reference_grad(x.numpy(), y.numpy(), axis=1, label_smoothing=0.1))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_positive_infinite_logit_gives_nan(engine, dtype, eps):
    x, y = _data((3, 5), "index", 17)
    x = x.to(dtype)
    x[0, (int(y[0]) + 1) % 5] = torch.inf
    value, grad = _loss_and_grad(lsx.torch.loss, x, y, label_smoothing=eps, reduction="none")
    expected = _loss_and_grad(F.cross_entropy, x, y, label_smoothing=eps, reduction="none")
    assert torch.isnan(value[0]) and torch.isnan(grad[0]).all()
    assert torch.isfinite(value[1:]).all() and torch.isfinite(grad[1:]).all()
    tol = 1e-12 if dtype == F64 else 1e-2
    torch.testing.assert_close(value, expected[0], rtol=tol, atol=tol, equal_nan=True)
    torch.testing.assert_close(grad, expected[1], rtol=tol, atol=tol, equal_nan=True)


# --------------------------------------------------------------------------------------------------------
# softcap, sample_weight and denominator
# --------------------------------------------------------------------------------------------------------
def _spec2_data(shape=(6, 5), kind="index", seed=21, ignore=-100):
    x, y = _data(shape, kind, seed, ignore=ignore)
    lead = shape[:1] + shape[2:]
    sw = torch.rand(lead, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) * 2
    return x, y, sw


def test_softcap_sample_weight_and_denominator_follow_their_formulas(engine):
    """Each option against a hand-written formula over F.cross_entropy, loss and gradients (w.r.t. the
    logits, sample_weight and denominator)."""
    x, y, sw = _spec2_data()
    y[1] = -100
    w = torch.linspace(0.5, 2.0, 5, dtype=F64)

    # softcap: F.cross_entropy of c·tanh(x/c); autograd's chain rule
    actual = _loss_and_grad(lsx.torch.loss, x, y, w, label_smoothing=0.1, softcap=1.5)
    expected = _loss_and_grad(lambda x, *a, **k: F.cross_entropy(1.5 * torch.tanh(x / 1.5), *a, **k), x, y, w,
                              label_smoothing=0.1)  # fmt: skip
    _assert_close(actual[0], expected[0])
    _assert_close(actual[1], expected[1])

    # sample_weight: Σ sw·ℓ / Σ sw·w_y over the non-ignored elements; ∂/∂sw_j = (ℓ_j − mean·w_{y_j}) / D
    per_element = F.cross_entropy(x, y, w, reduction="none", label_smoothing=0.1)
    active = y != -100
    w_y = torch.where(active, w[y.clamp(min=0)], 0.0)
    d = (sw * w_y).sum()
    mean = (sw * per_element).sum() / d
    sw_leaf = sw.clone().requires_grad_(True)
    x_leaf = x.clone().requires_grad_(True)
    value = lsx.torch.loss(x_leaf, y, w, label_smoothing=0.1, sample_weight=sw_leaf)
    gx, gsw = torch.autograd.grad(value, (x_leaf, sw_leaf))
    _assert_close(value, mean)
    _assert_close(gsw, (per_element - mean * w_y) / d)
    _assert_close(gx, torch.func.grad(lambda x: (sw * F.cross_entropy(x, y, w, reduction="none",
                                                                      label_smoothing=0.1)).sum() / d)(x))  # fmt: skip
    # sum and none: ∂/∂sw_j = ℓ_j (times the upstream gradient)
    for reduction, upstream in (("sum", torch.tensor(1.7, dtype=F64)), ("none", torch.rand(6, dtype=F64))):
        value = lsx.torch.loss(x, y, w, label_smoothing=0.1, sample_weight=sw_leaf, reduction=reduction)
        expected = sw * per_element if reduction == "none" else (sw * per_element).sum()
        _assert_close(value, expected)
        (gsw,) = torch.autograd.grad(value, sw_leaf, upstream)
        _assert_close(gsw, per_element * upstream)

    # denominator: Σ sw·ℓ / d; ∂/∂sw_j = ℓ_j / d; ∂/∂d = −mean/d; a tensor denominator and a number agree
    den = torch.tensor(4.25, dtype=F64, requires_grad=True)
    value = lsx.torch.loss(x, y, w, label_smoothing=0.1, sample_weight=sw_leaf, denominator=den)
    _assert_close(value, (sw * per_element).sum() / 4.25)
    _assert_close(lsx.torch.loss(x, y, w, label_smoothing=0.1, sample_weight=sw, denominator=4.25), value.detach())
    gsw, gden = torch.autograd.grad(value, (sw_leaf, den))
    _assert_close(gsw, per_element / 4.25)
    _assert_close(gden, -value.detach() / 4.25)


SPEC2_SETS = {
    "softcap": dict(softcap=2.0, label_smoothing=0.1),
    "softcap-mask": dict(softcap=1.0, label_smoothing=0.2, class_mask=[True, True, False, True, True]),
    "sw-weight-ignore": dict(sample_weight=True, weight=[0.5, 1.0, 2.0, 0.0, 1.5], ignore_index=1),
    "sw-others-z": dict(sample_weight=True, label_smoothing=0.2, spread="others", z_loss=0.01),
    "sw-normalize": dict(sample_weight=True, label_smoothing=0.1, normalize=True, spread="others"),
    "all-three": dict(softcap=3.0, sample_weight=True, denominator=7.5, label_smoothing=0.1, z_loss=1e-3),
    "all-masked": dict(
        softcap=1.5, sample_weight=True, class_mask=[True, False, True, True, True], label_smoothing=0.1
    ),
    "den-zero": dict(denominator=0.0, empty_mean="zero", label_smoothing=0.1),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("name", SPEC2_SETS)
def test_spec2_options_composed_match_the_reference(engine, name, kind, reduction):
    options = dict(SPEC2_SETS[name], reduction=reduction)
    if "denominator" in options and reduction != "mean":
        options.pop("denominator")
    x, y, sw = _spec2_data((4, 5, 2), kind, zlib.crc32(name.encode()), ignore=options.get("ignore_index", -100))
    if "class_mask" in options:
        mask = np.array(options["class_mask"])
        if kind == "index":
            y = torch.where(torch.as_tensor(mask)[y.clamp(min=0)] | (y == -100), y, 0)
        else:
            y = y * torch.as_tensor(mask, dtype=F64)[None, :, None]
    ref_options = {**options, "sample_weight": sw.numpy()} if options.get("sample_weight") else dict(options)
    ours = {name: torch.tensor(value) if isinstance(value, list) else value for name, value in options.items()}
    if options.get("sample_weight"):
        ours["sample_weight"] = sw
    upstream = torch.rand(4, 2, dtype=F64) + 0.5 if reduction == "none" else torch.tensor(1.3, dtype=F64)
    value, grad = _loss_and_grad(lsx.torch.loss, x, y, grad_output=upstream, **ours)
    x_np, y_np = x.numpy(), y.numpy()
    _assert_close(value, torch.as_tensor(spec.reference_loss(x_np, y_np, axis=1, **ref_options)))
    expected = spec.reference_grad(x_np, y_np, axis=1, cotangent=upstream.numpy(), **ref_options)
    _assert_close(grad, torch.as_tensor(expected))
    if options.get("sample_weight"):  # the sample weights' gradient against finite differences
        f = lambda s: lsx.torch.loss(x, y, **{**ours, "sample_weight": s})
        assert torch.autograd.gradcheck(f, (sw.clone().requires_grad_(True),))
    # the logits' gradient against finite differences
    assert torch.autograd.gradcheck(lambda x: lsx.torch.loss(x, y, **ours), (x.clone().requires_grad_(True),))


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
def test_softcap_with_huge_and_negative_infinite_logits_and_a_class_mask(engine, dtype):
    x, y, _ = _spec2_data((4, 6))
    x[0, 2], x[1, 3], x[2, 0], x[3, 5] = 1e30, -math.inf, -1e30, math.inf
    x[:, 4] = 1e30  # a masked padding lane: no mass leaks after capping
    mask = torch.tensor([True, True, True, True, False, True])
    y = torch.tensor([2, 3, 1, 5])
    options = dict(softcap=5.0, label_smoothing=0.1, class_mask=mask, reduction="none")
    value, grad = _loss_and_grad(lsx.torch.loss, x.to(dtype), y, **options)
    ref_options = {**options, "class_mask": mask.numpy()}
    tol = 1e-12 if dtype == F64 else 2e-2
    _assert_close(value.to(F64), torch.as_tensor(spec.reference_loss(x.numpy(), y.numpy(), axis=1, **ref_options)), tol)
    expected = spec.reference_grad(x.numpy(), y.numpy(), axis=1, **ref_options)
    _assert_close(grad.to(F64), torch.as_tensor(expected), tol)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert (grad[:, 4] == 0).all()


def test_gradient_accumulation_with_a_global_denominator_equals_one_big_batch(engine):
    x, y, sw = _spec2_data((12, 7), "index", 31)
    y[::4] = -100
    w = torch.linspace(0.5, 1.5, 7, dtype=F64)
    options = dict(label_smoothing=0.1, softcap=4.0, z_loss=1e-3)
    big = x.clone().requires_grad_(True)
    lsx.torch.loss(big, y, w, sample_weight=sw, **options).backward()
    count = (sw * torch.where(y != -100, w[y.clamp(min=0)], 0.0)).sum()
    accumulated = x.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 5), slice(5, 9), slice(9, 12)):
        part = lsx.torch.loss(accumulated[rows], y[rows], w, sample_weight=sw[rows], denominator=count, **options)
        part.backward()
        total = total + part.detach()
    _assert_close(accumulated.grad, big.grad, 1e-15)
    _assert_close(total, lsx.torch.loss(x, y, w, sample_weight=sw, **options), 1e-14)


def test_bad_spec2_values_raise_naming_the_option():
    x, y, sw = _spec2_data()
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="softcap"):
            lsx.torch.loss(x, y, softcap=bad)
    with pytest.raises(ValueError, match="softcap"):
        lsx.torch.CrossEntropyLoss(softcap=-2.0)
    for bad in (-0.5, math.nan, math.inf):
        weights = sw.clone()
        weights[3] = bad
        with pytest.raises(ValueError, match=r"sample_weight\[\(3,\)\]"):
            lsx.torch.loss(x, y, sample_weight=weights)
    with pytest.raises(ValueError, match="sample_weight must have the per-element loss's shape"):
        lsx.torch.loss(x, y, sample_weight=sw[:4])
    with pytest.raises(TypeError, match="sample_weight"):
        lsx.torch.loss(x, y, sample_weight=sw > 0.5)
    for bad in (-1.0, math.nan, torch.tensor(-2.0)):
        with pytest.raises(ValueError, match="denominator"):
            lsx.torch.loss(x, y, denominator=bad)
    with pytest.raises(ValueError, match="denominator"):
        lsx.torch.loss(x, y, denominator=torch.ones(2))
    with pytest.raises(ValueError, match='denominator is only for reduction="mean"'):
        lsx.torch.loss(x, y, reduction="sum", denominator=3.0)
    # a traced negative sample weight is trusted (no host read under compile); the CPU op still checks it
    compiled = torch.compile(lambda x, y, s: lsx.torch.loss(x, y, sample_weight=s), fullgraph=True, backend="aot_eager")
    weights = sw.clone()
    weights[0] = -1.0
    with pytest.raises(ValueError, match="sample_weight"):
        compiled(x, y, weights)


def test_zero_denominator_follows_empty_mean_with_zero_gradients(engine):
    x, y, sw = _spec2_data()
    sw_leaf = sw.clone().requires_grad_(True)
    for empty_mean, expected in (("nan", math.nan), ("zero", 0.0)):
        den = torch.tensor(0.0, dtype=F64, requires_grad=True)
        x_leaf = x.clone().requires_grad_(True)
        value = lsx.torch.loss(x_leaf, y, sample_weight=sw_leaf, denominator=den, empty_mean=empty_mean)
        assert value.item() == expected or (math.isnan(expected) and math.isnan(value.item()))
        gx, gsw, gden = torch.autograd.grad(value, (x_leaf, sw_leaf, den))
        assert (gx == 0).all() and (gsw == 0).all() and gden.item() == 0


def test_spec2_under_compile_func_transforms_forward_ad_and_meta(engine):
    """softcap changing between calls, sample_weight and denominator tensors (with their
    gradients) under torch.compile; torch.func.grad/jvp/vmap and forward-mode AD w.r.t. sample_weight;
    meta tensors (nothing read on the host)."""
    torch._dynamo.reset()
    x, y, sw = _spec2_data((6, 5), "index", 41)
    y[2] = -100
    den = torch.tensor(3.5, dtype=F64)

    def step(x, y, s, d, c):
        return lsx.torch.loss(x, y, label_smoothing=0.1, softcap=c, sample_weight=s, denominator=d)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for c in (1.0, 2.0, 3.0):
        args = [t.clone().requires_grad_(True) for t in (x, sw, den)]
        value = compiled(args[0], y, args[1], args[2], c)
        grads = torch.autograd.grad(value, args)
        plain = [t.clone().requires_grad_(True) for t in (x, sw, den)]
        expected = step(plain[0], y, plain[1], plain[2], c)
        _assert_close(value, expected)
        for a, b in zip(grads, torch.autograd.grad(expected, plain)):
            _assert_close(a, b)

    def f(s):
        return lsx.torch.loss(x, y, label_smoothing=0.1, softcap=2.0, sample_weight=s)

    eager = sw.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(f(eager), eager)
    _assert_close(torch.func.grad(f)(sw), expected)
    ds = torch.rand(sw.shape, dtype=F64)
    _, tangent = torch.func.jvp(f, (sw,), (ds,))
    _assert_close(tangent, (expected * ds).sum())
    with torch.autograd.forward_ad.dual_level():
        dual = torch.autograd.forward_ad.make_dual(sw, ds)
        _assert_close(torch.autograd.forward_ad.unpack_dual(f(dual)).tangent, (expected * ds).sum())
    batch = torch.stack([sw, sw * 2, sw + 1])
    _assert_close(torch.func.vmap(torch.func.grad(f))(batch), torch.stack([torch.func.grad(f)(s) for s in batch]))
    with pytest.raises(RuntimeError, match="first-order"):
        torch.func.grad(lambda s: torch.func.grad(f)(s).sum())(sw)

    meta_x = torch.empty(4, 6, device="meta", requires_grad=True)
    meta_sw = torch.empty(4, device="meta", requires_grad=True)
    meta_den = torch.empty((), device="meta")
    value = lsx.torch.loss(meta_x, torch.empty(4, device="meta", dtype=torch.int64), softcap=3.0,
                           sample_weight=meta_sw, denominator=meta_den)  # fmt: skip
    gx, gsw = torch.autograd.grad(value, (meta_x, meta_sw))
    assert value.shape == () and gx.shape == (4, 6) and gsw.shape == (4,) and gx.device.type == "meta"


def test_module_takes_softcap_and_per_batch_sample_weight_and_denominator():
    x, y, sw = _spec2_data()
    criterion = lsx.torch.CrossEntropyLoss(label_smoothing=0.1, softcap=2.0)
    assert "softcap=2.0" in repr(criterion)
    expected = lsx.torch.loss(x, y, label_smoothing=0.1, softcap=2.0, sample_weight=sw, denominator=5.0)
    _assert_close(criterion(x, y, sample_weight=sw, denominator=5.0), expected)
    _assert_close(criterion(x, y), lsx.torch.loss(x, y, label_smoothing=0.1, softcap=2.0))
    with pytest.raises(TypeError):
        criterion(x, y, sw)  # keyword-only


def test_compile_with_a_python_number_denominator():
    """A plain-number denominator is a trace-time constant, checked without NumPy (which dynamo cannot trace)."""
    torch._dynamo.reset()
    x, y, sw = _spec2_data()
    compiled = torch.compile(
        lambda x, y, s: lsx.torch.loss(x, y, label_smoothing=0.1, sample_weight=s, denominator=7.5),
        fullgraph=True,
        backend="aot_eager",
    )
    actual = _loss_and_grad(compiled, x, y, sw)
    expected = _loss_and_grad(lsx.torch.loss, x, y, label_smoothing=0.1, sample_weight=sw, denominator=7.5)
    _assert_close(actual[0], expected[0])
    _assert_close(actual[1], expected[1])
    bad = torch.compile(lambda x, y: lsx.torch.loss(x, y, denominator=-1.0), fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="denominator"):
        bad(x, y)


# --------------------------------------------------------------------------------------------------------
# Reliability, round 3 (the public adapter's share): softcap outside the compute dtype's range and
# non-real denominators are errors naming them, eagerly and under torch.compile
# --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, cap", [(torch.float32, 1e-39), (torch.float32, 1e39), (torch.bfloat16, 1e39),
                                        (torch.float16, 1e39), (torch.float64, 1e-320), (torch.float64, 1e308)])
@pytest.mark.parametrize("compiled", [False, True])
def test_softcap_outside_the_dtypes_range_raises(dtype, cap, compiled):
    x = torch.tensor([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0]], dtype=dtype)
    y = torch.tensor([2, 1])
    if compiled:
        torch._dynamo.reset()
    call = torch.compile(lambda x: lsx.torch.loss(x, y, softcap=cap)) if compiled else (
        lambda x: lsx.torch.loss(x, y, softcap=cap)
    )
    with pytest.raises(ValueError, match="softcap"):
        call(x)
    if not compiled:
        with pytest.raises(ValueError, match="softcap"):
            lsx.torch.CrossEntropyLoss(softcap=cap)(x, y)


@pytest.mark.parametrize("bad", ["4", 4 + 0j, torch.tensor(4 + 0j), torch.tensor(True), np.complex64(4)])
def test_a_denominator_that_is_not_a_real_number_raises_naming_it(bad):
    x = torch.tensor([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0]])
    y = torch.tensor([2, 1])
    with pytest.raises(ValueError, match="denominator"):
        lsx.torch.loss(x, y, denominator=bad)
    with pytest.raises(ValueError, match="denominator"):
        lsx.torch.CrossEntropyLoss()(x, y, denominator=bad)


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_that_overflow_the_compute_dtype_raise(engine, strided, reduction, monkeypatch):
    """sample_weight or class weight whose weighted sums overflow float32: a ValueError naming the argument on
    every engine and layout, the module form and compiled calls included; float64 logits hold them."""
    monkeypatch.setenv("LSX_TORCH_ENGINE", engine)
    x = torch.randn(5, 8, 3)[:, :, 0] if strided else torch.randn(5, 8)
    assert x.is_contiguous() is not strided
    y = torch.tensor([2, 1, 0, 7, 3])
    huge = torch.full((5,), 3e38)
    with pytest.raises(ValueError, match="sample_weight"):
        lsx.torch.loss(x, y, sample_weight=huge, reduction=reduction)
    with pytest.raises(ValueError, match="sample_weight"):
        lsx.torch.loss(x.requires_grad_(True), y, sample_weight=huge, reduction=reduction)
    with pytest.raises(ValueError, match="weight"):
        lsx.torch.CrossEntropyLoss(weight=torch.full((8,), 1e38), reduction=reduction)(x, y)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="sample_weight"):
        torch.compile(lambda x, s: lsx.torch.loss(x, y, sample_weight=s, reduction=reduction), backend="aot_eager")(
            x, huge
        )
    assert torch.isfinite(lsx.torch.loss(x.double(), y, sample_weight=huge.double(), reduction=reduction)).all()
