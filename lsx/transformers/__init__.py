"""Hugging Face ``transformers``: the exact lsx loss for causal LMs, fused with the LM head in training.

- :func:`apply` patches a ``*ForCausalLM`` instance: a training-mode call with labels computes the loss with
  :func:`lsx.torch.linear_loss` from the final hidden states and ``lm_head``'s weight, never holding the
  logits (``outputs.logits is None``); gradient accumulation through ``num_items_in_batch`` works as in HF.
- :func:`loss_function` is the same loss from materialised logits, with the parameters of HF's
  ``ForCausalLMLoss``, for ``model.loss_function = ...`` on models ``apply`` does not cover.
"""

from __future__ import annotations

import dataclasses
from typing import Any

try:
    import torch
    import transformers  # noqa: F401  (the extra's second framework: fail here, naming the extra)
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("lsx.transformers needs transformers and PyTorch: pip install 'lsx[transformers]'") from error

from lsx import spec
from lsx.spec import default
from lsx.transformers import _forward, _settings

__all__ = ["apply", "loss_function"]


def apply(
    model: Any,
    *,
    label_smoothing: float = default(0.0),
    spread: spec.Spread = default("all"),
    weight: Any = None,
    z_loss: float = default(0.0),
    normalize: bool = default(False),
    softcap: float | None = default(None),
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    convention: str | None = None,
    ignore_index: int = default(-100),
) -> Any:
    """Patch a causal LM in place so that its loss is lsx's, fused with the LM head in training.

    After ``apply``, ``model(input_ids, labels=..., ...)``:

    - in training mode, computes the loss with :func:`lsx.torch.linear_loss` on the base model's final
      hidden states and ``lm_head``'s weight (and bias), in row chunks: ``lm_head`` is not called and the
      logits are never held, so ``outputs.logits is None`` (also under ``torch.no_grad()``);
    - in eval mode, returns the logits exactly as before and the same lsx loss computed from them (so
      ``Trainer.evaluate``'s ``eval_loss`` is the training objective, as with HF's ``label_smoothing_factor``).

    Calls without labels go to the original forward (``generate`` is unchanged). Labels are shifted by one
    as HF does (or ``shift_labels=`` is taken as given) and ``ignore_index`` targets are left out. The loss
    is the mean over the non-ignored targets (weighted by the class weights of their labels, if any) or, when
    the call passes ``num_items_in_batch`` (an int or a tensor, as the ``Trainer`` does under gradient
    accumulation), the summed loss divided by it, kept on the device. Every other keyword reaches the base
    model unchanged. A float64 model gets a float64 loss; a half-precision model a float32 one (as in HF).

    Args:
        model: a ``*ForCausalLM`` whose forward is ``base model → logits_to_keep → lm_head →
            final_logit_softcapping`` (Llama, Mistral, Qwen2, Gemma, Gemma 2 and Gemma 3 are tested), with
            ``lm_head`` a plain ``torch.nn.Linear``.
        label_smoothing, spread, z_loss, normalize, convention: the lsx options (see :mod:`lsx.spec`).
            A ``convention`` sets the options not passed; the reduction stays HF's mean and ``ignore_index``
            stays −100 unless passed.
        weight: class weights, one per row of ``lm_head`` or one per real class (``vocab_size`` entries).
        softcap: the logits become ``c·tanh(x/c)``; by default ``config.final_logit_softcapping`` where the
            config has one (Gemma 2/3), else none. An explicit value (or None) replaces the config's.
        vocab_size: the number of real classes when ``lm_head`` has padded rows (e.g. ``len(tokenizer)``):
            the rows from ``vocab_size`` on are left out of the softmax and the smoothing.
        chunk_size: rows per chunk for :func:`lsx.torch.linear_loss` (None: its default).
        ignore_index: the label of targets to leave out (an int).

    Returns:
        ``model``, patched. ``apply`` again replaces the options (built on the original forward).

    Raises:
        ValueError / TypeError: a bad option (named), ``vocab_size`` larger than ``lm_head``'s rows, a model
            without ``lm_head`` or base model, an ``lm_head`` that is not a plain ``nn.Linear``, a config
            that scales its logits after the head (Cohere, Granite, MiniCPM).

    Example:
        >>> import torch, transformers, lsx.transformers
        >>> config = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
        ...     num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
        >>> model = lsx.transformers.apply(transformers.LlamaForCausalLM(config).train(),
        ...     label_smoothing=0.1, spread="others", vocab_size=60)
        >>> ids = torch.randint(0, 60, (2, 8))
        >>> out = model(input_ids=ids, labels=ids)
        >>> out.logits is None, out.loss.shape
        (True, torch.Size([]))
    """
    head = _forward.lm_head(model)
    _forward.base_model(model)
    config = getattr(model, "config", None)
    _forward.check_logit_transforms(config)
    if spec.is_default(softcap):
        softcap = getattr(config, "final_logit_softcapping", None)
    settings = _settings.resolve(
        convention=convention,
        label_smoothing=label_smoothing,
        spread=spread,
        weight=weight,
        z_loss=z_loss,
        normalize=normalize,
        softcap=softcap,
        vocab_size=vocab_size,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
    )
    rows = head.weight.shape[0]
    _settings.check_vocab_size(settings.vocab_size, rows)
    smoothing = spec.resolve_options(label_smoothing=settings.label_smoothing, spread=settings.spread)
    spec.check_class_count(settings.vocab_size or rows, smoothing)
    settings.class_weight(rows, torch.device("cpu"))  # the weight's shape, checked now
    patched = model.__dict__.get("forward")
    original = patched.original if isinstance(patched, _forward.PatchedForward) else model.forward
    model.forward = _forward.PatchedForward(model, original, settings)
    return model


