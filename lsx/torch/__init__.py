"""PyTorch backend: drop-ins for ``torch.nn.functional.cross_entropy`` and ``torch.nn.CrossEntropyLoss``.

Same argument names, order and defaults as torch (classes on dim 1, or dim 0 for a (C,) input), plus the lsx
options keyword-only. The loss and its gradient come from one fused op (:mod:`lsx.torch._function`) that works
under ``torch.compile`` and saves a single logits-sized gradient buffer for the backward pass.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

from lsx import _compat

# torch's Dynamo (imported below, and by torch.compile) imports Triton when it is installed: load it now, before
# any TensorFlow. If TensorFlow came first, loading Triton would abort the process: keep it out and say so.
if not _compat.load_triton_first():
    _compat.block_triton()
    warnings.warn(_compat.TRITON_BLOCKED, RuntimeWarning, stacklevel=2)
try:
    import torch
    from torch import nn
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("lsx.torch needs PyTorch: pip install 'lsx[torch]'") from error

from lsx import spec
from lsx.spec import default
from lsx.torch import _function as _torch_function
from lsx.torch import _plain
from lsx.torch._linear import LinearCrossEntropyLoss, linear_loss

__all__ = ["CrossEntropyLoss", "LinearCrossEntropyLoss", "linear_loss", "loss"]


def loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int | None = default(-100),
    reduce: bool | None = None,
    reduction: spec.Reduction = default("mean"),
    label_smoothing: float = default(0.0),
    *,
    axis: int | None = None,
    spread: spec.Spread = default("all"),
    z_loss: float = default(0.0),
    normalize: bool = default(False),
    class_mask: Any = None,
    empty_mean: spec.EmptyMean = default("nan"),
    softcap: float | None = None,
    sample_weight: Any = None,
    denominator: Any = None,
    convention: str | None = None,
    process_group: Any = None,
) -> torch.Tensor:
    if (
        weight is None
        and class_mask is None
        and sample_weight is None
        and denominator is None
        and softcap is None
        and axis is None
        and convention is None
        and process_group is None
        and size_average is None
        and reduce is None
    ):  # the usual call: a short path when the tensors allow it (see lsx.torch._plain)
        value = _plain.cross_entropy(
            input, target, ignore_index, reduction, label_smoothing, spread, z_loss, normalize, empty_mean
        )
        if value is not None:
            return value
    if size_average is not None or reduce is not None:
        reduction = _legacy_reduction(size_average, reduce)
    opts = _options(
        convention,
        label_smoothing=label_smoothing,
        spread=spread,
        ignore_index=ignore_index,
        z_loss=z_loss,
        normalize=normalize,
        reduction=reduction,
        empty_mean=empty_mean,
        softcap=softcap,
    )
    if softcap is not None and not torch.compiler.is_compiling():  # validated above: a positive finite number
        # (under torch.compile the op checks it when it runs: float() would make the value a trace constant)
        spec.check_softcap(float(softcap), input.dtype)
    if denominator is not None:
        spec.check_real_number_type(denominator)
    if process_group is not None:
        from lsx.torch import _parallel

        given = {"sample_weight": sample_weight, "denominator": denominator}
        extra = {name: value for name, value in given.items() if value is not None}
        return _parallel.cross_entropy(input, target, opts, axis, weight, class_mask, process_group, **extra)
    return _torch_function.cross_entropy(input, target, opts, axis, weight, class_mask, sample_weight, denominator)


loss.__doc__ = """Label-smoothed cross-entropy, a drop-in for ``torch.nn.functional.cross_entropy``.

.. math::

    \\ell_i = \\sum_c w_c q_{ic} (\\mathrm{LSE}_i - x_{ic}) + s\\, w_{y_i} \\mathrm{LSE}_i^2
              - [\\text{normalize}]\\, H_w(q_i)

