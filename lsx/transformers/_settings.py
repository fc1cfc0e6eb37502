"""The options of an lsx loss for a causal LM, validated once, and the loss of materialised logits.

Validation and messages come from :mod:`lsx.spec`; the arithmetic is :func:`lsx.torch.loss` (materialised
logits) or :func:`lsx.torch.linear_loss` (fused, see :mod:`lsx.transformers._forward`).
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any

import numpy as np
import torch
from torch import nn

import lsx.torch
from lsx import spec

#: HF's label for "no target" (data collators pad labels with it, the causal shift appends it)
HF_IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class Settings:
    """Resolved options, plain values only (the convention already applied)."""

    label_smoothing: float
    spread: str
    z_loss: float
    normalize: bool
    empty_mean: str
    softcap: float | None
    ignore_index: int
    weight: torch.Tensor | None  # (C,) for C = vocab_size or the logits' width; padded by class_weight
    vocab_size: int | None
    chunk_size: int | None

    def loss_options(self) -> dict[str, Any]:
        """Keyword arguments shared by lsx.torch.loss and lsx.torch.linear_loss (the mean, HF's reduction)."""
        return dict(
            label_smoothing=self.label_smoothing,
            spread=self.spread,
            z_loss=self.z_loss,
            normalize=self.normalize,
            empty_mean=self.empty_mean,
            ignore_index=self.ignore_index,
            reduction="mean",
        )

    def class_weight(self, width: int, device: torch.device) -> torch.Tensor | None:
        """The class weights over the logits' ``width`` classes (the padded classes get 0: they are masked)."""
        if self.weight is None:
            return None
        w = self.weight
        if w.shape[0] != width:
            if self.vocab_size is None or w.shape[0] != self.vocab_size:
                expected = f"({width},)" if self.vocab_size is None else f"({width},) or ({self.vocab_size},)"
                raise ValueError(
                    f"weight must have shape {expected} (one entry per class of the logits, or per real class), "
                    f"got {tuple(w.shape)}"
                )
            w = torch.cat([w, w.new_zeros(width - w.shape[0])])
        return w.to(device=device)

    def class_mask(self, width: int, device: torch.device) -> torch.Tensor | None:
        """The real classes among the logits' ``width`` (None when all are real)."""
        check_vocab_size(self.vocab_size, width)
        if self.vocab_size is None or self.vocab_size == width:
            return None
        return torch.arange(width, device=device) < self.vocab_size


def resolve(
    *,
    convention: Any,
    label_smoothing: Any,
    spread: Any,
    weight: Any,
    z_loss: Any,
    normalize: Any,
    softcap: Any,
    vocab_size: Any,
    chunk_size: Any,
    ignore_index: Any,
) -> Settings:
    """Validate the options (messages from :mod:`lsx.spec`). The convention supplies the loss's options
    (ε, spread, z-loss, KL form, empty mean); the reduction is HF's mean, and ``ignore_index`` is HF's −100
    unless passed: a convention's padding index (fairseq's 1) would drop real tokens from HF labels."""
    if spec.is_default(ignore_index):
        ignore_index = HF_IGNORE_INDEX
    if ignore_index is None:
        raise ValueError(
            "ignore_index must be an int for a causal LM (the shifted labels end with it), got ignore_index=None"
        )
    opts = spec.resolve_options(
        convention,
        label_smoothing=label_smoothing,
        spread=spread,
        z_loss=z_loss,
        normalize=normalize,
        softcap=softcap,
        ignore_index=ignore_index,
        reduction="mean",
    )
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, numbers.Integral) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int or None, got vocab_size={vocab_size!r}")
        vocab_size = int(vocab_size)
        spec.check_class_count(vocab_size, opts)
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got chunk_size={chunk_size!r}")
        chunk_size = int(chunk_size)
    if weight is not None:
        w = weight.detach() if isinstance(weight, torch.Tensor) else torch.as_tensor(np.asarray(weight))
        if w.dim() != 1:
            raise ValueError(f"weight must be one entry per class, shape (C,), got shape {tuple(w.shape)}")
        spec.check_weight(w.cpu().numpy(), w.shape[0])
        weight = w
    return Settings(
        label_smoothing=opts.label_smoothing,
        spread=opts.spread,
        z_loss=opts.z_loss,
        normalize=opts.normalize,
        empty_mean=opts.empty_mean,
        softcap=opts.softcap,
        ignore_index=opts.ignore_index,  # type: ignore[arg-type]
        weight=weight,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
    )


def check_vocab_size(vocab_size: int | None, width: int) -> None:
    if vocab_size is not None and vocab_size > width:
        raise ValueError(
            f"vocab_size must be at most the number of logits per token ({width}, the LM head's rows), "
            f"got vocab_size={vocab_size}"
        )


def denominator(num_items_in_batch: Any, device: torch.device) -> Any:
    """HF's ``num_items_in_batch`` as lsx's ``denominator``: None, a number, or a 0-d tensor on ``device``
    (moved, never read on the host)."""
    if num_items_in_batch is None or not isinstance(num_items_in_batch, torch.Tensor):
        return num_items_in_batch
    if num_items_in_batch.numel() != 1:
        raise ValueError(
            "num_items_in_batch must be a number or a one-element tensor, got a tensor of shape "
            f"{tuple(num_items_in_batch.shape)}"
        )
    return num_items_in_batch.reshape(()).to(device=device)


def shifted_targets(labels: torch.Tensor | None, shift_labels: torch.Tensor | None, ignore_index: int) -> torch.Tensor:
    """HF's causal shift: token t predicts label t+1, the last position predicts nothing; ``shift_labels``
    (already shifted) is taken as given."""
    if shift_labels is None:
        shift_labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    return shift_labels.reshape(-1)


def logits_loss(
    settings: Settings,
    logits: torch.Tensor,
    targets: torch.Tensor,
    num_items_in_batch: Any,
    *,
    softcap: float | None,
) -> torch.Tensor:
    """The lsx loss of materialised (N, V) logits. Half-precision logits are upcast to float32 as HF does;
    float32 and float64 are kept (a float64 model gets a float64 loss)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    width = logits.shape[-1]
    return lsx.torch.loss(
        logits,
        targets.to(logits.device),
        weight=settings.class_weight(width, logits.device),
        class_mask=settings.class_mask(width, logits.device),
        softcap=softcap,
        denominator=denominator(num_items_in_batch, logits.device),
        **settings.loss_options(),
    )
