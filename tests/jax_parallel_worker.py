"""Checks of ``lsx.jax.loss(..., axis_name=...)`` on 4 (and 2) host devices; run by tests/test_jax_parallel.py.

Run as ``XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/jax_parallel_worker.py [group]``; it
prints ``ok <group> <cases>`` when every check passes and raises otherwise.
"""

from __future__ import annotations

import itertools
import sys

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import lsx.jax  # noqa: E402
from lsx import spec  # noqa: E402

ROWS = 7
RTOL, ATOL = 1e-12, 1e-13


def mesh_of(n: int):
    return jax.make_mesh((n,), ("v",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:n])


def data(k: int, kind: str, seed: int, mask=None, rows=ROWS):
    rng = np.random.default_rng(seed)
    x = rng.normal(scale=2.0, size=(rows, k))
    valid = np.arange(k) if mask is None else np.flatnonzero(mask)
    if kind == "index":
        # labels spread over every shard that holds a valid class, and one ignored row
        t = valid[np.arange(rows) * 5 % len(valid)]
        t[3] = -100
        t = t.astype(np.int64)
    else:
        t = rng.dirichlet(np.ones(len(valid)), size=rows)
        full = np.zeros((rows, k))
        full[:, valid] = t
        t = full
    w = rng.uniform(0.2, 2.0, size=k)
    return x, t, w


def close(got, want, what):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=RTOL, atol=ATOL, err_msg=what)


def run_case(
    n: int,
    kind: str,
    opts: dict,
    *,
    use_weight: bool,
    use_mask: bool,
    check_vma: bool = True,
    seed=0,
    minus_inf_targets: bool = False,
):
    """Loss and gradients (logits, weight, probability target) of the shard_map loss against the unsharded.

    ``minus_inf_targets``: some rows' target logits are −inf (finite only where the target has no mass)."""
    k = 4 * n if not use_mask else 4 * n + 4  # a padded tail: the last shard's last classes are masked
    mask = None
    if use_mask:
        mask = np.ones(k, bool)
        mask[-5:] = False
    x, t, w = data(k, kind, seed, mask)
    if minus_inf_targets:
        x[[0, 2, 5], t[[0, 2, 5]]] = -np.inf
    mesh = mesh_of(n)
    reduction = opts.get("reduction", "mean")
    cot = np.random.default_rng(seed + 1).normal(size=ROWS) if reduction == "none" else 1.0

    def unsharded(x, t, w):
        out = lsx.jax.loss(x, t, weight=w if use_weight else None, class_mask=mask, **opts)
        return jnp.sum(out * cot)

    def body(x, t, w, m):
        return lsx.jax.loss(
            x, t, weight=w if use_weight else None, class_mask=m if use_mask else None, axis_name="v", **opts
        )

    t_spec = P() if kind == "index" else P(None, "v")
    inner = jax.shard_map(
        body, mesh=mesh, in_specs=(P(None, "v"), t_spec, P("v"), P("v")), out_specs=P(), check_vma=check_vma
    )
    m_arg = np.ones(k, bool) if mask is None else mask

    def sharded(x, t, w):
        return jnp.sum(inner(x, t, w, m_arg) * cot)

    argnums = (0, 2) if kind == "index" else (0, 1, 2)
    tj = jnp.asarray(t)
    want, want_grads = jax.jit(jax.value_and_grad(unsharded, argnums=argnums))(jnp.asarray(x), tj, jnp.asarray(w))
    got, got_grads = jax.jit(jax.value_and_grad(sharded, argnums=argnums))(jnp.asarray(x), tj, jnp.asarray(w))
    label = f"n={n} {kind} {opts} weight={use_weight} mask={use_mask} check_vma={check_vma}"
    close(got, want, f"loss {label}")
    ref = spec.reference_loss(x, t, weight=w if use_weight else None, class_mask=mask, **{**opts, "reduction": "none"})
    if reduction == "none":
        close(got, np.sum(ref * cot), f"loss vs reference {label}")
    for name, g, h in zip(
        ("logits", "target", "weight")[: len(argnums)] if kind == "probs" else ("logits", "weight"),
        got_grads,
        want_grads,
    ):
        if name == "weight" and not use_weight:
            continue
        close(g, h, f"grad {name} {label}")
    # the unsharded gradient against the float64 reference (so the comparison above is meaningful)
    close(
        want_grads[0],
        spec.reference_grad(
            x,
            t,
            weight=w if use_weight else None,
            class_mask=mask,
            cotangent=cot if reduction == "none" else None,
            **opts,
        ),
        f"unsharded grad vs reference {label}",
    )