def loss_function(
    *,
    label_smoothing: float = default(0.0),
    spread: spec.Spread = default("all"),
    weight: Any = None,
    z_loss: float = default(0.0),
    normalize: bool = default(False),
    softcap: float | None = None,
    vocab_size: int | None = None,
    convention: str | None = None,
    ignore_index: int = default(-100),
) -> CausalLMLoss:
    """The lsx loss as an HF causal-LM loss function, for ``model.loss_function = loss_function(...)``.

    The returned callable has the parameters of HF's ``ForCausalLMLoss``, in its order: ``(logits, labels,
    vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None, **kwargs)``. It shifts the
    labels as HF does (or takes ``shift_labels``), and returns the mean over the non-ignored targets or the
    sum divided by ``num_items_in_batch``. With no options it equals HF's loss; half-precision logits are
    upcast to float32 as HF does, float64 logits give a float64 loss.

    Args:
        label_smoothing, spread, weight, z_loss, normalize, convention: as in :func:`apply`.
        softcap: applied to the logits the loss receives (None: none; HF's Gemma forwards have already
            capped them with ``config.final_logit_softcapping``).
        vocab_size: the number of real classes; the call's ``vocab_size`` is the logits' width, and the
            classes from ``vocab_size`` on are left out of the softmax and the smoothing.
        ignore_index: used when the call does not pass its own.

    Example:
        >>> import torch, lsx.transformers
        >>> logits, labels = torch.randn(2, 5, 12, dtype=torch.float64), torch.randint(0, 10, (2, 5))
        >>> fn = lsx.transformers.loss_function(label_smoothing=0.1, vocab_size=10)
        >>> fn(logits, labels, 12).dtype
        torch.float64
    """
    settings = _settings.resolve(
        convention=convention,
        label_smoothing=label_smoothing,
        spread=spread,
        weight=weight,
        z_loss=z_loss,
        normalize=normalize,
        softcap=softcap,
        vocab_size=vocab_size,
        chunk_size=None,
        ignore_index=ignore_index,
    )
    return CausalLMLoss(settings)


class CausalLMLoss:
    """The callable returned by :func:`loss_function` (a class, so a model holding it can be copied)."""

    def __init__(self, settings: _settings.Settings) -> None:
        self.settings = settings

    def __call__(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        vocab_size: int,
        num_items_in_batch: Any = None,
        ignore_index: int = default(-100),
        shift_labels: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        settings = self.settings
        if not spec.is_default(ignore_index) and ignore_index != settings.ignore_index:
            checked = spec.resolve_options(ignore_index=ignore_index).ignore_index
            if checked is None:
                raise ValueError("ignore_index must be an int for a causal LM, got ignore_index=None")
            settings = dataclasses.replace(settings, ignore_index=checked)
        targets = _settings.shifted_targets(labels, shift_labels, settings.ignore_index)
        return _settings.logits_loss(
            settings, logits.reshape(-1, vocab_size), targets, num_items_in_batch, softcap=settings.softcap
        )
