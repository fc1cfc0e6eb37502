"""lsx.torch.linear_loss / LinearCrossEntropyLoss against the loss of the materialised logits, the float64
reference, torch's own F.linear_cross_entropy, torch.compile, low-precision inputs and bad inputs."""

from __future__ import annotations

import functools
import inspect

import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import lsx.torch  # noqa: E402
from lsx import spec  # noqa: E402
from lsx.torch import _engines, _linear  # noqa: E402
from lsx.torch._engines import numba as _numba_engine  # noqa: E402

F64 = torch.float64
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")

V = 11
H = 6


def _problem(lead, kind, seed, *, v=V, h=H, dtype=F64, ignore=None, bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, h, generator=gen, dtype=F64).to(dtype)
    w = (0.7 * torch.randn(v, h, generator=gen, dtype=F64)).to(dtype)
    b = torch.randn(v, generator=gen, dtype=F64).to(dtype) if bias else None
    if kind == "index":
        y = torch.randint(0, v, lead, generator=gen)
        if ignore is not None:
            y = torch.where(torch.rand(lead, generator=gen) < 0.3, torch.tensor(ignore), y)
    else:
        y = torch.softmax(torch.randn(*lead, v, generator=gen, dtype=F64), dim=-1).to(dtype)
    return hidden, w, b, y