def matrix() -> int:
    cases = 0
    smoothing = [
        dict(label_smoothing=0.0),
        dict(label_smoothing=0.2, spread="all"),
        dict(label_smoothing=0.2, spread="others"),
    ]
    extras = [dict(), dict(z_loss=1e-2), dict(normalize=True), dict(z_loss=1e-2, normalize=True)]
    # every (smoothing, z-loss/KL) combination on 4 devices and half of them on 2, each target kind; the
    # reduction, the weight and the padded class_mask cycle so that every reduction meets every option
    for kind, n in (("index", 4), ("probs", 4), ("index", 2), ("probs", 2)):
        for i, (s, e) in enumerate(itertools.product(smoothing, extras)):
            if n == 2 and i % 2:
                continue
            opts = {**s, **e, "reduction": ("none", "sum", "mean")[(i + (n == 2)) % 3]}
            run_case(n, kind, opts, use_weight=i % 2 == 0 or n == 2, use_mask=i % 4 < 2, seed=i)
            cases += 1
    return cases


def extras() -> int:
    cases = 0
    # every option at once, both target kinds, and check_vma=False
    for kind in ("index", "probs"):
        for check_vma in (True, False):
            opts = dict(label_smoothing=0.15, spread="others", z_loss=1e-3, normalize=True, reduction="mean")
            run_case(4, kind, opts, use_weight=True, use_mask=True, check_vma=check_vma, seed=11)
            cases += 1
    # ε = 1 with spread="others": the target has no mass, so a −inf target logit leaves everything finite
    for n in (4, 2):
        opts = dict(label_smoothing=1.0, spread="others", z_loss=1e-3, reduction="sum")
        run_case(n, "index", opts, use_weight=True, use_mask=n == 4, seed=13, minus_inf_targets=True)
        cases += 1
    # softcap, sample_weight and denominator, where lsx.jax.loss takes them
    import inspect

    params = inspect.signature(lsx.jax.loss).parameters
    if "softcap" in params:
        for kind in ("index", "probs"):
            run_case(4, kind, dict(label_smoothing=0.1, softcap=2.5), use_weight=True, use_mask=True, seed=3)
            cases += 1
    if "sample_weight" in params:
        cases += sample_weight_cases()
    cases += labels_cases()
    cases += errors()
    cases += bitwise_equal_on_every_shard()
    cases += named_sharding()
    return cases


def sample_weight_cases() -> int:
    mesh = mesh_of(4)
    k = 16
    x, t, w = data(k, "index", 5)
    sw = np.random.default_rng(2).uniform(0, 2, size=ROWS)
    cases = 0
    for extra in (dict(), dict(denominator=3.5)):
        opts = dict(label_smoothing=0.1, weight=None, **extra)

        def unsharded(x, w, sw, opts=opts):
            return lsx.jax.loss(x, t, **{**opts, "weight": w}, sample_weight=sw)

        inner = jax.shard_map(
            lambda x, w, sw, opts=opts: lsx.jax.loss(x, t, **{**opts, "weight": w}, sample_weight=sw, axis_name="v"),
            mesh=mesh,
            in_specs=(P(None, "v"), P("v"), P()),
            out_specs=P(),
        )
        args = (jnp.asarray(x), jnp.asarray(w), jnp.asarray(sw))
        want, want_g = jax.value_and_grad(unsharded, argnums=(0, 1, 2))(*args)
        got, got_g = jax.jit(jax.value_and_grad(inner, argnums=(0, 1, 2)))(*args)
        close(got, want, f"sample_weight loss {extra}")
        for g, h, name in zip(got_g, want_g, ("logits", "weight", "sample_weight")):
            close(g, h, f"sample_weight grad {name} {extra}")
        cases += 1
    return cases


