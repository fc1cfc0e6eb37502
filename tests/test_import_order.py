"""Any order of lsx imports is safe with Triton installed (Triton loaded after TensorFlow aborts the process).

Each case runs in a fresh interpreter: it imports lsx backends in a given order, then calls ``torch.compile`` on a
tiny function (which imports Triton) and TensorFlow. Without lsx loading Triton before TensorFlow, a case where
``lsx.tensorflow`` or ``lsx.keras`` comes first dies by SIGABRT at the compile.

Coverage. The 120 orders of the five backends are too many to run, and each case pays for importing every
framework. What can go wrong is one module loading a native library (TensorFlow, Triton, Numba's LLVM, jaxlib)
that collides with one loaded just before it, or a module that imports TensorFlow without loading Triton first,
which only shows when nothing before it loaded Triton. So the cases are six orders, each a process of its own,
in which every ordered pair of backends is adjacent at least once and every backend comes first at least once
(:func:`test_the_orders_cover_every_adjacent_pair_and_every_first`): a missing call cannot be hidden, since the
module that lacks it either comes first or follows one that cannot load Triton after it. Two of them, one full
order and its reverse, compile with Inductor (the default backend, which also builds and loads C++ code); the
others with ``backend="eager"``: Dynamo imports Triton whatever the backend, which is what aborts.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lsx import _compat

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("lsx.numpy", "lsx.torch", "lsx.jax", "lsx.tensorflow", "lsx.keras")
FULL_ORDER = ("lsx.keras", "lsx.numpy", "lsx.jax", "lsx.tensorflow", "lsx.torch")
FULL_ORDERS = [FULL_ORDER, FULL_ORDER[::-1]]  # compiled with Inductor
# with the two above, every ordered pair adjacent at least once and every backend first at least once
EAGER_ORDERS = [
    ("lsx.numpy", "lsx.torch", "lsx.jax", "lsx.tensorflow", "lsx.keras"),
    ("lsx.numpy", "lsx.torch", "lsx.keras", "lsx.tensorflow", "lsx.jax"),
    ("lsx.jax", "lsx.keras", "lsx.torch", "lsx.numpy", "lsx.tensorflow"),
    ("lsx.tensorflow", "lsx.numpy", "lsx.keras", "lsx.jax", "lsx.torch"),
]

SCRIPT = textwrap.dedent(
    """
    import importlib, sys, warnings
    warnings.simplefilter("error", RuntimeWarning)  # lsx.torch's import-order warning must not fire
    for name in sys.argv[2:]:
        importlib.import_module(name)
    import torch
    compiled = torch.compile(lambda x: torch.sin(2 * x) + 1, backend=sys.argv[1])
    value = float(compiled(torch.ones(4)).sum())
    assert "triton" in sys.modules, "torch.compile did not import triton: the case tests nothing"
    import tensorflow as tf
    print("ok", value, float(tf.reduce_sum(tf.ones(4))))
    """
)

_missing = [
    name for name in ("triton", "torch", "jax", "tensorflow", "keras") if importlib.util.find_spec(name) is None
]
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"needs {', '.join(_missing)} installed")


def _run(*argv: str, code: str = SCRIPT, pythonpath: list[str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", KERAS_BACKEND="tensorflow")
    env["PYTHONPATH"] = os.pathsep.join([*(pythonpath or []), str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def _check(done: subprocess.CompletedProcess, order: tuple[str, ...]) -> None:
    assert done.returncode == 0, (
        f"import order {' → '.join(order)} then torch.compile and TensorFlow: exit {done.returncode}\n"
        f"{done.stderr[-3000:]}"
    )
    word, compiled, tensorflow = done.stdout.split()
    assert word == "ok" and float(tensorflow) == 4.0, done.stdout
    assert float(compiled) == pytest.approx(4 * (math.sin(2.0) + 1), rel=1e-6)


def test_the_orders_cover_every_adjacent_pair_and_every_first():
    orders = FULL_ORDERS + EAGER_ORDERS
    adjacent = {pair for order in orders for pair in itertools.pairwise(order)}
    assert adjacent == set(itertools.permutations(BACKENDS, 2))
    assert {order[0] for order in orders} == set(BACKENDS)
    assert all(sorted(order) == sorted(BACKENDS) for order in orders)


@pytest.mark.parametrize("order", EAGER_ORDERS, ids=lambda o: "-".join(name[4:] for name in o))
def test_orders_then_torch_compile_and_tensorflow(order):
    _check(_run("eager", *order), order)


@pytest.mark.parametrize("order", FULL_ORDERS, ids=lambda o: "-".join(name[4:] for name in o))
def test_full_orders_then_inductor_compile_and_tensorflow(order):
    _check(_run("inductor", *order), order)


def test_lsx_torch_after_tensorflow_warns_and_keeps_triton_out():
    """TensorFlow imported before anything of lsx: lsx.torch cannot load Triton first; it keeps Triton out (an
    ImportError instead of an abort), warns with the cause and the fix, and CPU torch.compile still works."""
    code = textwrap.dedent(
        """
        import warnings
        import tensorflow as tf
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import lsx.torch
        import torch
        x = torch.zeros(2, 4)
        compiled = torch.compile(lambda x: lsx.torch.loss(x, torch.tensor([0, 3])))
        value = float(compiled(x))
        try:
            import triton
        except ImportError:
            blocked = True
        else:
            blocked = False
        print(f"{value} {blocked} {float(tf.reduce_sum(tf.ones(3)))}")
        print("\\n".join(f"{w.category.__name__}: {w.message}" for w in caught))
        """
    )
    done = _run(code=code)
    assert done.returncode == 0, done.stderr[-3000:]
    first, *warned = done.stdout.splitlines()
    value, blocked, tensorflow = first.split()
    assert float(value) == pytest.approx(math.log(4.0), rel=1e-6)
    assert (blocked, tensorflow) == ("True", "3.0")
    assert warned == [f"RuntimeWarning: {_compat.TRITON_BLOCKED}"]
    for words in ("TensorFlow was imported before Triton", "abort", "import lsx.torch or triton before"):
        assert words in _compat.TRITON_BLOCKED


def test_no_warning_when_triton_is_already_loaded():
    code = "import warnings; warnings.simplefilter('error'); import triton, tensorflow, lsx.torch; print('ok')"
    done = _run(code=code)
    assert done.returncode == 0 and done.stdout.split() == ["ok"], done.stderr[-3000:]


def test_a_broken_triton_install_is_tolerated(tmp_path):
    broken = tmp_path / "triton"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('libtriton.so: undefined symbol')\n")
    code = textwrap.dedent(
        """
        import sys, warnings
        warnings.simplefilter("error", RuntimeWarning)  # Triton could not load: nothing to warn about
        import lsx.tensorflow, lsx.keras, lsx.torch, tensorflow as tf
        assert "triton" not in sys.modules
        print("ok", float(lsx.tensorflow.loss(tf.zeros((2, 4)), tf.constant([0, 3]))))
        """
    )
    done = _run(code=code, pythonpath=[str(tmp_path)])
    assert done.returncode == 0, done.stderr[-3000:]
    word, value = done.stdout.split()
    assert word == "ok" and float(value) == pytest.approx(math.log(4.0), rel=1e-6), done.stdout