def _run(fn, hidden, w, b, y, upstream=None, **kwargs):
    """(loss, (∂/∂hidden, ∂/∂W, ∂/∂b)) of Σ upstream·loss."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (hidden, w)]
    if b is not None:
        leaves.append(b.detach().clone().requires_grad_(True))
    value = fn(*leaves[:2], y, linear_bias=leaves[2] if b is not None else None, **kwargs)
    if upstream is None:
        upstream = torch.ones_like(value)
    grads = torch.autograd.grad(value, leaves, upstream)
    return value.detach(), grads


def _materialised(hidden, w, y, *, linear_bias=None, **kwargs):
    logits = F.linear(hidden, w, linear_bias)
    return lsx.torch.loss(logits, y, axis=-1, **kwargs)


def _reference(hidden, w, b, y, upstream, **options):
    """float64 loss and gradients from spec.reference_loss/reference_grad of the logits, by the chain rule."""
    h = hidden.double().numpy()
    wn = w.double().numpy()
    logits = h @ wn.T + (0.0 if b is None else b.double().numpy())
    y = y.numpy() if not y.is_floating_point() else y.double().numpy()
    loss = spec.reference_loss(logits, y, **options)
    g = spec.reference_grad(logits, y, cotangent=upstream.double().numpy(), **options)
    g2 = g.reshape(-1, g.shape[-1])
    grads = [g @ wn, g2.T @ h.reshape(-1, h.shape[-1])]
    if b is not None:
        grads.append(g2.sum(axis=0))
    return torch.from_numpy(np.asarray(loss)), [torch.from_numpy(np.asarray(x)) for x in grads]


def _close(actual, expected, tol=1e-12):
    torch.testing.assert_close(actual.to(F64), expected.to(F64), rtol=tol, atol=tol, equal_nan=True)


def _loss_takes(*names):
    parameters = inspect.signature(lsx.torch.loss).parameters
    return all(name in parameters for name in names)


_MASK = torch.tensor([True] * 8 + [False] * 3)
_WEIGHT = torch.linspace(0.2, 2.0, V, dtype=F64)
OPTIONS = {
    "plain": ("index", {}),
    "smoothing": ("index", dict(label_smoothing=0.1)),
    "others": ("index", dict(label_smoothing=0.2, spread="others")),
    "weight": ("index", dict(label_smoothing=0.1, weight=_WEIGHT)),
    "ignore": ("index", dict(label_smoothing=0.1, ignore_index=-100)),
    "z_loss": ("index", dict(z_loss=1e-2, label_smoothing=0.1, spread="others")),
    "kl": ("index", dict(normalize=True, label_smoothing=0.3, spread="others", z_loss=1e-3)),
    "class_mask": ("index", dict(label_smoothing=0.1, class_mask=_MASK)),
    "probs": ("probs", dict(label_smoothing=0.1)),
    "probs-weight-mask-kl": ("probs", dict(label_smoothing=0.1, weight=_WEIGHT, normalize=True, class_mask=_MASK)),
    "softcap": ("index", dict(softcap=1.5, label_smoothing=0.1)),
    "softcap-mask": ("index", dict(softcap=2.0, label_smoothing=0.1, class_mask=_MASK, weight=_WEIGHT)),
    "sample_weight": ("index", dict(sample_weight=True, label_smoothing=0.1, weight=_WEIGHT, ignore_index=-100)),
    "probs-sample_weight": ("probs", dict(sample_weight=True, z_loss=1e-2)),
    "denominator": ("index", dict(denominator=7.5, label_smoothing=0.1)),
    "t5x": ("index", dict(convention="t5x", label_smoothing=0.1)),
}


@pytest.mark.parametrize(
    ("name", "reduction"),
    [
        (name, r)
        for name in OPTIONS
        for r in ("mean", "sum", "none")
        if r == "mean" or "denominator" not in OPTIONS[name][1]
    ],
)
@pytest.mark.parametrize(("lead", "chunk_size"), [((13,), None), ((13,), 4), ((13,), 1), ((2, 5), 3), ((), None)])
def test_equals_loss_of_logits(name, reduction, lead, chunk_size):
    """Loss and all three gradients equal the materialised loss's and the float64 reference's (1e-12),
    with a random upstream gradient (reduction="none" included), for chunk sizes that do not divide N."""
    kind, options = OPTIONS[name]
    options = dict(options)
    if "convention" in options:
        options["reduction"] = reduction
    ignore = options.get("ignore_index")
    hidden, w, b, y = _problem(lead, kind, seed=hash((name, lead)) % 1000, ignore=ignore)
    if "class_mask" in options:  # no target on the removed classes
        y = y % 8 if kind == "index" else torch.where(_MASK, y, 0.0)
    if options.get("sample_weight") is True:
        options["sample_weight"] = torch.rand(lead, generator=torch.Generator().manual_seed(3), dtype=F64) * 2
    extra = {} if "convention" in options else {"reduction": reduction}
    gen = torch.Generator().manual_seed(5)
    upstream = torch.randn(lead if reduction == "none" else (), generator=gen, dtype=F64)
    value, grads = _run(lsx.torch.linear_loss, hidden, w, b, y, upstream, chunk_size=chunk_size, **options, **extra)
    ref_options = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    convention = ref_options.pop("convention", None)
    ref_value, ref_grads = _reference(hidden, w, b, y, upstream, convention=convention, **ref_options, **extra)
    _close(value, ref_value)
    for grad, ref in zip(grads, ref_grads):
        _close(grad, ref)
    lsx_only = {"softcap", "sample_weight", "denominator"} & set(options)
    if not lsx_only or _loss_takes(*lsx_only):
        value2, grads2 = _run(_materialised, hidden, w, b, y, upstream, **options, **extra)
        _close(value, value2)
        for grad, other in zip(grads, grads2):
            _close(grad, other)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_sample_weight_gradient(reduction):
    """∂/∂sample_weight: ℓ_j (sum), upstream_j·ℓ_j (none), (ℓ_j − mean·w_{y_j})/D (mean, ignored rows w = 0)."""
    hidden, w, b, y = _problem((9,), "index", seed=11, ignore=-100)
    sw = torch.rand(9, dtype=F64, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    kw = dict(weight=_WEIGHT, label_smoothing=0.1, reduction=reduction)
    value = lsx.torch.linear_loss(hidden, w, y, linear_bias=b, sample_weight=sw, chunk_size=4, **kw)
    upstream = torch.linspace(-1.0, 2.0, 9, dtype=F64) if reduction == "none" else torch.tensor(1.5, dtype=F64)
    (grad,) = torch.autograd.grad(value, sw, upstream)
    logits = (hidden @ w.T + b).numpy()
    per_element = torch.from_numpy(
        spec.reference_loss(logits, y.numpy(), weight=_WEIGHT.numpy(), label_smoothing=0.1, reduction="none")
    )
    if reduction == "none":
        expected = upstream * per_element
    elif reduction == "sum":
        expected = upstream * per_element
    else:
        active = y != -100
        w_y = torch.where(active, _WEIGHT[y.clamp(min=0)], 0.0)
        d = (sw.detach() * w_y).sum()
        mean = (sw.detach() * per_element).sum() / d
        expected = upstream * (per_element - mean * w_y) / d
    _close(grad, expected)


def test_gradient_accumulation_with_denominator():
    """k micro-batches with denominator = the global count give the gradient of one big batch."""
    hidden, w, b, y = _problem((12,), "index", seed=4, ignore=-100)
    kw = dict(label_smoothing=0.1, spread="others", chunk_size=2)
    _, whole = _run(lsx.torch.linear_loss, hidden, w, b, y, **kw)
    count = float((y != -100).sum())
    parts = [
        _run(lsx.torch.linear_loss, hidden[i : i + 4], w, b, y[i : i + 4], denominator=count, **kw)[1]
        for i in (0, 4, 8)
    ]
    _close(torch.cat([p[0] for p in parts]), whole[0])
    for index in (1, 2):
        _close(sum(p[index] for p in parts), whole[index])


def test_zero_denominator_follows_empty_mean():
    hidden, w, b, y = _problem((5,), "index", seed=2)
    for empty_mean, expected in (("nan", float("nan")), ("zero", 0.0)):
        for d in (0.0, torch.tensor(0.0, dtype=F64)):
            value, grads = _run(lsx.torch.linear_loss, hidden, w, b, y, denominator=d, empty_mean=empty_mean)
            _close(value, torch.tensor(expected, dtype=F64))
            for grad in grads:
                assert torch.equal(grad, torch.zeros_like(grad))
    all_ignored = torch.full((5,), -100)
    value, grads = _run(lsx.torch.linear_loss, hidden, w, b, all_ignored)
    assert torch.isnan(value) and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_tensor_denominator_is_differentiable():
    hidden, w, b, y = _problem((5,), "index", seed=2)
    d = torch.tensor(4.0, dtype=F64, requires_grad=True)
    value = lsx.torch.linear_loss(hidden, w, y, linear_bias=b, denominator=d)
    (grad,) = torch.autograd.grad(value, d)
    _close(grad, -value.detach() / 4.0)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", ["plain", "smoothing", "weight-ignore", "probs"])
def test_equals_torch_linear_cross_entropy(dtype, reduction, case):
    """Equal to torch's own F.linear_cross_entropy: its chunked path where it takes the case, else its
    reference path (label smoothing, probabilities)."""
    kind = "probs" if case == "probs" else "index"
    hidden, w, b, y = _problem((37,), kind, seed=9, dtype=dtype, ignore=-100 if case == "weight-ignore" else None)
    kw = dict(reduction=reduction)
    if case == "smoothing":
        kw["label_smoothing"] = 0.15
    if case == "weight-ignore":
        kw["weight"] = _WEIGHT.to(dtype)
    upstream = torch.rand(37 if reduction == "none" else (), dtype=dtype, generator=torch.Generator().manual_seed(0))
    ours = _run(lsx.torch.linear_loss, hidden, w, b, y, upstream, chunk_size=8, **kw)
    chunked = kind == "index" and case != "smoothing"
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=8) if chunked else None
    theirs = _run(F.linear_cross_entropy, hidden, w, b, y, upstream, options=options, **kw)
    tol = 1e-12 if dtype == F64 else 2e-5
    assert ours[0].dtype == dtype
    _close(ours[0], theirs[0], tol)
    for a, c in zip(ours[1], theirs[1]):
        assert a.dtype == dtype
        _close(a, c, tol)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_low_precision_accumulates_in_float32(dtype, reduction):
    """float16/bfloat16 inputs: computed in float32 (the weight gradient accumulated in float32 over 512 rows),
    results in the input's dtype, equal to the float64 result of the same rounded inputs to the dtype's ulp."""
    hidden, w, b, y = _problem((512,), "index", seed=7, dtype=dtype, v=40, h=16)
    kw = dict(label_smoothing=0.1, reduction=reduction, chunk_size=50)
    upstream = torch.ones(512 if reduction == "none" else (), dtype=dtype)
    value, grads = _run(lsx.torch.linear_loss, hidden, w, b, y, upstream, **kw)
    ref_value, ref_grads = _run(
        lsx.torch.linear_loss, hidden.double(), w.double(), b.double(), y, upstream.double(), **kw
    )
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert value.dtype == dtype and all(g.dtype == dtype for g in grads)
    _close(value, ref_value, tol)
    for grad, ref in zip(grads, ref_grads):
        torch.testing.assert_close(grad.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_torch_compile(reduction):
    """Under torch.compile (aot_eager, fullgraph): the same loss and gradients as eager, with sample_weight
    and softcap."""
    hidden, w, b, y = _problem((10,), "index", seed=3, ignore=-100)
    sw = torch.rand(10, dtype=F64, generator=torch.Generator().manual_seed(2))
    kw = dict(label_smoothing=0.1, spread="others", softcap=3.0, sample_weight=sw, reduction=reduction, chunk_size=3)

    def fn(hidden, w, y, linear_bias):
        return lsx.torch.linear_loss(hidden, w, y, linear_bias=linear_bias, **kw)

    upstream = torch.linspace(0.5, 1.5, 10, dtype=F64) if reduction == "none" else torch.tensor(2.0, dtype=F64)
    torch._dynamo.reset()
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    value, grads = _run(compiled, hidden, w, b, y, upstream)
    eager_value, eager_grads = _run(fn, hidden, w, b, y, upstream)
    _close(value, eager_value)
    for grad, eager in zip(grads, eager_grads):
        _close(grad, eager)


def test_retain_graph_and_repeated_backward():
    """The saved gradients are scaled in place only when the graph is released: a retained graph gives the
    same gradients twice, and an upstream of 2 gives twice the gradients."""
    hidden, w, b, y = _problem((7,), "index", seed=8)
    w = w.clone().requires_grad_(True)
    value = lsx.torch.linear_loss(hidden, w, y, linear_bias=b, chunk_size=3)
    (first,) = torch.autograd.grad(value, w, retain_graph=True)
    (second,) = torch.autograd.grad(value, w, torch.tensor(2.0, dtype=F64))
    _close(second, 2 * first)


def test_no_grad_and_frozen_weight():
    hidden, w, b, y = _problem((7,), "index", seed=8)
    with torch.no_grad():
        value = lsx.torch.linear_loss(hidden, w, y, linear_bias=b)
    _close(value, _materialised(hidden, w, y, linear_bias=b))
    # only the input needs a gradient (frozen, tied embedding)
    hidden = hidden.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(lsx.torch.linear_loss(hidden, w, y, linear_bias=b, chunk_size=2), hidden)
    (expected,) = torch.autograd.grad(_materialised(hidden, w, y, linear_bias=b), hidden)
    _close(grad, expected)


@pytest.mark.parametrize(
    ("dtype", "v"), [(torch.uint8, 200), (torch.int8, 200), (torch.uint8, 300), (torch.int16, 300)]
)
def test_label_dtypes(dtype, v):
    hidden, w, b, y = _problem((9,), "index", seed=1, v=v, h=4)
    y = y % min(v, 127 if dtype == torch.int8 else 255)
    value = lsx.torch.linear_loss(hidden, w, y.to(dtype), linear_bias=b, label_smoothing=0.1, chunk_size=4)
    _close(value, _materialised(hidden, w, y, linear_bias=b, label_smoothing=0.1))


def test_signature_matches_torch():
    ours = list(inspect.signature(lsx.torch.linear_loss).parameters.values())
    theirs = list(inspect.signature(F.linear_cross_entropy).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [(p.name, p.kind, p.default) for p in theirs]
    assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(theirs) :])
    module_ours = list(inspect.signature(lsx.torch.LinearCrossEntropyLoss).parameters.values())
    module_theirs = list(inspect.signature(torch.nn.LinearCrossEntropyLoss).parameters.values())
    assert [(p.name, p.kind, p.default) for p in module_ours[: len(module_theirs)]] == [
        (p.name, p.kind, p.default) for p in module_theirs
    ]


def test_ignore_index_none_means_minus_100_or_the_convention():
    hidden, w, _, y = _problem((8,), "index", seed=6, ignore=-100)
    _close(lsx.torch.linear_loss(hidden, w, y), F.cross_entropy(hidden @ w.T, y))
    with pytest.raises(ValueError, match="label -100"):
        lsx.torch.linear_loss(hidden, w, y, convention="keras")


def test_module_state_dict_both_ways():
    torch.manual_seed(0)
    weight = torch.rand(V)
    theirs = torch.nn.LinearCrossEntropyLoss(H, V, bias=True, weight=weight)
    ours = lsx.torch.LinearCrossEntropyLoss(H, V, bias=True, weight=torch.zeros(V), chunk_size=3)
    ours.load_state_dict(theirs.state_dict())
    hidden, _, _, y = _problem((9,), "index", seed=0, dtype=torch.float32)
    _close(ours(hidden, y), theirs(hidden, y), 1e-6)
    back = torch.nn.LinearCrossEntropyLoss(H, V, bias=True, weight=torch.zeros(V))
    back.load_state_dict(ours.state_dict())
    _close(back(hidden, y), theirs(hidden, y), 0)
    assert set(ours.state_dict()) == {"linear.weight", "linear.bias", "weight"}
    smoothed = lsx.torch.LinearCrossEntropyLoss(H, V, label_smoothing=0.1, spread="others", dtype=F64)
    assert "spread='others'" in repr(smoothed)
    hidden64 = hidden.double()
    expected = lsx.torch.loss(smoothed.linear(hidden64), y, label_smoothing=0.1, spread="others")
    _close(smoothed(hidden64, y), expected)


def test_module_forward_options_and_unbatched_input():
    criterion = lsx.torch.LinearCrossEntropyLoss(H, V, bias=True, dtype=F64, reduction="sum")
    hidden, _, _, y = _problem((4,), "index", seed=0)
    sw = torch.tensor([1.0, 0.0, 2.0, 0.5], dtype=F64)
    expected = (lsx.torch.loss(criterion.linear(hidden), y, reduction="none") * sw).sum()
    _close(criterion(hidden, y, sample_weight=sw), expected)
    single = criterion(hidden[0], y[0])
    assert single.shape == ()
    _close(single, lsx.torch.loss(criterion.linear(hidden[:1]), y[:1], reduction="sum"))
    with pytest.raises(ValueError, match="out_features"):
        lsx.torch.LinearCrossEntropyLoss(H, V, out_features=(2,))


def test_default_chunk_rows():
    """About 2**22 logits per chunk, evened out; an explicit chunk_size wins."""
    assert _engines.rows_per_chunk(4096, 32768, None) == 128
    assert _engines.rows_per_chunk(100, 32768, None) == 100
    assert _engines.rows_per_chunk(200, 32768, None) == 100  # two even chunks of 100, not 128 + 72
    assert _engines.rows_per_chunk(10, 1 << 23, None) == 1
    assert _engines.rows_per_chunk(4096, 32768, 7) == 7
    assert _engines.rows_per_chunk(5, 32768, 70) == 5
    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    assert _engines.rows_per_chunk(8192, 131072, None, cuda) == 1024
    assert _engines.rows_per_chunk(8192, 256000, None, cuda) == 512  # 524 rows a chunk, evened out over 16
    assert _engines.rows_per_chunk(8192, 256000, None, torch.device("cpu")) == 16
    assert _engines.rows_per_chunk(8192, 256000, 64, cuda) == 64


def test_chunking_via_torch_options():
    hidden, w, _, y = _problem((9,), "index", seed=0)
    options = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    _close(lsx.torch.linear_loss(hidden, w, y, options=options), _materialised(hidden, w, y))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(chunk_size=0), "chunk_size must be a positive int or None, got chunk_size=0"),
        (dict(chunk_size=-3), "chunk_size=-3"),
        (dict(chunk_size=2.5), "chunk_size=2.5"),
        (dict(chunk_size=True), "chunk_size=True"),
        (dict(linear_bias=torch.zeros(V + 1, dtype=F64)), r"linear_bias must have shape \(11,\)"),
        (dict(weight=torch.ones(V + 1, dtype=F64)), r"weight must have shape \(11,\)"),
        (dict(sample_weight=torch.ones(5, dtype=F64)), "sample_weight must have the per-element loss's shape"),
        (dict(sample_weight=-torch.ones(6, dtype=F64)), r"sample_weight must be finite and >= 0"),
        (dict(denominator=-1.0), "denominator must be finite and >= 0"),
        (dict(denominator=torch.tensor(-2.0)), "denominator must be finite and >= 0"),
        (dict(denominator=3.0, reduction="sum"), 'denominator is only for reduction="mean"'),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(softcap=0.0), "softcap"),
    ],
)
def test_bad_inputs(kwargs, match):
    hidden, w, _, y = _problem((6,), "index", seed=0)
    with pytest.raises(ValueError, match=match):
        lsx.torch.linear_loss(hidden, w, y, **kwargs)


def test_bad_shapes_and_labels():
    hidden, w, _, y = _problem((6,), "index", seed=0)
    with pytest.raises(ValueError, match=r"input's last dim \(5\) must equal linear_weight's H"):
        lsx.torch.linear_loss(hidden[:, :5], w, y)
    with pytest.raises(ValueError, match=r"linear_weight must be a \(V, H\) tensor"):
        lsx.torch.linear_loss(hidden, w[0], y)
    with pytest.raises(ValueError, match=r"linear_weight must be a \(V, H\) tensor"):
        lsx.torch.linear_loss(hidden, w[None], y)
    with pytest.raises(ValueError, match="target of integer labels must have shape"):
        lsx.torch.linear_loss(hidden, w, y[:5])
    with pytest.raises(ValueError, match=r"label 11, which is outside \[0, 11\)"):
        lsx.torch.linear_loss(hidden, w, torch.tensor([0, 1, 11, 2, 3, 4]), chunk_size=2)
    with pytest.raises(TypeError, match="linear_weight must have the input's dtype"):
        lsx.torch.linear_loss(hidden, w.float(), y)


def test_meta_tensors():
    """Meta tensors (shape propagation) go through the plain-torch engine: no host read, the loss's shape."""
    _, w, _, y = _problem((4,), "index", seed=0)
    fake = torch.empty(4, H, device="meta", dtype=F64)
    for reduction, shape in (("none", (4,)), ("mean", ())):
        out = lsx.torch.linear_loss(fake, w.to("meta"), y.to("meta"), reduction=reduction)
        assert out.shape == shape and out.device.type == "meta"


