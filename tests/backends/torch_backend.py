"""lsx.torch: eager, and through ``torch.compile(fullgraph=True)`` on a small wrapper."""

from __future__ import annotations

import numpy as np

REQUIRES = ("torch",)
DTYPES = ("float64", "float32", "float16", "bfloat16")
MODES = ("eager", "compiled")

_compiled = {}


def _call(x, target, options, axis):
    import lsx.torch

    return lsx.torch.loss(x, target, axis=axis, **options)


def _compiled_call():
    import torch

    # one compiled wrapper; dynamo re-specialises per option set (constants) and shape
    if "fn" not in _compiled:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 256)
        _compiled["fn"] = torch.compile(_call, fullgraph=True, backend="aot_eager", dynamic=False)
    return _compiled["fn"]


def run(logits, target, options, *, axis, dtype, mode):
    import torch

    torch_dtype = getattr(torch, dtype)
    # copies (torch.tensor): the given arrays may be read-only and are never written; torch has every
    # integer label dtype (int8…int64, uint8…uint64), so the target keeps its dtype
    x = torch.tensor(logits).to(torch_dtype).requires_grad_(True)
    t = torch.tensor(np.asarray(target))
    assert t.dtype == getattr(torch, np.asarray(target).dtype.name), (t.dtype, np.asarray(target).dtype)
    options = {
        name: torch.tensor(np.asarray(value)) if name in ("weight", "class_mask", "sample_weight") else value
        for name, value in options.items()
    }
    fn = _call if mode == "eager" else _compiled_call()
    value = fn(x, t, options, axis)
    assert isinstance(value, torch.Tensor) and value.dtype == torch_dtype, (type(value), value.dtype)
    (grad,) = torch.autograd.grad(value.sum(), x)
    assert grad.dtype == torch_dtype and grad.shape == x.shape
    return value.detach().to(torch.float64).numpy(), grad.to(torch.float64).numpy()
