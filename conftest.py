"""Doctests run over the package and the README; a backend subpackage is collected only when its framework is."""

import importlib.util

from lsx import _compat

# Collection imports lsx/keras (TensorFlow) before lsx/torch, and tests call torch.compile: with Triton installed
# it must be loaded before TensorFlow, in this process and in every xdist worker (see lsx._compat).
_compat.load_triton_first()

_FRAMEWORK_OF = {
    "lsx/torch": "torch",
    "lsx/transformers": "transformers",
    "lsx/jax": "jax",
    "lsx/tensorflow": "tensorflow",
    "lsx/keras": "keras",
    "lsx/numpy/_numba.py": "numba",
    "lsx/torch/_engines/triton.py": "triton",
    "tests/identify_zoo.py": "torch",
}

collect_ignore = [path for path, module in _FRAMEWORK_OF.items() if importlib.util.find_spec(module) is None]