@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_plain_torch_engine(name, reduction, monkeypatch):
    """Without the Numba kernel (as on accelerators): soft-capping, sample weights and the upstream gradient
    are applied around the plain-torch engine; the same loss and gradients as the float64 reference."""
    monkeypatch.setenv("LSX_TORCH_ENGINE", "torch")
    kind, options = OPTIONS[name]
    options = {key: value for key, value in options.items() if key not in ("convention", "denominator")}
    hidden, w, b, y = _problem((13,), kind, seed=21, ignore=options.get("ignore_index"))
    if "class_mask" in options:
        y = y % 8 if kind == "index" else torch.where(_MASK, y, 0.0)
    if options.get("sample_weight") is True:
        options["sample_weight"] = torch.linspace(0.0, 2.0, 13, dtype=F64)
    upstream = torch.linspace(-1.0, 1.0, 13, dtype=F64) if reduction == "none" else torch.tensor(0.7, dtype=F64)
    value, grads = _run(lsx.torch.linear_loss, hidden, w, b, y, upstream, chunk_size=5, reduction=reduction, **options)
    ref_options = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in options.items()}
    ref_value, ref_grads = _reference(hidden, w, b, y, upstream, reduction=reduction, **ref_options)
    _close(value, ref_value)
    for grad, ref in zip(grads, ref_grads):
        _close(grad, ref)


