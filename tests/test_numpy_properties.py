"""Property-based tests: lsx.numpy (both engines) against the float64 reference on random shapes and options."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lsx.numpy
from lsx import spec
from tests.cases import assert_close


@st.composite
def problems(draw):
    ndim = draw(st.integers(1, 4))
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    k = shape[axis]
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=draw(st.sampled_from([0.1, 1.0, 30.0])), size=shape)
    options = {
        "label_smoothing": draw(st.sampled_from([0.0, 0.1, 0.5, 1.0])),
        "spread": draw(st.sampled_from(["all", "others"])),
        "reduction": draw(st.sampled_from(["none", "sum", "mean"])),
        "z_loss": draw(st.sampled_from([0.0, 1e-3])),
        "normalize": draw(st.booleans()),
        "empty_mean": draw(st.sampled_from(["nan", "zero"])),
        "ignore_index": draw(st.sampled_from([-100, 0, None])),
    }
    if draw(st.booleans()):
        options["weight"] = rng.uniform(0.0, 3.0, size=k)
    valid = np.ones(k, bool)
    if k > 2 and draw(st.booleans()):
        valid[rng.permutation(k)[: k // 2]] = False
        options["class_mask"] = valid
    if options["spread"] == "others" and valid.sum() < 2:
        options["spread"] = "all"
    lead = shape[: axis % ndim] + shape[axis % ndim + 1 :]
    if draw(st.booleans()):
        target = rng.choice(np.flatnonzero(valid), size=lead)
        if options["ignore_index"] is not None:
            target = np.where(rng.random(lead) < 0.3, options["ignore_index"], target)
    else:
        probs = np.zeros(lead + (k,))
        probs[..., valid] = rng.dirichlet(np.ones(int(valid.sum())), size=lead)
        target = np.moveaxis(probs, -1, axis)
    return logits, target, axis, options


@pytest.mark.parametrize("engine", ["default", "pure"])
@settings(max_examples=150, deadline=None)
@given(problem=problems(), dtype=st.sampled_from(["float64", "float32"]))
def test_numpy_backend_matches_reference(engine, problem, dtype):
    logits, target, axis, options = problem
    x = logits.astype(dtype)
    expected = spec.reference_loss(x.astype(np.float64), target, axis=axis, **options)
    expected_grad = spec.reference_grad(x.astype(np.float64), target, axis=axis, **options)
    saved = lsx.numpy._numba_kernel
    if engine == "pure":
        lsx.numpy._numba_kernel = lambda: None
    try:
        value, grad = lsx.numpy.loss_and_grad(x, target, axis=axis, **options)
    finally:
        lsx.numpy._numba_kernel = saved
    assert value.dtype == x.dtype and grad.dtype == x.dtype and grad.shape == x.shape
    assert_close(value, expected, dtype, "loss")
    assert_close(grad, expected_grad, dtype, "gradient")
