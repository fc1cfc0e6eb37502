"""lsx.jax.loss(axis_name=) inside jax.shard_map, and plain jax.jit over class-sharded logits, on 4 host devices.

The checks live in tests/jax_parallel_worker.py and run in a subprocess: this process has already started JAX
with one CPU device, and the host device count is fixed when JAX starts.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax")

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run_worker(group: str) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = _ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    done = subprocess.run(
        [sys.executable, os.path.join(_ROOT, "tests", "jax_parallel_worker.py"), group],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-6000:]
    return done.stdout.strip().splitlines()[-1]


def test_shard_map_matches_unsharded_for_every_option_spread_and_reduction():
    """4- and 2-device meshes: loss and gradients (logits, weight, probability target) equal the unsharded
    lsx.jax.loss to float64 round-off, with and without weights and a padded tail masked by class_mask."""
    last = _run_worker("matrix")
    assert last.startswith("ok matrix") and int(last.split()[-1]) >= 36, last


def test_shard_map_labels_errors_named_sharding_and_bitwise_equal_shards():
    """Every option at once (check_vma on and off), softcap/sample_weight/denominator, narrow label dtypes with
    a global K (concrete and traced), traced bad labels/masked labels/weights give NaN, clear errors, the loss
    bitwise equal on every shard, and plain jax.jit over NamedSharding-sharded logits."""
    last = _run_worker("extras")
    assert last.startswith("ok extras") and int(last.split()[-1]) >= 30, last


def test_linear_loss_axis_name_matches_unsharded_for_every_option():
    """lsx.jax.linear_loss(axis_name=) on 4- and 2-device meshes, the kernel's (and bias's, weight's, class_mask's)
    columns split over the axis: loss and gradients (hidden, kernel, bias, weight, probability target,
    sample_weight) equal the unsharded linear_loss and lsx.jax.loss(h @ k + b) for every option, both spreads,
    every reduction, softcap, sample_weight, denominator, check_vma on and off; errors and traced bad values."""
    last = _run_worker("linear")
    assert last.startswith("ok linear") and int(last.split()[-1]) >= 51, last