with q = (1−ε)·onehot(y) + ε/K (``spread="all"``, torch's) or q_y = 1−ε, q_{c≠y} = ε/(K−1)
(``spread="others"``). The definition and every option are those of :mod:`lsx.spec` (see ``lsx.numpy.loss``).

Args:
    input: logits (N, C), (N, C, d1, …, dk) or (C,); float64/32/16 or bfloat16 (accumulated in float32).
    target: integer labels (input's shape without the class dim) or probabilities (input's shape).
    weight, ignore_index, reduction, label_smoothing: as in torch (``weight`` may be positional; a
        ``label_smoothing`` outside [0, 1] is an error). ``size_average``/``reduce`` are deprecated, as in torch.
    axis: the class dim; None (default) is torch's rule: 1, or 0 for a 1-D input.
    spread, z_loss, normalize, class_mask, empty_mean, convention: the lsx options (keyword-only).
    softcap: c > 0 or None: the logits become c·tanh(x/c) first (the gradient gains 1 − tanh²(x/c)).
    sample_weight: one weight >= 0 per element (the per-element loss's shape), or None: multiplies each
        element's loss; the mean divides by Σ sample_weight·w_y. Differentiable when it requires grad.
    denominator: ``reduction="mean"`` only: a number or 0-d tensor (kept on its device, never read on the
        host there) dividing the summed loss instead of the local one; 0 follows ``empty_mean``.
        Differentiable when it requires grad.
    process_group: a ``torch.distributed`` group over which the class axis is split (vocabulary-parallel),
        in rank order: ``input``, ``weight`` and ``class_mask`` (and probability targets) are this rank's slice
        of the classes (uneven slices and empty ones are fine), integer labels are the global ones. The loss is
        the single-device one (global class count in the smoothing), bitwise identical on every rank; each
        rank's gradient is its slice of the single-device gradient (the backward does not communicate). Two
        small collectives per call, never of logits (see :mod:`lsx.torch._parallel`); eager calls only, and
        ``sample_weight``/``denominator`` are not differentiated with a group.

Returns:
    The loss in the input's dtype: a scalar, or the target's shape for ``reduction="none"``. Differentiable
    once in ``input``, ``sample_weight`` and ``denominator`` (no double backward; not in the target).

Raises:
    ValueError: a label outside [0, C) other than ``ignore_index`` (CPU tensors; on accelerators the check
        would synchronise, so such an element's loss is NaN instead), or an invalid option.

Example:
    >>> import torch, lsx.torch
    >>> x = torch.tensor([[0.0, 0.2, 0.7, 0.1, 0.0], [0.0, 0.9, 0.2, 0.2, 1.0], [1.0, 0.2, 0.7, 0.9, 1.0]])
    >>> y = torch.tensor([2, 1, 0])
    >>> round(lsx.torch.loss(x, y, label_smoothing=0.3).item(), 4)
    1.3883
    >>> round(lsx.torch.loss(x, y, label_smoothing=0.3, spread="others").item(), 4)
    1.4178
"""


def _options(convention: str | None, **given: Any) -> spec.Options | _torch_function.TracedOptions:
    """``spec.resolve_options`` for the scalar options (weight and class_mask travel as tensors).

    Under ``torch.compile`` the string and bool options are compile-time constants, resolved at trace time;
    the numeric ones (``label_smoothing``, ``z_loss``, ``ignore_index``) may change between calls (a
    schedule, a module attribute) and dynamo then traces them as symbols, so they are handed to the fused op
    as values and resolved (and validated) when it runs.
    """
    if not torch.compiler.is_compiling():
        try:
            return _resolve_cached(convention, *given.values(), names=tuple(given))
        except TypeError:  # an unhashable value: resolve uncached (and raise the spec's error, if any)
            return spec.resolve_options(convention, **given)
    return _torch_function.traced_options(convention, given)


@functools.lru_cache(maxsize=256, typed=True)
def _resolve_cached(convention: str | None, *values: Any, names: tuple[str, ...]) -> spec.Options:
    """Resolution is a pure function of the scalar options: most calls repeat the same few.

    ``typed`` keeps apart what compares equal but resolves differently: a marked default and the same value
    passed explicitly (a convention overrides only the former), ``True`` and ``1``, ``0`` and ``0.0``.
    """
    return spec.resolve_options(convention, **dict(zip(names, values)))


def _legacy_reduction(size_average: bool | None, reduce: bool | None) -> str:
    """torch's mapping of the deprecated ``size_average``/``reduce`` flags, with torch's warning."""
    size_average = True if size_average is None else size_average
    reduce = True if reduce is None else reduce
    reduction = "none" if not reduce else "mean" if size_average else "sum"
    warnings.warn(
        f"size_average and reduce args will be deprecated, please use reduction='{reduction}' instead.",
        UserWarning,
        stacklevel=3,
    )
    return reduction


class CrossEntropyLoss(nn.Module):
    """A drop-in for ``torch.nn.CrossEntropyLoss`` computing :func:`lsx.torch.loss`.

    Same constructor arguments, order and defaults as torch (``weight`` is registered as a buffer), and the
    lsx options keyword-only.

    Example:
        >>> import torch, lsx.torch
        >>> criterion = lsx.torch.CrossEntropyLoss(label_smoothing=0.1, spread="others")
        >>> criterion
        CrossEntropyLoss(ignore_index=-100, reduction='mean', label_smoothing=0.1, spread='others')
        >>> criterion(torch.zeros(2, 4), torch.tensor([0, 3])).shape
        torch.Size([])
    """

    def __init__(
        self,
        weight: torch.Tensor | None = None,
        size_average: bool | None = None,
        ignore_index: int | None = default(-100),
        reduce: bool | None = None,
        reduction: spec.Reduction = default("mean"),
        label_smoothing: float = default(0.0),
        *,
        spread: spec.Spread = default("all"),
        z_loss: float = default(0.0),
        normalize: bool = default(False),
        class_mask: Any = None,
        empty_mean: spec.EmptyMean = default("nan"),
        softcap: float | None = None,
        convention: str | None = None,
        process_group: Any = None,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _legacy_reduction(size_average, reduce)
        # Validate now (a bad option fails at construction), keep the resolved values.
        opts = _options(
            convention,
            label_smoothing=label_smoothing,
            spread=spread,
            ignore_index=ignore_index,
            z_loss=z_loss,
            normalize=normalize,
            reduction=reduction,
            empty_mean=empty_mean,
            softcap=softcap,
        )
        self.register_buffer("weight", None if weight is None else torch.as_tensor(weight))
        self.register_buffer("class_mask", None if class_mask is None else torch.as_tensor(class_mask))
        self.ignore_index = opts.ignore_index
        self.reduction = opts.reduction
        self.label_smoothing = opts.label_smoothing
        self.spread = opts.spread
        self.z_loss = opts.z_loss
        self.normalize = opts.normalize
        self.empty_mean = opts.empty_mean
        self.softcap = opts.softcap
        self.process_group = process_group

    def forward(
        self, input: torch.Tensor, target: torch.Tensor, *, sample_weight: Any = None, denominator: Any = None
    ) -> torch.Tensor:
        """The loss of ``input`` against ``target``; ``sample_weight`` and ``denominator`` (which change per
        batch) as in :func:`loss`."""
        buffers = self._buffers  # (reading the registered buffers through nn.Module.__getattr__ costs more)
        if (
            sample_weight is None
            and denominator is None
            and buffers.get("weight") is None
            and buffers.get("class_mask") is None
            and self.softcap is None
            and self.process_group is None
        ):  # the usual call (see lsx.torch._plain)
            value = _plain.cross_entropy(
                input,
                target,
                self.ignore_index,
                self.reduction,
                self.label_smoothing,
                self.spread,
                self.z_loss,
                self.normalize,
                self.empty_mean,
            )
            if value is not None:
                return value
        return loss(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            spread=self.spread,
            z_loss=self.z_loss,
            normalize=self.normalize,
            class_mask=self.class_mask,
            empty_mean=self.empty_mean,
            softcap=self.softcap,
            sample_weight=sample_weight,
            denominator=denominator,
            process_group=self.process_group,
        )

    def extra_repr(self) -> str:
        shown = [f"ignore_index={self.ignore_index}", f"reduction={self.reduction!r}"]
        if self.label_smoothing:
            shown.append(f"label_smoothing={self.label_smoothing}")
        for name, plain in (
            ("spread", "all"),
            ("z_loss", 0.0),
            ("normalize", False),
            ("empty_mean", "nan"),
            ("softcap", None),
        ):
            if getattr(self, name) != plain:
                shown.append(f"{name}={getattr(self, name)!r}")
        return ", ".join(shown)
