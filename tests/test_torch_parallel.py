"""lsx.torch vocabulary-parallel loss (``process_group=``) on real gloo process groups over loopback.

Each test spawns one group (2 or 3 processes) and runs many cases inside it: every rank builds the same
global problem, takes its slice of the classes, and compares the parallel loss and gradient slice with the
single-device ``lsx.torch.loss``; the loss must be bitwise identical across ranks.
"""

from __future__ import annotations

import datetime
import itertools
import os
import socket
import zlib

import pytest

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
mp = pytest.importorskip("torch.multiprocessing")

if not dist.is_available() or not dist.is_gloo_available():  # pragma: no cover - depends on the build
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

F64 = torch.float64


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _spawn(worker, size: int, *args) -> None:
    port = _free_port()
    mp.spawn(_bootstrap, args=(size, port, worker, args), nprocs=size, join=True)


def _bootstrap(rank: int, size: int, port: int, worker, args) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # a collective that some rank never joins fails after this long instead of hanging the test run
    dist.init_process_group("gloo", rank=rank, world_size=size, timeout=datetime.timedelta(seconds=120))
    try:
        worker(rank, size, *args)
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------------------
def _problem(seed: int, n: int, k: int, kind: str, opts: dict, *, label_high: int | None = None):
    """Global logits (N, K), target, weight and class_mask (the padded tail masked) for one case."""
    import lsx.torch  # noqa: F401

    gen = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(n, k, generator=gen, dtype=F64)
    pad = opts.pop("pad", 0)
    mask = None
    if pad:
        mask = torch.ones(k, dtype=torch.bool)
        mask[k - pad :] = False
        x[:, k - pad :] = torch.where(torch.rand(n, pad, generator=gen) < 0.5, -torch.inf, 1e3)
    weight = torch.rand(k, generator=gen, dtype=F64) + 0.1 if opts.pop("weighted", False) else None
    if weight is not None and opts.pop("zero_weight", False):
        weight[1] = 0.0
        x[0, 1] = -torch.inf  # a class with w = 0 contributes nothing, even against −inf
    valid = k - pad
    if opts.pop("sample_weighted", False):
        opts["sample_weight"] = torch.rand(n, generator=gen, dtype=F64) * 2
    if kind == "index":
        high = valid if label_high is None else label_high
        y = torch.randint(0, high, (n,), generator=gen)
        if opts.get("ignore_index") is not None:
            y = torch.where(torch.rand(n, generator=gen) < 0.3, torch.tensor(opts["ignore_index"]), y)
        if opts.pop("all_ignored", False):
            y = torch.full((n,), opts["ignore_index"])
        y = y.to(opts.pop("label_dtype", torch.int64))
    else:
        opts.pop("label_dtype", None)
        opts.pop("all_ignored", None)
        logits = torch.randn(n, valid, generator=gen, dtype=F64)
        y = torch.zeros(n, k, dtype=F64)
        y[:, :valid] = torch.softmax(logits, dim=1)
        if opts.pop("negative_mass", False):
            y[0, 0] -= 0.25
            y[0, 1] += 0.25
    return x, y, weight, mask


def _cases():
    """(kind, options) for every spread × reduction × option combination the group runs."""
    options = [
        {},
        {"label_smoothing": 0.2, "weighted": True, "zero_weight": True, "ignore_index": 2, "z_loss": 1e-3},
        {"label_smoothing": 0.3, "normalize": True, "weighted": True, "pad": 3},
        {"label_smoothing": 1.0, "pad": 2, "z_loss": 1e-2, "normalize": True},
        {"label_smoothing": 0.1, "label_dtype": torch.uint8, "ignore_index": 255, "softcap": 2.0},
        {"label_smoothing": 0.1, "ignore_index": -100, "all_ignored": True, "empty_mean": "zero"},
        {"label_smoothing": 0.1, "negative_mass": True},
        {"label_smoothing": 0.2, "sample_weighted": True, "weighted": True, "softcap": 1.5, "denominator": 5.0},
    ]
    for kind, spread, reduction, option in itertools.product(
        ("index", "probs"), ("all", "others"), ("none", "sum", "mean"), options
    ):
        if kind == "probs" and ("ignore_index" in option or "all_ignored" in option or "label_dtype" in option):
            continue
        if kind == "index" and "negative_mass" in option:
            continue
        if reduction != "mean":
            option = {name: value for name, value in option.items() if name != "denominator"}
        yield kind, dict(option, spread=spread, reduction=reduction)