def shard(n, fn, in_specs):
    return jax.jit(jax.shard_map(fn, mesh=mesh_of(n), in_specs=in_specs, out_specs=P()))


def labels_cases() -> int:
    """Labels of narrow dtypes with a global K they cannot compare against locally, concrete and traced."""
    cases = 0
    for dtype, k in (("uint8", 300), ("int8", 200), ("int16", 400), ("uint16", 1000), ("uint64", 12), ("int32", 12)):
        x, _, _ = data(k, "index", 1, rows=5)
        top = min(k - 1, int(np.iinfo(dtype).max))  # int8 with K = 200: labels up to 127, on three shards
        y = np.asarray([top, 0, k // 2 + 1, k // 4 + 1, min(3 * k // 4 + 1, top)]).astype(dtype)
        want = lsx.jax.loss(jnp.asarray(x), y, label_smoothing=0.1, reduction="none")
        close(want, spec.reference_loss(x, y, label_smoothing=0.1, reduction="none"), f"unsharded {dtype}")
        concrete = shard(
            4, lambda x, y=y: lsx.jax.loss(x, y, label_smoothing=0.1, reduction="none", axis_name="v"), (P(None, "v"),)
        )
        close(concrete(jnp.asarray(x)), want, f"concrete {dtype} K={k}")
        traced = shard(
            4,
            lambda x, y: lsx.jax.loss(x, y, label_smoothing=0.1, reduction="none", axis_name="v"),
            (P(None, "v"), P()),
        )
        close(traced(jnp.asarray(x), jnp.asarray(y)), want, f"traced {dtype} K={k}")
        cases += 2
    # a traced out-of-range label gives NaN for that element (loss and gradient), not a finite number
    x, _, _ = data(12, "index", 2, rows=4)
    y = jnp.asarray([1, 12, 5, -3])
    f = shard(4, lambda x, y: lsx.jax.loss(x, y, reduction="none", axis_name="v"), (P(None, "v"), P()))
    out = np.asarray(f(jnp.asarray(x), y))
    assert np.isnan(out[1]) and np.isnan(out[3]) and np.isfinite(out[[0, 2]]).all(), out
    g = jax.grad(lambda x: jnp.sum(f(x, y)))(jnp.asarray(x))
    assert np.isnan(g[1]).all() and np.isfinite(np.asarray(g)[[0, 2]]).all(), g
    # a traced label on a class that a traced class_mask removes: NaN, wherever the class lives
    mask = np.ones(12, bool)
    mask[[2, 10]] = False
    f = shard(
        4,
        lambda x, y, m: lsx.jax.loss(x, y, class_mask=m, reduction="none", axis_name="v"),
        (P(None, "v"), P(), P("v")),
    )
    out = np.asarray(f(jnp.asarray(x), jnp.asarray([10, 1, 2, 11]), mask))
    assert np.isnan(out[[0, 2]]).all() and np.isfinite(out[[1, 3]]).all(), out
    # a negative traced weight on one shard makes everything NaN
    w = np.ones(12)
    w[7] = -1.0
    f = shard(4, lambda x, y, w: lsx.jax.loss(x, y, weight=w, axis_name="v"), (P(None, "v"), P(), P("v")))
    assert np.isnan(f(jnp.asarray(x), jnp.asarray([1, 2, 3, 4]), w))
    return cases + 3


def errors() -> int:
    x, _, _ = data(12, "index", 3, rows=4)
    xj = jnp.asarray(x)

    def expect(error, match, fn, *args):
        try:
            fn(*args)
        except error as e:
            assert match in str(e), (match, str(e))
        else:
            raise AssertionError(f"no {error.__name__} ({match})")

    # a concrete label beyond the global K names its value; one beyond the local K is fine
    expect(
        ValueError,
        "label 12",
        shard(4, lambda x: lsx.jax.loss(x, np.asarray([0, 12, 1, 2]), axis_name="v"), (P(None, "v"),)),
        xj,
    )
    close(
        shard(4, lambda x: lsx.jax.loss(x, np.asarray([0, 11, 4, 7]), axis_name="v"), (P(None, "v"),))(xj),
        lsx.jax.loss(xj, np.asarray([0, 11, 4, 7])),
        "labels owned by every shard",
    )
    # labels split over the axis instead of replicated
    expect(
        ValueError,
        "replicated",
        shard(4, lambda x, y: lsx.jax.loss(x, y, axis_name="v"), (P(None, "v"), P("v"))),
        xj,
        jnp.arange(16) % 12,
    )
    # logits replicated over the axis instead of split
    expect(
        ValueError,
        "replicated over it",
        shard(4, lambda x: lsx.jax.loss(x, np.zeros(4, int), axis_name="v"), (P(),)),
        xj[:, :3],
    )
    # an axis name the shard_map does not bind
    expect(
        ValueError,
        "axis_name='w'",
        shard(4, lambda x: lsx.jax.loss(x, np.zeros(4, int), axis_name="w"), (P(None, "v"),)),
        xj,
    )
    # a concrete class_mask slice (the same on every shard): checked with the global count
    expect(
        ValueError,
        "at least one valid class",
        shard(
            4, lambda x: lsx.jax.loss(x, np.zeros(4, int), class_mask=np.zeros(3, bool), axis_name="v"), (P(None, "v"),)
        ),
        xj,
    )
    keep = np.asarray([True, True, False])
    close(
        shard(
            4,
            lambda x: lsx.jax.loss(x, np.asarray([0, 4, 7, 10]), class_mask=keep, label_smoothing=0.2, axis_name="v"),
            (P(None, "v"),),
        )(xj),
        lsx.jax.loss(xj, np.asarray([0, 4, 7, 10]), class_mask=np.tile(keep, 4), label_smoothing=0.2),
        "a concrete class_mask slice",
    )
    expect(
        ValueError,
        "class_mask marks as absent",
        shard(4, lambda x: lsx.jax.loss(x, np.asarray([0, 5, 1, 2]), class_mask=keep, axis_name="v"), (P(None, "v"),)),
        xj,
    )
    return 7


def bitwise_equal_on_every_shard() -> int:
    """Each shard's own loss (gathered with out_specs=P("v")) is bitwise the same."""
    mesh = mesh_of(4)
    x, t, w = data(16, "index", 9)

    def body(x, w):
        out = lsx.jax.loss(x, t, weight=w, label_smoothing=0.1, z_loss=1e-3, reduction="none", axis_name="v")
        return lax.pvary(out, "v")[None] if hasattr(lax, "pvary") else out[None]

    per_shard = np.asarray(
        jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(None, "v"), P("v")), out_specs=P("v")))(
            jnp.asarray(x), jnp.asarray(w)
        )
    )
    assert per_shard.shape == (4, ROWS)
    for i in range(1, 4):
        assert np.array_equal(per_shard[i], per_shard[0]), (i, per_shard)
    return 1