def test_weight_gradient_is_handed_over_without_a_copy():
    """With the graph released, the weight gradient computed in the forward pass becomes .grad itself."""
    hidden, w, _, y = _problem((16,), "index", seed=0, dtype=torch.float32, v=300, h=8)
    w.requires_grad_(True)
    buffers = {}
    original = _linear._forward_sum

    def spy(*args):
        result = original(*args)
        buffers["w"] = result[3].data_ptr()
        return result

    _linear._forward_sum = spy
    try:
        lsx.torch.linear_loss(hidden, w, y, reduction="sum", chunk_size=4).backward()
    finally:
        _linear._forward_sum = original
    assert w.grad.data_ptr() == buffers["w"]


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_chunks_share_one_logits_buffer(engine, reduction, monkeypatch):
    """Every chunk's logits live in one buffer allocated once per call (with the Numba kernel their gradient
    too, in place), forward and backward alike: no logits-sized allocation per chunk, so that the peak
    resident memory stays at the gradients plus one chunk."""
    hidden, w, b, y = _problem((13,), "index", seed=2)
    hidden.requires_grad_(True)
    w.requires_grad_(True)
    seen: list[int] = []
    if engine == "torch":
        monkeypatch.setenv("LSX_TORCH_ENGINE", "torch")
        original_impl = _linear._torch_function._fused_impl

        def spy_impl(x2, *args, **kwargs):
            seen.append(x2.data_ptr())
            return original_impl(x2, *args, **kwargs)

        monkeypatch.setattr(_linear._torch_function, "_fused_impl", spy_impl)
    else:
        kernel = _numba_engine.kernel()

        @functools.wraps(kernel)
        def spy_kernel(x, *args, **kwargs):
            seen.append(x.ctypes.data)
            return kernel(x, *args, **kwargs)

        monkeypatch.setattr(_numba_engine, "kernel", lambda: spy_kernel)
    value = lsx.torch.linear_loss(hidden, w, y, linear_bias=b, reduction=reduction, chunk_size=3)
    assert len(seen) == 5 and len(set(seen)) == 1, seen
    seen.clear()
    value.sum().backward()
    if reduction == "none":  # the backward recomputes the chunks, in one buffer of its own
        assert len(seen) == 5 and len(set(seen)) == 1, seen
    _close(value, lsx.torch.loss(hidden.detach() @ w.detach().T + b, y, reduction=reduction))


