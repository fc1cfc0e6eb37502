"""The forward that :func:`lsx.transformers.apply` puts on a ``*ForCausalLM`` instance.

It redoes what the causal-LM forwards of Llama, Mistral, Qwen2 and the Gemmas do around their base model —
``hidden = base(...).last_hidden_state``, keep ``logits_to_keep`` positions, ``logits = lm_head(hidden)``,
soft-cap, loss — with the loss computed by ``lsx.torch.linear_loss`` from the hidden states and the head's
weight in training (no logits at all), or by ``lsx.torch.loss`` from the logits otherwise. Calls without
labels go to the original forward untouched (``generate`` included).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

import lsx.torch
from lsx.transformers import _settings
from lsx.transformers._settings import Settings

#: config attributes of causal LMs that transform the logits after the LM head in their own forward
#: (Cohere's logit_scale, Granite's logits_scaling, MiniCPM's width scaling): the patched forward would
#: silently skip them, so ``apply`` refuses such models.
LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "dim_model_base")


def base_model(model: nn.Module) -> nn.Module:
    base = getattr(model, getattr(model, "base_model_prefix", "model") or "model", None)
    if not isinstance(base, nn.Module) or base is model:
        base = getattr(model, "model", None)
    if not isinstance(base, nn.Module):
        raise ValueError(
            f"model must be a causal LM with a base model (model.model) and an lm_head, got a "
            f"{type(model).__name__} without a base model"
        )
    return base


def lm_head(model: nn.Module) -> nn.Linear:
    head = getattr(model, "lm_head", None)
    if head is None:
        raise ValueError(
            f"model must be a causal LM with an lm_head (a *ForCausalLM), got a {type(model).__name__} without "
            "lm_head"
        )
    if not isinstance(head, nn.Linear) or type(head).forward is not nn.Linear.forward:
        raise TypeError(
            f"model.lm_head must be a plain torch.nn.Linear (its weight is used directly), got "
            f"{type(head).__name__}; for other heads assign lsx.transformers.loss_function(...) to "
            "model.loss_function"
        )
    return head


def check_logit_transforms(config: Any) -> None:
    for name in LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value is not None and value != 1:
            raise ValueError(
                f"model.config.{name}={value!r}: this model transforms its logits after the LM head, which "
                "apply does not reproduce; assign lsx.transformers.loss_function(...) to model.loss_function "
                "instead"
            )


def keep_positions(hidden: torch.Tensor, logits_to_keep: Any) -> torch.Tensor:
    """HF's ``logits_to_keep``: an int keeps the last n positions (0: all), a 1-D tensor these positions,
    a 2-D integer tensor per-row positions, a 2-D boolean tensor the True positions (flattened)."""
    if isinstance(logits_to_keep, torch.Tensor) and logits_to_keep.dim() == 2:
        if logits_to_keep.dtype == torch.bool:
            return hidden[logits_to_keep]
        return torch.take_along_dim(hidden, logits_to_keep[..., None], dim=1)
    if isinstance(logits_to_keep, int):
        logits_to_keep = slice(-logits_to_keep, None)
    return hidden[:, logits_to_keep, :]


class PatchedForward:
    """``model.forward`` after ``apply``: an object (not a closure) so that ``copy.deepcopy`` and pickling
    of the model carry it along, bound to the copy. It reports the original forward's signature, which the
    Trainer reads (dataset columns, ``**kwargs`` for ``num_items_in_batch``) and ``generate`` too."""

    def __init__(self, model: nn.Module, original: Any, settings: Settings) -> None:
        self.model = model
        self.original = original
        self.settings = settings

    @property
    def __signature__(self) -> inspect.Signature:
        sig = inspect.signature(self.original)
        params = list(sig.parameters.values())
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params):
            params.append(inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD))
        return sig.replace(parameters=params)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        call = self._named(args, kwargs)
        if call.get("labels") is None:
            return self.original(*args, **kwargs)
        return self._with_labels(call)

    def _named(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """Every argument by name, as the original forward would bind it."""
        if not args:
            return dict(kwargs)
        sig = inspect.signature(self.original)
        bound = sig.bind(*args, **kwargs)
        named: dict[str, Any] = {}
        for name, value in bound.arguments.items():
            kind = sig.parameters[name].kind
            if kind == inspect.Parameter.VAR_POSITIONAL:
                if value:
                    raise TypeError(
                        "the forward patched by lsx.transformers.apply takes the model inputs by name here; "
                        f"pass input_ids=... (got {len(value)} unnamed arguments)"
                    )
            elif kind == inspect.Parameter.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        return named

    def _with_labels(self, call: dict[str, Any]) -> Any:
        model, settings = self.model, self.settings
        labels = call.pop("labels")
        logits_to_keep = call.pop("logits_to_keep", 0)
        return_dict = call.pop("return_dict", None)
        if return_dict is None:
            return_dict = getattr(model.config, "return_dict", True)
        head = lm_head(model)
        # as HF's forwards: every other keyword (num_items_in_batch and shift_labels included) reaches the base
        outputs = base_model(model)(**call)
        hidden = keep_positions(outputs.last_hidden_state, logits_to_keep)
        targets = _settings.shifted_targets(labels, call.get("shift_labels"), settings.ignore_index)
        h2 = hidden.reshape(-1, hidden.shape[-1])
        if targets.shape[0] != h2.shape[0]:
            raise ValueError(
                f"labels give {targets.shape[0]} targets but the model kept {h2.shape[0]} positions "
                f"(logits_to_keep={logits_to_keep!r}); pass labels or shift_labels for the kept positions"
            )
        num_items = call.get("num_items_in_batch")
        if model.training:
            logits = None
            loss = self._fused_loss(head, h2, targets.to(h2.device), num_items)
        else:
            logits = head(hidden)
            if settings.softcap is not None:  # as the Gemma forwards do it, so the logits are the unpatched ones
                logits = torch.tanh(logits / settings.softcap) * settings.softcap
            loss = _settings.logits_loss(
                settings, logits.reshape(-1, logits.shape[-1]), targets, num_items, softcap=None
            )
        fields = {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} - {"loss", "logits"}
        result = CausalLMOutputWithPast(
            loss=loss, logits=logits, **{name: getattr(outputs, name, None) for name in fields}
        )
        return result if return_dict else result.to_tuple()

    def _fused_loss(self, head: nn.Linear, h2: torch.Tensor, targets: torch.Tensor, num_items: Any) -> torch.Tensor:
        weight, bias = head.weight, head.bias
        device_type = h2.device.type
        if torch.is_autocast_enabled(device_type):
            # as autocast's F.linear in HF's forward: hidden states and head in the autocast dtype; the loss
            # itself runs outside autocast (linear_loss accumulates half precision in float32)
            dtype = torch.get_autocast_dtype(device_type)
            h2, weight = h2.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            with torch.autocast(device_type, enabled=False):
                loss = self._linear_loss(h2, weight, bias, targets, num_items)
        else:
            loss = self._linear_loss(h2, weight, bias, targets, num_items)
        # HF's losses are float32 for half-precision models; float32 and float64 stay as they are
        return loss.float() if loss.dtype in (torch.float16, torch.bfloat16) else loss

    def _linear_loss(self, h2, weight, bias, targets, num_items):
        settings, rows = self.settings, weight.shape[0]
        return lsx.torch.linear_loss(
            h2,
            weight,
            targets,
            linear_bias=bias,
            weight=settings.class_weight(rows, h2.device),
            class_mask=settings.class_mask(rows, h2.device),
            softcap=settings.softcap,
            denominator=_settings.denominator(num_items, h2.device),
            chunk_size=settings.chunk_size,
            **settings.loss_options(),
        )