def named_sharding() -> int:
    """Plain jax.jit over logits sharded on the class axis: XLA's partitioner gives the unsharded result."""
    cases = 0
    for n in (4, 2):
        mesh = mesh_of(n)
        for kind in ("index", "probs"):
            mask = np.ones(16, bool)
            mask[-5:] = False
            x, t, w = data(16, kind, 4, mask)
            opts = dict(label_smoothing=0.1, spread="others", z_loss=1e-3, normalize=True, class_mask=mask)
            xs = jax.device_put(jnp.asarray(x), NamedSharding(mesh, P(None, "v")))
            ws = jax.device_put(jnp.asarray(w), NamedSharding(mesh, P("v")))
            ts = (
                jnp.asarray(t) if kind == "index" else jax.device_put(jnp.asarray(t), NamedSharding(mesh, P(None, "v")))
            )

            def f(x, w, t, opts=opts):
                return lsx.jax.loss(x, t, weight=w, **opts)

            got, (gx, gw) = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(xs, ws, ts)
            want, (hx, hw) = jax.value_and_grad(f, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(w), jnp.asarray(t))
            assert len(xs.sharding.device_set) == n
            close(got, want, f"NamedSharding loss n={n} {kind}")
            close(gx, hx, f"NamedSharding grad n={n} {kind}")
            close(gw, hw, f"NamedSharding weight grad n={n} {kind}")
            close(want, spec.reference_loss(x, t, weight=w, **opts), f"reference n={n} {kind}")
            cases += 1
    return cases