def test_label_check_never_reads_a_device_class_mask():
    """A CPU target with a class mask elsewhere (meta here, CUDA in use): the labels are still checked on the
    CPU, the mask is never read on the host."""
    opts = _linear._engine_options(0.0, "all", -100, 0.0, False)
    mask = torch.ones(V, dtype=torch.bool, device="meta")
    _linear._check_labels(torch.tensor([1, 2, -100]), V, opts, mask)  # no host read of the mask
    with pytest.raises(ValueError, match="label"):
        _linear._check_labels(torch.tensor([1, V]), V, opts, mask)
    probs = torch.full((2, V), 1.0 / V, dtype=F64)
    _linear._check_labels(probs, V, opts, mask)
    with pytest.raises(ValueError, match="class_mask"):  # a CPU mask is still read
        _linear._check_labels(probs, V, opts, torch.arange(V) > 0)


def _loss_of_logits(hidden, w, b, y, **kwargs):
    return lsx.torch.loss(F.linear(hidden, w, b), y, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("wrt", ["input", "weight", "bias"])
def test_second_derivatives_are_refused(reduction, wrt):
    """create_graph=True (a gradient penalty, hvp) with respect to every argument: the first-order-only error,
    never a silently dropped second-order term; without create_graph the gradient still works."""
    hidden, w, b, y = _problem((5,), "index", 31)
    args = {"input": hidden, "weight": w, "bias": b}
    for tensor in args.values():
        tensor.requires_grad_(True)
    value = lsx.torch.linear_loss(hidden, w, y, linear_bias=b, reduction=reduction, label_smoothing=0.1, chunk_size=2)
    with pytest.raises(RuntimeError, match="first-order"):
        (grad,) = torch.autograd.grad(value.sum(), args[wrt], create_graph=True)
        grad.pow(2).sum().backward()
    module = lsx.torch.LinearCrossEntropyLoss(H, V, bias=True, reduction=reduction, dtype=F64)
    out = module(hidden, y).sum()
    target = {"input": hidden, "weight": module.linear.weight, "bias": module.linear.bias}[wrt]
    with pytest.raises(RuntimeError, match="first-order"):
        torch.autograd.grad(out, target, create_graph=True)
    if reduction != "none":
        with pytest.raises(RuntimeError, match="first-order"):
            torch.autograd.functional.hvp(
                lambda t: lsx.torch.linear_loss(t, w.detach(), y, reduction=reduction), hidden.detach(),
                torch.ones_like(hidden),
            )
    # first order: unchanged
    (grad,) = torch.autograd.grad(value.sum(), args[wrt])
    (expected,) = torch.autograd.grad(_loss_of_logits(hidden, w, b, y, reduction=reduction, label_smoothing=0.1).sum(),
                                      args[wrt])
    torch.testing.assert_close(grad, expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_forward_mode_gives_the_directional_derivative(reduction, kind):
    """torch.func.jvp and torch.autograd.forward_ad: the tangent of the materialised loss, in every argument
    (input, linear_weight, linear_bias, sample_weight)."""
    hidden, w, b, y = _problem((7,), kind, 32)
    gen = torch.Generator().manual_seed(5)
    sw = torch.rand(7, generator=gen, dtype=F64) + 0.5
    primals = (hidden, w, b, sw)
    tangents = tuple(torch.randn(t.shape, generator=gen, dtype=F64) for t in primals)
    kwargs = dict(reduction=reduction, label_smoothing=0.2, z_loss=0.01, softcap=4.0)

    def fused(h, ww, bb, s):
        return lsx.torch.linear_loss(h, ww, y, linear_bias=bb, sample_weight=s, chunk_size=3, **kwargs)

    def plain(h, ww, bb, s):
        return _loss_of_logits(h, ww, bb, y, sample_weight=s, **kwargs)

    value, tangent = torch.func.jvp(fused, primals, tangents)
    expected_value, expected = torch.func.jvp(plain, primals, tangents)
    torch.testing.assert_close(value, expected_value)
    torch.testing.assert_close(tangent, expected)
    assert expected.abs().sum() > 0
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        duals = [fwad.make_dual(p, t) for p, t in zip(primals, tangents)]
        got = fwad.unpack_dual(fused(*duals)).tangent
    torch.testing.assert_close(got, expected)
    # one argument at a time (the others without a tangent)
    for index in range(4):
        only = tuple(t if i == index else torch.zeros_like(t) for i, t in enumerate(tangents))
        torch.testing.assert_close(torch.func.jvp(fused, primals, only)[1], torch.func.jvp(plain, primals, only)[1])


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_torch_func_transforms(reduction):
    """torch.func.grad / vjp / functional_call work as they do for lsx.torch.loss; a nested grad (a second
    derivative) raises the first-order-only error."""
    hidden, w, b, y = _problem((6,), "index", 33)

    def fused(h, ww, bb):
        return lsx.torch.linear_loss(h, ww, y, linear_bias=bb, reduction=reduction, chunk_size=4).sum()

    def plain(h, ww, bb):
        return _loss_of_logits(h, ww, bb, y, reduction=reduction).sum()

    got = torch.func.grad(fused, argnums=(0, 1, 2))(hidden, w, b)
    expected = torch.func.grad(plain, argnums=(0, 1, 2))(hidden, w, b)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
    _, pullback = torch.func.vjp(lambda h: lsx.torch.linear_loss(h, w, y, reduction=reduction), hidden)
    _, plain_pullback = torch.func.vjp(lambda h: _loss_of_logits(h, w, None, y, reduction=reduction), hidden)
    cotangent = torch.ones(6, dtype=F64) if reduction == "none" else torch.tensor(1.0, dtype=F64)
    torch.testing.assert_close(pullback(cotangent)[0], plain_pullback(cotangent)[0])
    module = lsx.torch.LinearCrossEntropyLoss(H, V, bias=True, reduction=reduction, dtype=F64)
    params = {"linear.weight": w, "linear.bias": b}

    def by_params(p):
        return torch.func.functional_call(module, p, (hidden, y)).sum()

    grads = torch.func.grad(by_params)(params)
    torch.testing.assert_close(grads["linear.weight"], expected[1])
    torch.testing.assert_close(grads["linear.bias"], expected[2])
    with pytest.raises(RuntimeError, match="first-order"):
        torch.func.grad(lambda h: torch.func.grad(fused)(h, w, b).sum())(hidden)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_compiled_negative_sample_weight_or_denominator_raises(reduction):
    """Under torch.compile the sample weights (and a tensor denominator) are checked when the graph runs, as
    lsx.torch.loss does, never a finite loss from a negative weight."""
    hidden, w, _, y = _problem((6,), "index", 34)
    bad = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0, 1.0], dtype=F64)
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda h, s: lsx.torch.linear_loss(h, w, y, sample_weight=s, reduction=reduction), backend="aot_eager"
    )
    with pytest.raises(ValueError, match="sample_weight"):
        compiled(hidden, bad)
    with pytest.raises(ValueError, match="sample_weight"):  # the same as the loss of the logits
        torch.compile(lambda x, s: lsx.torch.loss(x, y, sample_weight=s, reduction=reduction), backend="aot_eager")(
            F.linear(hidden, w), bad
        )
    good = bad.abs()
    torch.testing.assert_close(compiled(hidden, good), lsx.torch.linear_loss(hidden, w, y, sample_weight=good,
                                                                              reduction=reduction))
    if reduction == "mean":
        with pytest.raises(ValueError, match="denominator"):
            torch.compile(lambda h, d: lsx.torch.linear_loss(h, w, y, denominator=d), backend="aot_eager")(
                hidden, torch.tensor(-2.0, dtype=F64)
            )


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_fullgraph_tensor_denominator(backend):
    """A tensor denominator under torch.compile(fullgraph=True): the eager loss and gradients."""
    hidden, w, b, y = _problem((6,), "index", 35)
    den = torch.tensor(4.5, dtype=F64)

    def fn(h, ww, bb, d):
        return lsx.torch.linear_loss(h, ww, y, linear_bias=bb, denominator=d, label_smoothing=0.1)

    torch._dynamo.reset()
    compiled = torch.compile(fn, backend=backend, fullgraph=True)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, w, b)]
    value = compiled(*leaves, den)
    value.backward()
    eager_leaves = [t.clone().requires_grad_(True) for t in (hidden, w, b)]
    expected = fn(*eager_leaves, den)
    expected.backward()
    torch.testing.assert_close(value, expected)
    for got, want in zip(leaves, eager_leaves):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("dtype, cap", [(torch.float32, 1e-39), (torch.float32, 1e39), (torch.bfloat16, 1e39),
                                        (torch.float64, 1e-320)])
