"""The fused Numba kernel against the pure-NumPy engine and the float64 reference; ``out=``, in place, fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import lsx.numpy
from lsx import spec
from tests.cases import assert_close

numba = pytest.importorskip("numba")
from lsx.numpy import _numba as _numba_kernels  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OPTION_SETS = [
    {},
    {"label_smoothing": 0.1},
    {"label_smoothing": 1.0, "reduction": "sum"},
    {"label_smoothing": 0.3, "spread": "others", "normalize": True},
    {"label_smoothing": 0.1, "weight": "random", "z_loss": 1e-2},
    {"label_smoothing": 0.2, "spread": "others", "weight": "random", "reduction": "none"},
    {"label_smoothing": 0.1, "class_mask": "random"},
    {"label_smoothing": 0.1, "class_mask": "random", "weight": "random", "normalize": True, "z_loss": 1e-3},
    {"label_smoothing": 0.1, "ignore_index": 0},
    {"label_smoothing": 0.1, "ignore_index": None, "reduction": "none"},
]


def _pure(logits, target, **options):
    saved = lsx.numpy._numba_kernel
    lsx.numpy._numba_kernel = lambda: None
    try:
        return lsx.numpy.loss_and_grad(logits, target, **options)
    finally:
        lsx.numpy._numba_kernel = saved


def _make(rng, n, k, kind, options, dtype):
    options = dict(options)
    valid = np.ones(k, bool)
    if options.get("class_mask") == "random":
        valid = rng.random(k) < 0.7
        valid[rng.integers(k)] = True
        if options.get("spread") == "others" and valid.sum() < 2:
            valid[:2] = True
        options["class_mask"] = valid
    if options.get("weight") == "random":
        options["weight"] = rng.uniform(0.2, 2.0, k)
    x = (rng.normal(scale=3.0, size=(n, k))).astype(dtype)
    if kind == "index":
        classes = np.flatnonzero(valid)
        target = classes[rng.integers(0, len(classes), n)]
        ignore_index = spec.resolve_options(
            **{k_: v for k_, v in options.items() if k_ not in ("weight", "class_mask")}
        ).ignore_index
        if ignore_index is not None:
            target[rng.random(n) < 0.25] = ignore_index
    else:
        target = np.zeros((n, k))
        target[:, valid] = rng.dirichlet(np.ones(int(valid.sum())), size=n)
    return x, target, options


def _skip_unsupported(k, options):
    valid = k if not isinstance(options.get("class_mask"), np.ndarray) else int(options["class_mask"].sum())
    if options.get("spread") == "others" and valid < 2 and options.get("label_smoothing", 0) > 0:
        pytest.skip("spread='others' needs two classes")


@pytest.fixture(params=["serial", "parallel"])
def threads(request, monkeypatch):
    """Run the kernel through its serial driver (small inputs) or its prange driver (forced)."""
    if request.param == "parallel":
        monkeypatch.setattr(_numba_kernels, "_PARALLEL_MIN_ELEMENTS", 0)
    else:
        monkeypatch.setattr(_numba_kernels, "_PARALLEL_MIN_ELEMENTS", 1 << 62)
    return request.param


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("k", [1, 2, 7, 17, 300, 2049, 4133])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("option_set", range(len(OPTION_SETS)))
def test_kernel_matches_pure_path_and_reference(kind, k, dtype, option_set, threads):
    rng = np.random.default_rng([k, option_set, kind == "index", dtype == "float32"])
    n = 1 + int(rng.integers(1, 9))
    x, target, options = _make(rng, n, k, kind, OPTION_SETS[option_set], dtype)
    _skip_unsupported(k, options)
    value, grad = lsx.numpy.loss_and_grad(x, target, **options)
    pure_value, pure_grad = _pure(x, target, **options)
    assert value.dtype == x.dtype and grad.dtype == x.dtype and grad.shape == x.shape
    assert_close(value, spec.reference_loss(x.astype(np.float64), target, **options), dtype, "kernel loss")
    assert_close(grad, spec.reference_grad(x.astype(np.float64), target, **options), dtype, "kernel gradient")
    assert_close(value, pure_value, dtype, "kernel vs pure loss")
    assert_close(grad, pure_grad, dtype, "kernel vs pure gradient")
    # loss() compiles a kernel without the gradient pass: its sums may round differently by an ulp or two
    np.testing.assert_allclose(lsx.numpy.loss(x, target, **options), value, rtol=4 * np.finfo(dtype).eps, atol=0)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("scale", [1e3, 3e4])
def test_huge_logits(dtype, scale):
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(5, 40)) * scale).astype(dtype)
    y = rng.integers(0, 40, 5)
    for options in ({"label_smoothing": 0.1, "z_loss": 1e-4}, {"label_smoothing": 0.2, "spread": "others"}):
        value, grad = lsx.numpy.loss_and_grad(x, y, **options)
        assert np.isfinite(value) and np.isfinite(grad).all()
        assert_close(value, spec.reference_loss(x.astype(np.float64), y, **options), dtype, "loss")
        assert_close(grad, spec.reference_grad(x.astype(np.float64), y, **options), dtype, "gradient")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_negative_infinite_logits(dtype, eps):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 37)).astype(dtype)
    y = rng.integers(0, 37, 6)
    x[rng.random(x.shape) < 0.4] = -np.inf
    x[np.arange(6), y] = rng.normal(size=6)
    x[1, :] = -np.inf
    x[1, y[1]] = 0.5  # one finite logit: p = onehot
    x[2] = np.where(np.arange(37) == y[2], x[2], -800.0)  # exp underflows to exactly 0
    value, grad = lsx.numpy.loss_and_grad(x, y, label_smoothing=eps, reduction="none")
    expected = spec.reference_loss(x.astype(np.float64), y, label_smoothing=eps, reduction="none")
    if eps == 0:
        assert np.isfinite(value).all() and np.isfinite(grad).all()
    assert_close(value, expected, dtype, "loss")
    assert_close(
        grad, spec.reference_grad(x.astype(np.float64), y, label_smoothing=eps, reduction="none"), dtype, "grad"
    )
    if eps == 0:
        assert value[2] == 0 and grad[2, y[2]] == 0  # p_y is exactly 1


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_nan_propagates_to_its_row_only(dtype):
    x = np.random.default_rng(3).normal(size=(4, 9)).astype(dtype)
    y = np.array([1, 2, -100, 4])
    x[0, 5] = np.nan
    x[2, 3] = np.nan  # ignored row: 0 loss and 0 gradient, like the reference
    value, grad = lsx.numpy.loss_and_grad(x, y, label_smoothing=0.1, reduction="none")
    assert np.isnan(value[0]) and np.isnan(grad[0]).all()
    assert value[2] == 0 and (grad[2] == 0).all()
    assert np.isfinite(value[[1, 3]]).all() and np.isfinite(grad[[1, 3]]).all()
    masked = np.ones(9, bool)
    masked[7] = False
    value, grad = lsx.numpy.loss_and_grad(x, y, label_smoothing=0.1, class_mask=masked, weight=np.ones(9))
    expected = spec.reference_grad(x.astype(np.float64), y, label_smoothing=0.1, class_mask=masked, weight=np.ones(9))
    assert np.isnan(value)
    assert_close(grad, expected, dtype, "gradient with a NaN row and a class mask")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_vectorised_exp(dtype):
    @numba.njit
    def apply(values):
        out = np.empty_like(values)
        for i in range(values.size):
            out[i] = _numba_kernels._exp(values[i])
        return out

    d = np.linspace(-80.0, 0.0, 200_001).astype(dtype)
    relative = np.abs(apply(d).astype(np.float64) / np.exp(d.astype(np.float64)) - 1)
    assert relative.max() < (3e-7 if dtype == "float32" else 1e-14)
    below_smallest_normal = -104.0 if dtype == "float32" else -710.0
    special = np.array([-np.inf, -1e30, -800.0, below_smallest_normal, np.nan, 0.0], dtype)
    result = apply(special)
    assert (result[:4] == 0).all() and np.isnan(result[4]) and result[5] == 1


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@pytest.mark.parametrize("axis", [-1, 0])
def test_out_and_in_place(dtype, axis):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(33, 65)).astype(dtype)
    y = rng.integers(0, x.shape[axis], x.shape[1 - (axis % 2)])
    y[::5] = -100
    options = {"label_smoothing": 0.1, "z_loss": 1e-3, "axis": axis}
    value, grad = lsx.numpy.loss_and_grad(x, y, **options)

    out = np.full_like(x, np.nan)
    value_out, grad_out = lsx.numpy.loss_and_grad(x, y, out=out, **options)
    assert grad_out is out
    np.testing.assert_array_equal(out, grad)
    np.testing.assert_array_equal(value_out, value)

    logits = x.copy()
    value_in, grad_in = lsx.numpy.loss_and_grad(logits, y, out=logits, **options)
    assert grad_in is logits
    assert_close(logits, grad, dtype, "in-place gradient")
    assert_close(value_in, value, dtype, "in-place loss")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_in_place_with_probability_targets_and_options(dtype):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(9, 2100)).astype(dtype)
    mask = rng.random(2100) < 0.9
    target = np.zeros(x.shape)
    target[:, mask] = rng.dirichlet(np.ones(int(mask.sum())), size=9)
    options = {
        "label_smoothing": 0.1,
        "weight": rng.uniform(0.5, 2, 2100),
        "class_mask": mask,
        "normalize": True,
        "z_loss": 1e-3,
    }
    value, grad = lsx.numpy.loss_and_grad(x, target, **options)
    logits = x.copy()
    value_in, grad_in = lsx.numpy.loss_and_grad(logits, target, out=logits, **options)
    assert grad_in is logits
    # in place the sums may vectorise differently, so agreement is to rounding, not bitwise
    assert_close(logits, grad, dtype, "in-place gradient")
    assert_close(value_in, value, dtype, "in-place loss")
    assert_close(grad, spec.reference_grad(x.astype(np.float64), target, **options), dtype, "gradient")


def test_out_is_validated():
    x = np.zeros((3, 4), np.float32)
    y = np.zeros(3, np.int64)
    with pytest.raises(ValueError, match="out must be"):
        lsx.numpy.loss_and_grad(x, y, out=np.zeros((3, 4), np.float64))
    with pytest.raises(ValueError, match="out must be"):
        lsx.numpy.loss_and_grad(x, y, out=np.zeros((4, 3), np.float32))


def test_kernel_writes_unscaled_gradient_into_a_given_buffer():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(6, 10))
    y = rng.integers(0, 10, 6)
    opts = spec.resolve_options(label_smoothing=0.1)
    buffer = np.empty_like(x)
    per_element, denominator, grad = _numba_kernels.forward_backward(
        x, y, "index", opts, None, None, np.float64, True, buffer
    )
    assert grad is buffer and denominator == 6
    np.testing.assert_allclose(
        per_element, spec.reference_loss(x, y, label_smoothing=0.1, reduction="none"), rtol=1e-12
    )
    np.testing.assert_allclose(
        grad, spec.reference_grad(x, y, label_smoothing=0.1, reduction="sum"), rtol=1e-12, atol=1e-15
    )


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_import_lsx_loads_no_numba():
    result = _run("import sys, lsx, lsx.spec; assert 'numba' not in sys.modules, 'numba imported'")
    assert result.returncode == 0, result.stderr


def test_fallback_without_numba():
    result = _run(
        """
        import sys
        sys.modules["numba"] = None  # makes `import numba` raise ImportError
        import numpy as np
        import lsx.numpy
        from lsx import spec
        from lsx.numpy import _numba as _numba_kernels
        assert _numba_kernels.AVAILABLE is False
        assert lsx.numpy._numba_kernel() is None
        rng = np.random.default_rng(0)
        x = rng.normal(size=(5, 7)).astype(np.float32)
        y = np.array([0, 3, -100, 6, 2])
        original = x.astype(np.float64)
        value, grad = lsx.numpy.loss_and_grad(x, y, label_smoothing=0.1, out=x)
        assert grad is x and value.dtype == np.float32
        np.testing.assert_allclose(value, spec.reference_loss(original, y, label_smoothing=0.1), rtol=1e-5)
        np.testing.assert_allclose(grad, spec.reference_grad(original, y, label_smoothing=0.1), atol=1e-6)
        assert "numba" not in sys.modules or sys.modules["numba"] is None
        print("fallback ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout


def _row_statistics(x, target, kind, options):
    """The spec's per-row algebra fed with float64 row statistics computed here in NumPy: (loss, grad)."""
    opts = spec.resolve_options(**options)
    n, k = x.shape
    mask = np.ones(k, bool) if opts.class_mask is None else np.asarray(opts.class_mask)
    w = np.where(mask, 1.0 if opts.weight is None else np.asarray(opts.weight, np.float64), 0.0)
    coefficients = spec.RowCoefficients.of(opts, int(mask.sum()), float(w.sum()))
    a, b = coefficients.a, coefficients.b
    x_soft = np.where(mask, x, -np.inf)
    row_max = x_soft.max(axis=1)
    shifted = np.where(mask, x - row_max[:, None], 0.0)
    log_sum_exp = np.log(np.sum(np.where(mask, np.exp(shifted), 0.0), axis=1))
    softmax = np.where(mask, np.exp(shifted - log_sum_exp[:, None]), 0.0)
    if kind == "index":
        active = target != opts.ignore_index if opts.ignore_index is not None else np.ones(n, bool)
        y = np.where(active, target, 0)
        rows = np.arange(n)
        loss, coef = spec.label_row(
            coefficients,
            log_sum_exp=log_sum_exp,
            row_max=row_max,
            w_y=w[y],
            x_y=shifted[rows, y],
            weighted_sum=shifted @ w,
            where=np.where,
            log=np.log,
        )
        wq = w * (a * (np.arange(k) == y[:, None]) + b)
    else:
        active = np.ones(n, bool)
        wq = w * np.where(mask, a * target + b, 0.0)
        weighted_xlogx = np.sum(np.where(wq != 0, w * spec.xlogx(a * target + b, where=np.where, log=np.log), 0), 1)
        loss, coef = spec.probability_row(
            coefficients,
            log_sum_exp=log_sum_exp,
            row_max=row_max,
            target_mass=wq.sum(axis=1),
            weighted_sum=np.sum(wq * shifted, axis=1),
            weighted_xlogx=weighted_xlogx,
        )
    grad = np.where(mask, np.broadcast_to(coef, (n,))[:, None] * softmax - wq, 0.0)
    return np.where(active, loss, 0.0), np.where(active[:, None], grad, 0.0)


@pytest.mark.parametrize("kind", ["index", "probs"])
@pytest.mark.parametrize("k", [2, 7, 300, 2049])
@pytest.mark.parametrize("option_set", range(len(OPTION_SETS)))
def test_kernel_per_element_loss_follows_the_spec_row_algebra(kind, k, option_set, threads):
    """The kernel's inlined loop computes what spec.label_row / spec.probability_row make of the row statistics."""
    rng = np.random.default_rng([k, option_set, kind == "index", 7])
    n = 1 + int(rng.integers(1, 9))
    x, target, options = _make(rng, n, k, kind, OPTION_SETS[option_set], "float64")
    _skip_unsupported(k, options)
    opts = spec.resolve_options(**options)
    _, weight, mask = spec.validate(x, target, opts, -1)
    per_element, _, grad = _numba_kernels.forward_backward(x, target, kind, opts, weight, mask, np.float64, True)
    expected_loss, expected_grad = _row_statistics(x, target, kind, options)
    np.testing.assert_allclose(per_element, expected_loss, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("kind", ["index", "probs"])
def test_softcap_kernel_in_place_and_across_blocks(dtype, kind):
    """Soft-capping inside the sweep: several blocks per row, the threaded driver, in place and not, against the
    pure-NumPy engine and the reference; with per-row sample weights and a caller's denominator."""
    rng = np.random.default_rng(11)
    n, k = 40, 5000  # 5000 > one block; 200000 elements take the threaded driver
    x = (rng.standard_normal((n, k)) * 20).astype(dtype)
    x[0, 7] = np.inf
    x[1, :100] = -np.inf
    target = rng.integers(0, k, n) if kind == "index" else rng.dirichlet(np.ones(k), size=n)
    mask = np.ones(k, bool)
    mask[::7] = False
    if kind == "index":
        target = np.where(mask[target], target, 1)
    else:
        target = np.where(mask, target, 0)
    options = {"softcap": 30.0, "label_smoothing": 0.1, "class_mask": mask, "sample_weight": rng.uniform(0, 2, n)}
    value, grad = lsx.numpy.loss_and_grad(x, target, **options)
    work = x.copy()
    value_in_place, grad_in_place = lsx.numpy.loss_and_grad(work, target, out=work, **options)
    assert grad_in_place is work
    np.testing.assert_array_equal(value_in_place, value)
    np.testing.assert_array_equal(grad_in_place, grad)
    np.testing.assert_array_equal(lsx.numpy.loss(x, target, **options), value)
    pure_value, pure_grad = _pure(x, target, **options)
    assert_close(value, pure_value, dtype, "loss vs pure")
    assert_close(grad, pure_grad, dtype, "gradient vs pure")
    x64 = x.astype(np.float64)
    assert_close(value, spec.reference_loss(x64, target, **options), dtype, "loss")
    assert_close(grad, spec.reference_grad(x64, target, **options), dtype, "gradient")


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_vectorised_tanh_against_numpy(dtype):
    """The kernel's tanh (float32: a rational fit without exp) over a dense grid of every magnitude, in a SIMD loop
    and as a scalar: relative error under 3e-7 (float32) / 3e-15 (float64), ±inf → ±1, NaN → NaN, tiny u → u."""

    @numba.njit(fastmath=_numba_kernels._LOOP_FLAGS, error_model="numpy")
    def vector(u, out):
        for j in range(u.shape[0]):
            out[j] = _numba_kernels._tanh(u[j])

    @numba.njit(error_model="numpy")
    def scalar(u, out):
        for j in range(u.shape[0]):
            out[j] = _numba_kernels._cap_scalar(u[j], 1.0)

    grid = np.geomspace(1e-40 if dtype == "float32" else 1e-300, 40.0, 400001)
    special = [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45 if dtype == "float32" else 5e-324]
    u = np.concatenate([grid, -grid, special]).astype(dtype)
    out, out_scalar = np.empty_like(u), np.empty_like(u)
    vector(u, out)
    scalar(u, out_scalar)
    np.testing.assert_array_equal(out, out_scalar)
    expected = np.tanh(u.astype(np.float64))
    finite = np.isfinite(u) & (u != 0)
    rel = np.abs(out[finite] - expected[finite]) / np.abs(expected[finite])
    assert rel.max() < (3e-7 if dtype == "float32" else 3e-15)
    np.testing.assert_array_equal(out[-6:-1], [1.0, -1.0, np.nan, 0.0, -0.0])
    assert out[-1] == u[-1] and np.nanmax(np.abs(out)) <= 1.0


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pairwise_block_has_the_bits_of_numpys_sum(dtype):
    """lsx.torch's short path sums up to 128 rows' losses inside the kernel call: it must give NumPy's
    ``add.reduce`` bits (which the general path and lsx.numpy use), signed zeros, inf and NaN included."""
    rng = np.random.default_rng(7)
    block = _numba_kernels._PAIRWISE_BLOCK
    for count in [*range(0, block + 1)] * 3:
        values = (rng.standard_normal(count + 5) * 10.0 ** rng.uniform(-6, 6, count + 5)).astype(dtype)
        first = int(rng.integers(0, 6))
        run = values[first : first + count] if first + count <= values.size else values[:count]
        start = first if first + count <= values.size else 0
        expected = np.add.reduce(run)
        got = dtype(0.0) + _numba_kernels._pairwise_block(values, start, count)
        assert np.asarray(got, dtype).tobytes() == np.asarray(expected, dtype).tobytes(), count
    for special in ([-0.0], [-0.0, -0.0], [np.inf, 1.0], [np.inf, -np.inf], [np.nan] + [1.0] * 100):
        values = np.array(special, dtype)
        got = dtype(0.0) + _numba_kernels._pairwise_block(values, 0, values.size)
        assert np.asarray(got, dtype).tobytes() == np.add.reduce(values).tobytes()