def run_linear_case(
    n: int,
    kind: str,
    opts: dict,
    *,
    use_weight: bool,
    use_mask: bool,
    use_bias=True,
    check_vma=True,
    chunk_size=3,
    extra_args=(),
    seed=0,
    materialised_too=False,
) -> None:
    """lsx.jax.linear_loss(axis_name="v") with the kernel's columns split over the axis, against the unsharded
    linear_loss and lsx.jax.loss(h @ k + b): loss and every gradient (hidden, kernel, bias, weight, probability
    target, sample_weight)."""
    hidden_size = 5
    k = 4 * n if not use_mask else 4 * n + 4
    mask = None
    if use_mask:
        mask = np.ones(k, bool)
        mask[-5:] = False
    rng = np.random.default_rng(seed + 100)
    _, t, w = data(k, kind, seed, mask)
    h = rng.normal(size=(ROWS, hidden_size))
    kern = rng.normal(scale=0.8, size=(hidden_size, k))
    b = rng.normal(scale=0.5, size=k)
    sw = rng.uniform(0.2, 2.0, size=ROWS) if "sample_weight" in extra_args else None
    reduction = opts.get("reduction", "mean")
    cot = rng.normal(size=ROWS) if reduction == "none" else 1.0
    kw = dict(opts)
    if "denominator" in extra_args:
        kw["denominator"] = 4.5

    def common(w, sw):
        return dict(weight=w if use_weight else None, sample_weight=sw, **kw)

    def unsharded(h, kern, b, t, w, sw):
        out = lsx.jax.linear_loss(h, kern, t, bias=b if use_bias else None, class_mask=mask, **common(w, sw))
        return jnp.sum(out * cot)

    def materialised(h, kern, b, t, w, sw):
        z = h @ kern + (b if use_bias else 0)
        return jnp.sum(lsx.jax.loss(z, t, class_mask=mask, **common(w, sw)) * cot)

    def body(h, kern, b, t, w, m, sw):
        return lsx.jax.linear_loss(
            h,
            kern,
            t,
            bias=b if use_bias else None,
            class_mask=m if use_mask else None,
            chunk_size=chunk_size,
            axis_name="v",
            **common(w, sw),
        )

    t_spec = P() if kind == "index" else P(None, "v")
    inner = jax.shard_map(
        body,
        mesh=mesh_of(n),
        in_specs=(P(), P(None, "v"), P("v"), t_spec, P("v"), P("v"), P()),
        out_specs=P(),
        check_vma=check_vma,
    )
    m_arg = jnp.asarray(np.ones(k, bool) if mask is None else mask)

    def sharded(h, kern, b, t, w, sw):
        return jnp.sum(inner(h, kern, b, t, w, m_arg, sw) * cot)

    argnums = [0, 1, 2]
    if kind == "probs":
        argnums.append(3)
    if use_weight:
        argnums.append(4)
    if sw is not None:
        argnums.append(5)
    args = tuple(jnp.asarray(a) for a in (h, kern, b, t, w, np.ones(ROWS) if sw is None else sw))
    if sw is None:
        args = args[:5] + (None,)
    label = f"linear n={n} {kind} {opts} {extra_args} weight={use_weight} mask={use_mask} check_vma={check_vma}"
    functions = (sharded, unsharded, materialised) if materialised_too else (sharded, unsharded)
    results = [jax.jit(jax.value_and_grad(f, argnums=tuple(argnums)))(*args) for f in functions]
    (got, got_g), (want, want_g) = results[:2]
    close(got, want, f"loss {label}")
    for i, g, gw in zip(argnums, got_g, want_g):
        close(g, gw, f"grad {i} {label}")
    if materialised_too:
        mat, mat_g = results[2]
        close(want, mat, f"unsharded linear vs materialised {label}")
        for i, gw, gm in zip(argnums, want_g, mat_g):
            close(gw, gm, f"unsharded grad {i} vs materialised {label}")