def test_softcap_outside_the_dtypes_range_raises(dtype, cap):
    hidden, w, _, y = _problem((4,), "index", 36, dtype=dtype)
    with pytest.raises(ValueError, match="softcap"):
        lsx.torch.linear_loss(hidden, w, y, softcap=cap)
    module = lsx.torch.LinearCrossEntropyLoss(H, V, softcap=cap, dtype=dtype)
    with pytest.raises(ValueError, match="softcap"):
        module(hidden, y)
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="softcap"):
        torch.compile(lambda h: lsx.torch.linear_loss(h, w, y, softcap=cap), backend="aot_eager")(hidden)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_weights_that_overflow_the_compute_dtype_raise(reduction):
    hidden, w, _, y = _problem((5,), "index", 37, dtype=torch.float32)
    huge = torch.full((5,), 3e38)
    with pytest.raises(ValueError, match="sample_weight"):
        lsx.torch.linear_loss(hidden, w, y, sample_weight=huge, reduction=reduction)
    with pytest.raises(ValueError, match="sample_weight"):
        lsx.torch.LinearCrossEntropyLoss(H, V, reduction=reduction)(hidden, y, sample_weight=huge)
    with pytest.raises(ValueError, match="weight"):
        lsx.torch.linear_loss(hidden, w, y, weight=torch.full((V,), 1e38), reduction=reduction)
    # float64 holds them: the loss is finite
    h64, w64 = hidden.double(), w.double()
    assert torch.isfinite(lsx.torch.linear_loss(h64, w64, y, sample_weight=huge.double(), reduction=reduction)).all()


