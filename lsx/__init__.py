"""lsx: one exact definition of label-smoothed cross-entropy, fast in every framework.

``import lsx`` loads no framework. Pick a backend by its import path::

    from lsx.numpy import loss        # NumPy (Numba kernels when installed)
    from lsx.torch import loss        # PyTorch, class axis 1, plus lsx.torch.CrossEntropyLoss
    from lsx.jax import loss          # JAX, jit/vmap/grad
    from lsx.tensorflow import loss   # TensorFlow, tf.function and XLA
    from lsx.keras import SparseCategoricalCrossentropy, CategoricalCrossentropy

The semantics live in :mod:`lsx.spec`.
"""

from lsx.spec import CONVENTIONS, Options, reference_grad, reference_loss, resolve_options

__version__ = "0.2.0"

__all__ = ["CONVENTIONS", "Options", "__version__", "reference_grad", "reference_loss", "resolve_options"]