def _split(x, splits, rank, dim=1):
    start = sum(splits[:rank])
    return x.narrow(dim, start, splits[rank])


def _check_case(rank, size, splits, kind, opts, seed, *, n=7, label_high=None):
    import lsx.torch
    from lsx import spec

    opts = dict(opts)
    k = sum(splits)
    x, y, weight, mask = _problem(seed, n, k, kind, opts, label_high=label_high)
    arrays = dict(weight=None if weight is None else weight.numpy(), class_mask=None if mask is None else mask.numpy())
    arrays.update({name: v.numpy() if isinstance(v, torch.Tensor) else v for name, v in opts.items()})
    reference = torch.from_numpy(spec.reference_loss(x.numpy(), y.numpy(), axis=1, **arrays))
    cotangent = torch.rand(reference.shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    reference_grad = spec.reference_grad(x.numpy(), y.numpy(), axis=1, cotangent=cotangent.numpy(), **arrays)
    full = x.clone().requires_grad_(True)
    single = lsx.torch.loss(full, y, weight, class_mask=mask, **opts)
    (single_grad,) = torch.autograd.grad(single, full, cotangent)

    part = _split(x, splits, rank).clone().requires_grad_(True)
    target = y if kind == "index" else _split(y, splits, rank)
    value = lsx.torch.loss(
        part,
        target,
        None if weight is None else _split(weight, splits, rank, 0),
        class_mask=None if mask is None else _split(mask, splits, rank, 0),
        process_group=dist.group.WORLD,
        **opts,
    )
    (grad,) = torch.autograd.grad(value, part, cotangent)
    where = f"case {kind} {opts} on rank {rank} of {splits}"
    for name, loss, full_grad in (
        ("the single-device lsx.torch.loss", single.detach(), single_grad),
        ("the float64 reference", reference, torch.from_numpy(reference_grad)),
    ):
        torch.testing.assert_close(
            value.detach(),
            loss,
            rtol=1e-12,
            atol=1e-12,
            equal_nan=True,
            msg=lambda m, name=name: f"{where} vs {name}: {m}",
        )
        torch.testing.assert_close(
            grad,
            _split(full_grad, splits, rank),
            rtol=1e-12,
            atol=1e-12,
            equal_nan=True,
            msg=lambda m, name=name: f"{where} vs {name}: {m}",
        )
    return value.detach().reshape(-1)


def _check_linear_case(rank, size, splits, kind, opts, seed, *, n=7, hidden=5, label_high=None):
    """linear_loss with this rank's rows of the head (fused, chunks of 3 rows) against the single-device
    linear_loss on the whole head: the loss, the input's full gradient, this rank's weight and bias rows."""
    import lsx.torch

    opts = dict(opts)
    k = sum(splits)
    _, y, weight, mask = _problem(seed, n, k, kind, opts, label_high=label_high)
    gen = torch.Generator().manual_seed(seed + 2)
    h = torch.randn(n, hidden, generator=gen, dtype=F64)
    head = 2 * torch.randn(k, hidden, generator=gen, dtype=F64)
    bias = torch.randn(k, generator=gen, dtype=F64)
    leaves = [t.clone().requires_grad_(True) for t in (h, head, bias)]
    expected = lsx.torch.linear_loss(
        leaves[0], leaves[1], y, linear_bias=leaves[2], weight=weight, class_mask=mask, **opts
    )
    cotangent = torch.rand(expected.shape, generator=gen, dtype=F64) + 0.5
    expected_grads = torch.autograd.grad(expected, leaves, cotangent)
    mine = [
        h.clone().requires_grad_(True),
        _split(head, splits, rank, 0).clone().requires_grad_(True),
        _split(bias, splits, rank, 0).clone().requires_grad_(True),
    ]
    value = lsx.torch.linear_loss(
        mine[0],
        mine[1],
        y if kind == "index" else _split(y, splits, rank),
        linear_bias=mine[2],
        weight=None if weight is None else _split(weight, splits, rank, 0),
        class_mask=None if mask is None else _split(mask, splits, rank, 0),
        process_group=dist.group.WORLD,
        chunk_size=3,
        **opts,
    )
    grads = torch.autograd.grad(value, mine, cotangent)
    where = f"linear case {kind} {opts} on rank {rank} of {splits}"
    pairs = (
        ("loss", value.detach(), expected.detach()),
        ("input's gradient", grads[0], expected_grads[0]),
        ("linear_weight's gradient", grads[1], _split(expected_grads[1], splits, rank, 0)),
        ("linear_bias's gradient", grads[2], _split(expected_grads[2], splits, rank, 0)),
    )
    for name, got, want in pairs:
        torch.testing.assert_close(
            got, want, rtol=1e-12, atol=1e-12, equal_nan=True, msg=lambda m, name=name: f"{where}, {name}: {m}"
        )
    return value.detach().reshape(-1)


def _parity_worker(rank, size, splits, label_high):
    losses = []
    for index, (kind, opts) in enumerate(_cases()):
        seed = zlib.crc32(f"{splits}-{index}".encode())
        losses.append(_check_case(rank, size, splits, kind, opts, seed, label_high=label_high))
        losses.append(_check_linear_case(rank, size, splits, kind, opts, seed, label_high=label_high))
    # the loss is bitwise identical on every rank, in every case
    bits = torch.cat(losses).view(torch.int64)
    gathered = [torch.empty_like(bits) for _ in range(size)]
    dist.all_gather(gathered, bits)
    for other in gathered[1:]:
        assert torch.equal(other, gathered[0]), "the loss differs across ranks"
    _layout_and_dtype_checks(rank, splits)
    _linear_checks(rank, splits)
    if size == 3:  # the same group checks bad input (a spawn costs more than the cases)
        _bad_input_worker(rank, size)


def _layout_and_dtype_checks(rank, splits):
    """float32 logits with int16 labels, classes on dim 1 of (N, C, d), and a call without autograd."""
    import lsx.torch

    group = dist.group.WORLD
    k = sum(splits)
    gen = torch.Generator().manual_seed(11)
    weight = torch.rand(k, generator=gen) + 0.5
    x = 4 * torch.randn(6, k, 3, generator=gen)
    y = torch.randint(0, k, (6, 3), generator=gen).to(torch.int16)
    opts = dict(label_smoothing=0.1, spread="others", z_loss=1e-3)
    full = x.clone().requires_grad_(True)
    expected = lsx.torch.loss(full, y, weight, **opts)
    expected.backward()
    part = _split(x, splits, rank).clone().requires_grad_(True)
    value = lsx.torch.loss(part, y, _split(weight, splits, rank, 0), process_group=group, **opts)
    value.backward()
    assert value.dtype == torch.float32 and part.grad.dtype == torch.float32
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(part.grad, _split(full.grad, splits, rank), rtol=1e-5, atol=1e-7)
    with torch.no_grad():
        again = lsx.torch.loss(part, y, _split(weight, splits, rank, 0), process_group=group, **opts)
    assert torch.equal(again, value.detach())


def _linear_checks(rank, splits):
    """linear_loss with this rank's rows of the head: the loss, this rank's weight and bias gradient rows, and
    the full input gradient on every rank (already summed over the group)."""
    import lsx.torch

    group = dist.group.WORLD
    v = sum(splits)
    gen = torch.Generator().manual_seed(13)
    h = torch.randn(2, 3, 4, generator=gen, dtype=F64)
    head = torch.randn(v, 4, generator=gen, dtype=F64)
    bias = torch.randn(v, generator=gen, dtype=F64)
    y = torch.randint(0, v, (2, 3), generator=gen)
    for opts in (
        dict(label_smoothing=0.1, spread="others", z_loss=1e-3, reduction="mean"),
        dict(label_smoothing=0.2, softcap=2.0, reduction="none"),
    ):
        leaves = [t.clone().requires_grad_(True) for t in (h, head, bias)]
        expected = lsx.torch.linear_loss(leaves[0], leaves[1], y, linear_bias=leaves[2], **opts)
        cotangent = torch.rand(expected.shape, generator=gen, dtype=F64)
        expected_grads = torch.autograd.grad(expected, leaves, cotangent)
        mine = [
            h.clone().requires_grad_(True),
            _split(head, splits, rank, 0).clone().requires_grad_(True),
            _split(bias, splits, rank, 0).clone().requires_grad_(True),
        ]
        value = lsx.torch.linear_loss(mine[0], mine[1], y, linear_bias=mine[2], process_group=group, **opts)
        grads = torch.autograd.grad(value, mine, cotangent)
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[0], expected_grads[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[1], _split(expected_grads[1], splits, rank, 0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(grads[2], _split(expected_grads[2], splits, rank, 0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "splits, label_high",
    [
        # 2 ranks, uneven; rank 1 holds no target class; its tail is padding masked with class_mask
        pytest.param((4, 7), 4, id="2-ranks-uneven"),
        # 3 ranks, the middle one holds no class at all; then bad input in the same group
        pytest.param((5, 0, 6), None, id="3-ranks-one-empty-and-bad-input"),
    ],
)
def test_parallel_equals_single_device(splits, label_high):
    _spawn(_parity_worker, len(splits), splits, label_high)


# --------------------------------------------------------------------------------------------------------
# Bad input: an error on every rank, never a hang; the group stays usable afterwards
# --------------------------------------------------------------------------------------------------------
def _raises(match, fn):
    with pytest.raises(ValueError, match=match):
        fn()


def _bad_input_worker(rank, size):
    import lsx.torch

    group = dist.group.WORLD
    splits = (3, 2, 4)[:size]
    k = sum(splits)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, k, generator=gen, dtype=F64)
    y = torch.randint(0, k, (6,), generator=gen)
    part = _split(x, splits, rank)

    def run(logits=part, target=y, weight=None, **options):
        return lsx.torch.loss(logits, target, weight, process_group=group, label_smoothing=0.1, **options)

    # labels that differ across ranks
    other = y.clone()
    other[0] = (other[0] + 1) % k
    _raises("disagree on the labels", lambda: run(target=other if rank == 1 else y))
    # an out-of-range label (beyond the global K, inside the local one on no rank): named on every rank
    bad = y.clone()
    bad[2] = k
    _raises(f"target has label {k}, which is outside \\[0, {k}\\)", lambda: run(target=bad))
    # a batch shape that differs on one rank
    _raises(
        "disagree on the element count",
        lambda: run(logits=part[:5] if rank == 1 else part[:4], target=y[:4] if rank != 1 else y[:5]),
    )
    # a dtype that differs on one rank
    _raises("disagree on the logits dtype", lambda: run(logits=part.float() if rank == 0 else part))
    # a bad weight on one rank only: that rank names it, the others say which rank
    weight = torch.ones(splits[rank], dtype=F64)
    if rank == size - 1:
        weight[0] = -1.0
    message = "weight must be finite and >= 0" if rank == size - 1 else f"rank {size - 1} .* rejected its weight"
    _raises(message, lambda: run(weight=weight))
    # options that differ across ranks
    _raises("disagree on the options", lambda: run(z_loss=1e-3 if rank == 0 else 0.0))
    # a shape error on one rank (its weight has the wrong length)
    wrong = torch.ones(splits[rank] + (rank == 0), dtype=F64)
    message = "weight must have shape" if rank == 0 else "rank 0 .* rejected its input's shapes"
    _raises(message, lambda: run(weight=wrong))
    # a class_mask that leaves no class anywhere
    _raises("at least one valid class", lambda: run(class_mask=torch.zeros(splits[rank], dtype=torch.bool)))
    # a label on a class masked on its owner rank
    mask = torch.ones(splits[rank], dtype=torch.bool)
    owner = next(r for r in range(size) if sum(splits[:r]) <= int(y[0]) < sum(splits[: r + 1]))
    if rank == owner:
        mask[int(y[0]) - sum(splits[:rank])] = False
    _raises(f"target has label {int(y[0])}, a class that class_mask marks as absent", lambda: run(class_mask=mask))
    # the group is still usable: a good call after all of that gives the single-device loss
    expected = lsx.torch.loss(x, y, label_smoothing=0.1)
    torch.testing.assert_close(run(), expected, rtol=1e-12, atol=1e-12)
    # CrossEntropyLoss takes the group too
    criterion = lsx.torch.CrossEntropyLoss(label_smoothing=0.1, process_group=group)
    torch.testing.assert_close(criterion(part, y), expected, rtol=1e-12, atol=1e-12)
    _bad_linear_input(rank, size, splits, y)


def _bad_linear_input(rank, size, splits, y):
    """linear_loss with a group: a local shape error or a disagreement raises on every rank; the logits are
    only ever formed a chunk at a time (both passes), and a call without autograd gives the same loss."""
    import lsx.torch
    from lsx.torch import _parallel

    group = dist.group.WORLD
    k = sum(splits)
    gen = torch.Generator().manual_seed(17)
    h = torch.randn(6, 4, generator=gen, dtype=F64)
    head = _split(torch.randn(k, 4, generator=gen, dtype=F64), splits, rank, 0)

    def run(inputs=h, rows=head, **options):
        return lsx.torch.linear_loss(inputs, rows, y, process_group=group, label_smoothing=0.1, **options)

    # this rank's head has the wrong H: it names it, the others say which rank
    wrong = torch.randn(splits[rank], 5, dtype=F64) if rank == 1 else head
    message = "input's last dim \\(4\\) must equal linear_weight's H" if rank == 1 else "rank 1 .* rejected its input"
    _raises(message, lambda: run(rows=wrong))
    # a bias of the wrong length on one rank
    bias = torch.zeros(splits[rank] + (rank == 2), dtype=F64)
    message = "linear_bias must have shape" if rank == 2 else "rank 2 .* rejected its input"
    _raises(message, lambda: run(linear_bias=bias))
    # the input requires grad on one rank only (the backward's all-reduce would hang)
    _raises("disagree on the input's requires_grad", lambda: run(inputs=h.requires_grad_(rank == 0)))
    h.requires_grad_(False)
    # the logits exist a chunk at a time, chunk_size rows: computed once per chunk for "mean" (statistics,
    # their all-gather and the gradient in the forward pass), twice for "none" (the backward recomputes them)
    shapes = []
    original = _parallel._chunk_logits

    def recording(h2, wc, bc, start, stop, buffer):
        shapes.append(tuple(buffer.shape))
        return original(h2, wc, bc, start, stop, buffer)

    _parallel._chunk_logits = recording
    try:
        leaf = h.clone().requires_grad_(True)
        value = run(inputs=leaf, chunk_size=4)
        value.backward()
        assert shapes == [(4, splits[rank])] * 2, shapes
        shapes.clear()
        run(inputs=leaf, chunk_size=4, reduction="none").sum().backward()
        assert shapes == [(4, splits[rank])] * 4, shapes
    finally:
        _parallel._chunk_logits = original
    with torch.no_grad():
        assert torch.equal(run(chunk_size=4), value.detach())


# --------------------------------------------------------------------------------------------------------
# What every rank must pass alike is compared by a digest of its values: sample_weight, the denominator,
# labels that differ only by a permutation
# --------------------------------------------------------------------------------------------------------
def _replicated_worker(rank, size):
    import lsx.torch

    group = dist.group.WORLD
    splits = (3, 4)
    k = sum(splits)
    n = 600
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, k, generator=gen, dtype=F64)
    y = torch.randint(0, k, (n,), generator=gen)
    y[0], y[251], y[502] = 1, 2, 3
    part = _split(x, splits, rank)
    h = torch.randn(n, 3, generator=gen, dtype=F64)
    head = _split(torch.randn(k, 3, generator=gen, dtype=F64), splits, rank, 0)
    sw = torch.rand(n, generator=gen, dtype=F64) + 0.5

    def run(target=y, **options):
        return lsx.torch.loss(part, target, process_group=group, label_smoothing=0.1, **options)

    def run_linear(target=y, **options):
        return lsx.torch.linear_loss(h, head, target, process_group=group, label_smoothing=0.1, **options)

    # labels swapped 251 (and 502) positions apart on one rank: the same sums, a different digest
    swapped = y.clone()
    swapped[[0, 251]] = swapped[[251, 0]]
    moved = y.clone()
    moved[[0, 502]] = moved[[502, 0]]
    for other in (swapped, moved):
        for fn in (run, run_linear):
            with pytest.raises(ValueError, match="disagree on the labels"):
                fn(target=other if rank == 1 else y)
    # a sample_weight that differs on one rank: in one value, or by a permutation
    nudged = sw.clone()
    nudged[7] = torch.nextafter(nudged[7], torch.tensor(2.0, dtype=F64))
    permuted = sw.flip(0)
    for other in (nudged, permuted):
        for fn in (run, run_linear):
            for reduction in ("mean", "sum", "none"):
                with pytest.raises(ValueError, match="disagree on the sample_weight"):
                    fn(sample_weight=other if rank == 0 else sw, reduction=reduction)
    # a denominator that differs on one rank: numbers and tensors
    rounded = float(torch.tensor(1 / 3, dtype=torch.float32))
    for mine, theirs in ((3.0, 3.5), (torch.tensor(3.0), torch.tensor(3.0 + 2**-20)), (1 / 3, rounded)):
        for fn in (run, run_linear):
            with pytest.raises(ValueError, match="disagree on the denominator"):
                fn(denominator=mine if rank == 0 else theirs)
    # weights that overflow float32's sums, a softcap outside float32's range: raised on every rank
    huge = torch.full((n,), 3e38, dtype=torch.float32)
    _raises("sample_weight", lambda: lsx.torch.loss(part.float(), y, process_group=group, sample_weight=huge))
    _raises(
        "sample_weight",
        lambda: lsx.torch.linear_loss(h.float(), head.float(), y, process_group=group, sample_weight=huge),
    )
    big = torch.full((splits[rank],), 1e38 if rank == 1 else 1.0)
    message = "weight \\(max" if rank == 1 else "rank 1 .* rejected its weight"
    _raises(message, lambda: lsx.torch.loss(part.float(), y, big, process_group=group))
    for fn in (lambda: lsx.torch.loss(part.float(), y, process_group=group, softcap=1e39),
               lambda: lsx.torch.linear_loss(h.float(), head.float(), y, process_group=group, softcap=1e39)):
        _raises("softcap", fn)
    # sample_weight on one rank only
    _raises("disagree on the options", lambda: run(sample_weight=sw if rank == 0 else None))
    # the group is still usable; a Python float denominator is not rounded to float32: the single-device loss
    den = 1 / 3
    got = run(denominator=den, sample_weight=sw)
    expected = lsx.torch.loss(x, y, label_smoothing=0.1, denominator=den, sample_weight=sw)
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)
    got = run_linear(denominator=den)
    single = lsx.torch.linear_loss(h, _full_head(head, group), y, label_smoothing=0.1, denominator=den)
    torch.testing.assert_close(got, single, rtol=1e-14, atol=0)
    # second derivatives: the single-device first-order-only error, on every rank (no collective left waiting)
    for reduction in ("mean", "none"):
        leaf = h.clone().requires_grad_(True)
        value = lsx.torch.linear_loss(leaf, head, y, process_group=group, reduction=reduction)
        with pytest.raises(RuntimeError, match="first-order"):
            torch.autograd.grad(value.sum(), leaf, create_graph=True)
        logits = part.clone().requires_grad_(True)
        value = lsx.torch.loss(logits, y, process_group=group, reduction=reduction)
        with pytest.raises(RuntimeError, match="first-order"):
            torch.autograd.grad(value.sum(), logits, create_graph=True)
    torch.testing.assert_close(run_linear(), lsx.torch.linear_loss(h, _full_head(head, group), y, label_smoothing=0.1))


def _full_head(head, group):
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, head)
    return torch.cat(parts)


def test_replicated_arguments_must_agree():
    _spawn(_replicated_worker, 2)