def linear() -> int:
    """linear_loss(axis_name=) for every option, both spreads, every reduction, 4 and 2 shards."""
    cases = 0
    smoothing = [
        dict(label_smoothing=0.0),
        dict(label_smoothing=0.2, spread="all"),
        dict(label_smoothing=0.2, spread="others"),
    ]
    extras = [dict(), dict(z_loss=1e-2), dict(normalize=True), dict(z_loss=1e-2, normalize=True)]
    # every (smoothing, z-loss/KL) combination with integer labels on 4 devices, half of them with a probability
    # target and a quarter on 2 devices (each compiles two or three programs); the reduction, the weight and the
    # padded class_mask cycle as in matrix(), and a third of the 4-device cases also check the unsharded
    # linear_loss against lsx.jax.loss of the materialised logits
    for kind, n, step, offset in (("index", 4, 1, 0), ("probs", 4, 2, 0), ("index", 2, 4, 0), ("probs", 2, 4, 2)):
        for i, (s, e) in enumerate(itertools.product(smoothing, extras)):
            if (i - offset) % step:
                continue
            opts = {**s, **e, "reduction": ("none", "sum", "mean")[(i + (n == 2)) % 3]}
            use_weight, use_mask = i % 2 == 0 or n == 2, i % 4 < 2
            materialised_too = n == 4 and i % 3 == 0
            run_linear_case(
                n, kind, opts, use_weight=use_weight, use_mask=use_mask, seed=i, materialised_too=materialised_too
            )
            cases += 1
    every = dict(label_smoothing=0.15, spread="others", z_loss=1e-3, normalize=True)
    for kind in ("index", "probs"):
        # every option at once, check_vma on and off, the default chunk size, no bias
        for check_vma in (True, False):
            run_linear_case(4, kind, every, use_weight=True, use_mask=True, check_vma=check_vma, seed=11)
        run_linear_case(4, kind, {**every, "reduction": "none"}, use_weight=True, use_mask=True, check_vma=False)
        run_linear_case(4, kind, dict(label_smoothing=0.1), use_weight=True, use_mask=False, chunk_size=None)
        run_linear_case(2, kind, dict(label_smoothing=0.1), use_weight=False, use_mask=True, use_bias=False, seed=4)
        # softcap, sample_weight and denominator
        run_linear_case(4, kind, dict(label_smoothing=0.1, softcap=2.5), use_weight=True, use_mask=True, seed=3)
        for extra, reduction in (
            (("sample_weight",), "mean"),
            (("sample_weight",), "none"),
            (("denominator",), "mean"),
        ):
            opts = dict(label_smoothing=0.1, z_loss=1e-3, reduction=reduction)
            run_linear_case(
                4, kind, opts, use_weight=True, use_mask=True, extra_args=extra + ("sample_weight",), seed=6
            )
        cases += 9
    return cases + linear_labels_and_errors()