@pytest.mark.parametrize("bad", ["4", 4 + 0j, torch.tensor(4 + 0j), torch.tensor(True), np.complex64(4)])
def test_a_denominator_that_is_not_a_real_number_raises_naming_it(bad):
    hidden, w, _, y = _problem((4,), "index", 38)
    with pytest.raises(ValueError, match="denominator"):
        lsx.torch.linear_loss(hidden, w, y, denominator=bad)
    with pytest.raises(ValueError, match="denominator"):
        lsx.torch.LinearCrossEntropyLoss(H, V, dtype=F64)(hidden, y, denominator=bad)


@pytest.mark.parametrize("engine", ["numba", "torch"])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_no_mass_on_the_target_with_gradients(engine, softcap, monkeypatch):
    """ε = 1 with spread="others" (q_y = 0): the Numba kernel writes the gradient over the chunk's logits in
    place, and the loss must not read them afterwards: the same loss with and without autograd."""
    monkeypatch.setenv("LSX_TORCH_ENGINE", engine)
    hidden, w, b, y = _problem((9,), "index", 39)
    options = dict(label_smoothing=1.0, spread="others", z_loss=0.01, normalize=True, softcap=softcap, reduction="sum")
    plain = lsx.torch.linear_loss(hidden, w, y, linear_bias=b, chunk_size=4, **options)
    leaf = hidden.clone().requires_grad_(True)
    value = lsx.torch.linear_loss(leaf, w, y, linear_bias=b, chunk_size=4, **options)
    expected = _loss_of_logits(hidden, w, b, y, **options)
    torch.testing.assert_close(plain, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(value.detach(), expected, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(value, leaf)
    x = F.linear(hidden, w, b).requires_grad_(True)
    (grad_x,) = torch.autograd.grad(lsx.torch.loss(x, y, **options), x)
    torch.testing.assert_close(grad, grad_x @ w, rtol=1e-10, atol=1e-12)


def test_lazily_negated_views_are_read_negated():
    """Tensors with torch's negative bit (``torch._neg_view``) hold un-negated values in memory: linear_loss
    must see the negated values of every tensor argument, and differentiate through the views."""
    gen = torch.Generator().manual_seed(21)
    hidden, matrix = torch.randn(6, 4, generator=gen), torch.randn(5, 4, generator=gen)
    probs = torch.softmax(torch.randn(6, 5, generator=gen), dim=1)
    class_weight, row_weight = torch.rand(5, generator=gen) + 0.5, torch.rand(6, generator=gen) + 0.5
    leaf = hidden.clone().requires_grad_(True)
    value = lsx.torch.linear_loss(
        torch._neg_view(leaf),
        torch._neg_view(-matrix),
        torch._neg_view(-probs),
        weight=torch._neg_view(-class_weight),
        sample_weight=torch._neg_view(-row_weight),
        reduction="sum",
        label_smoothing=0.1,
    )
    value.backward()
    expected_leaf = hidden.clone().requires_grad_(True)
    expected = lsx.torch.loss(
        -expected_leaf @ matrix.T, probs, weight=class_weight, sample_weight=row_weight, reduction="sum", label_smoothing=0.1
    )
    expected.backward()
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(leaf.grad, expected_leaf.grad, rtol=1e-5, atol=1e-6)
