"""Doctests run over the package and the README; a backend module is collected only when its framework is."""

import importlib.util

_FRAMEWORK_OF = {
    "lsx/torch.py": "torch",
    "lsx/_torch_function.py": "torch",
    "lsx/jax.py": "jax",
    "lsx/_jax_engine.py": "jax",
    "lsx/tensorflow.py": "tensorflow",
    "lsx/keras.py": "keras",
    "lsx/_numba_kernels.py": "numba",
    "tests/identify_zoo.py": "torch",
}

collect_ignore = [path for path, module in _FRAMEWORK_OF.items() if importlib.util.find_spec(module) is None]