def linear_labels_and_errors() -> int:
    """Narrow labels against the global K, traced bad values give NaN, and clear errors."""
    rng = np.random.default_rng(8)
    h = jnp.asarray(rng.normal(size=(5, 3)))
    kern = jnp.asarray(rng.normal(size=(3, 300)))
    y = np.asarray([299, 0, 151, 76, 226], np.uint16)
    want = lsx.jax.linear_loss(h, kern, y, label_smoothing=0.1, reduction="none")
    for labels in (y, y.astype(np.int16)):
        f = shard(
            4,
            lambda h, k, y: lsx.jax.linear_loss(h, k, y, label_smoothing=0.1, reduction="none", axis_name="v"),
            (P(), P(None, "v"), P()),
        )
        close(f(h, kern, jnp.asarray(labels)), want, f"traced {labels.dtype} K=300")
        g = shard(
            4,
            lambda h, k, y=labels: lsx.jax.linear_loss(h, k, y, label_smoothing=0.1, reduction="none", axis_name="v"),
            (P(), P(None, "v")),
        )
        close(g(h, kern), want, f"concrete {labels.dtype} K=300")
    k12 = kern[:, :12]
    # a traced out-of-range label: NaN for that element, loss and hidden gradient
    f = shard(
        4, lambda h, k, y: lsx.jax.linear_loss(h, k, y, reduction="none", axis_name="v"), (P(), P(None, "v"), P())
    )
    yb = jnp.asarray([1, 12, 5, -3, 11])
    out = np.asarray(f(h, k12, yb))
    assert np.isnan(out[[1, 3]]).all() and np.isfinite(out[[0, 2, 4]]).all(), out
    gh = np.asarray(jax.grad(lambda h: jnp.sum(f(h, k12, yb)))(h))
    assert np.isnan(gh[[1, 3]]).all() and np.isfinite(gh[[0, 2, 4]]).all(), gh
    # a negative traced weight on one shard: everything NaN
    w = np.ones(12)
    w[7] = -1.0
    f = shard(
        4,
        lambda h, k, w: lsx.jax.linear_loss(h, k, np.asarray([1, 2, 3, 4, 5]), weight=w, axis_name="v"),
        (P(), P(None, "v"), P("v")),
    )
    assert np.isnan(f(h, k12, w))

    def expect(match, fn, *args):
        try:
            fn(*args)
        except ValueError as e:
            assert match in str(e), (match, str(e))
        else:
            raise AssertionError(f"no ValueError ({match})")

    labels = np.asarray([0, 11, 4, 7, 1])
    expect(
        "label 12",
        shard(
            4, lambda h, k: lsx.jax.linear_loss(h, k, np.asarray([0, 12, 1, 2, 3]), axis_name="v"), (P(), P(None, "v"))
        ),
        h,
        k12,
    )
    expect(
        "replicated over it",
        shard(4, lambda h, k: lsx.jax.linear_loss(h, k, labels, axis_name="v"), (P(), P())),
        h,
        k12[:, :3],
    )
    expect(
        "hidden holds the whole rows",
        shard(4, lambda h, k: lsx.jax.linear_loss(h, k, labels[:2], axis_name="v"), (P("v"), P(None, "v"))),
        jnp.concatenate([h[:4], h[:4]]),
        k12,
    )
    expect(
        "axis_name='w'",
        shard(4, lambda h, k: lsx.jax.linear_loss(h, k, labels, axis_name="w"), (P(), P(None, "v"))),
        h,
        k12,
    )
    return 9


if __name__ == "__main__":
    assert len(jax.devices()) >= 4, "run with XLA_FLAGS=--xla_force_host_platform_device_count=4"
    group = sys.argv[1] if len(sys.argv) > 1 else "all"
    count = 0
    if group in ("matrix", "all"):
        count += matrix()
    if group in ("extras", "all"):
        count += extras()
    if group in ("linear", "all"):
        count += linear()
    print(f"ok {group} {count}")
