"""Hand-written label-smoothing losses, the way people write them, for ``lsx identify``.

Each is a torch function or ``nn.Module`` (one JAX and one NumPy function at the end) taking
``(logits (N, K), labels (N,))``. ``tests/test_cli.py`` identifies every one and checks the verdict.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EPS = 0.1


def torch_builtin(logits, labels):
    """torch's own: K-dist, ignore_index=-100, weighted mean."""
    return F.cross_entropy(logits, labels, label_smoothing=EPS)


class KDistSmoothing(nn.Module):
    """NVIDIA DLE / timm: (1−ε)·nll + ε·mean_c(−log p), batch mean, no ignore index."""

    def __init__(self, smoothing=EPS):
        super().__init__()
        self.smoothing = smoothing
        self.confidence = 1.0 - smoothing

    def forward(self, x, target):
        logprobs = F.log_softmax(x, dim=-1)
        nll_loss = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
        smooth_loss = -logprobs.mean(dim=-1)
        return (self.confidence * nll_loss + self.smoothing * smooth_loss).mean()


def fairseq_style(lprobs_or_logits, target, epsilon=EPS, ignore_index=1):
    """fairseq's label_smoothed_nll_loss (2021+): ε/(K−1) on the others, padding index 1, summed."""
    lprobs = F.log_softmax(lprobs_or_logits, dim=-1)
    target = target.unsqueeze(-1)
    nll_loss = -lprobs.gather(dim=-1, index=target)
    smooth_loss = -lprobs.sum(dim=-1, keepdim=True)
    pad_mask = target.eq(ignore_index)
    nll_loss = nll_loss.masked_fill(pad_mask, 0.0).sum()
    smooth_loss = smooth_loss.masked_fill(pad_mask, 0.0).sum()
    eps_i = epsilon / (lprobs.size(-1) - 1)
    return (1.0 - epsilon - eps_i) * nll_loss + eps_i * smooth_loss


class WeightedNllOnly(nn.Module):
    """The popular forum version: class weights go to F.nll_loss only; the smoothing term is unweighted."""

    def __init__(self, smoothing=EPS):
        super().__init__()
        self.smoothing = smoothing
        self.weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0], dtype=torch.float64)

    def forward(self, preds, target):
        n = preds.size(-1)
        log_preds = F.log_softmax(preds, dim=-1)
        smooth = (-log_preds.sum(dim=-1)).mean()
        nll = F.nll_loss(log_preds, target, weight=self.weight)
        return self.smoothing * smooth / n + (1 - self.smoothing) * nll


class WeightedEverywhere(nn.Module):
    """Class weights on every term, mean ÷ Σ w_y: what torch does with weight= and label_smoothing=."""

    def __init__(self):
        super().__init__()
        self.weight = torch.tensor([1.0, 2.0, 0.5, 1.5, 1.0], dtype=torch.float64)

    def forward(self, logits, labels):
        return F.cross_entropy(logits, labels, weight=self.weight, label_smoothing=EPS)


def mean_over_all_rows(logits, labels, eps=EPS, ignore_index=-100):
    """Masks padding out of the loss but still divides by every row."""
    logp = F.log_softmax(logits, dim=-1)
    keep = labels != ignore_index
    nll = -logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    smooth = -logp.mean(dim=-1)
    per_row = ((1 - eps) * nll + eps * smooth) * keep
    return per_row.sum() / labels.numel()


def smoothing_on_padding_too(logits, labels, eps=EPS):
    """F.nll_loss skips -100 in the target term, but the smoothing term is averaged over every row."""
    logp = F.log_softmax(logits, dim=-1)
    return (1 - eps) * F.nll_loss(logp, labels) + eps * (-logp.mean(dim=-1)).mean()


def summed(logits, labels):
    return F.cross_entropy(logits, labels, label_smoothing=EPS, reduction="sum")


def per_element(logits, labels):
    return F.cross_entropy(logits, labels, label_smoothing=0.2, reduction="none")


class KLForm(nn.Module):
    """The Annotated-Transformer way: KL divergence to a smoothed target with ε/(K−1), 'batchmean'."""

    def __init__(self, smoothing=EPS):
        super().__init__()
        self.smoothing = smoothing
        self.criterion = nn.KLDivLoss(reduction="batchmean")

    def forward(self, x, target):
        true_dist = torch.full_like(x, self.smoothing / (x.size(1) - 1))
        true_dist.scatter_(1, target.unsqueeze(1), 1.0 - self.smoothing)
        return self.criterion(F.log_softmax(x, dim=1), true_dist)


def with_z_loss(logits, labels, z=1e-3):
    """PaLM-style auxiliary z-loss added to torch's loss."""
    return F.cross_entropy(logits, labels, label_smoothing=EPS) + z * (torch.logsumexp(logits, dim=-1) ** 2).mean()


def smoothing_on_probs(logits, labels, eps=EPS):
    """Wrong: smooths the softmax output instead of the target, then takes the log."""
    k = logits.size(-1)
    p = (1 - eps) * F.softmax(logits, dim=-1) + eps / k
    return F.nll_loss(torch.log(p), labels)


def eps_over_k_slip(logits, labels, eps=EPS):
    """Wrong: 1−ε on the label and ε/K on the others, so the target sums to 1 − ε/K."""
    k = logits.size(-1)
    logp = F.log_softmax(logits, dim=-1)
    q = torch.full_like(logp, eps / k).scatter(1, labels.unsqueeze(1), 1 - eps)
    return -(q * logp).sum(dim=-1).mean()


class HFLabelSmoother:
    """transformers' LabelSmoother, applied to logits: ignore -100, mean over active elements."""

    epsilon = EPS
    ignore_index = -100

    def __call__(self, logits, labels):
        log_probs = -F.log_softmax(logits, dim=-1)
        labels = labels.unsqueeze(-1)
        padding_mask = labels.eq(self.ignore_index)
        labels = torch.clamp(labels, min=0)
        nll_loss = log_probs.gather(dim=-1, index=labels)
        smoothed_loss = log_probs.sum(dim=-1, keepdim=True, dtype=torch.float32)
        nll_loss.masked_fill_(padding_mask, 0.0)
        smoothed_loss.masked_fill_(padding_mask, 0.0)
        num_active_elements = padding_mask.numel() - padding_mask.long().sum()
        nll_loss = nll_loss.sum() / num_active_elements
        smoothed_loss = smoothed_loss.sum() / (num_active_elements * log_probs.shape[-1])
        return (1 - self.epsilon) * nll_loss + self.epsilon * smoothed_loss


class LabelSmoothingLoss(nn.Module):
    """The most copied blog version, built as ``LabelSmoothingLoss(classes, smoothing)``: ε/(K−1) on the others."""

    def __init__(self, classes, smoothing, dim=-1):
        super().__init__()
        self.confidence = 1.0 - smoothing
        self.smoothing = smoothing
        self.cls = classes
        self.dim = dim

    def forward(self, pred, target):
        pred = pred.log_softmax(dim=self.dim)
        with torch.no_grad():
            true_dist = torch.zeros_like(pred)
            true_dist.fill_(self.smoothing / (self.cls - 1))
            true_dist.scatter_(1, target.data.unsqueeze(1), self.confidence)
        return torch.mean(torch.sum(-true_dist * pred, dim=self.dim))


class SmoothingDefaultsToZero(nn.Module):
    """A blog class whose smoothing defaults to 0: plain torch cross-entropy, batch mean, until ε is passed."""

    def __init__(self, smoothing=0.0):
        super().__init__()
        self.smoothing = smoothing

    def forward(self, logits, target):
        logp = F.log_softmax(logits, dim=-1)
        nll = F.nll_loss(logp, target)  # ignores -100, mean over the others (NaN when there are none)
        keep = target != -100
        smooth = -logp.mean(dim=-1)[keep].mean()
        return (1 - self.smoothing) * nll + self.smoothing * smooth


class NeedsArguments(nn.Module):
    def __init__(self, margin):
        super().__init__()
        self.margin = margin


def raises(logits, labels):
    raise RuntimeError("boom")


def wrong_shape(logits, labels):
    return F.cross_entropy(logits, labels, reduction="none")[:, None].expand(-1, 2)


def returns_none(logits, labels):
    F.cross_entropy(logits, labels)  # the forgotten return


def returns_tuple(logits, labels):
    return F.cross_entropy(logits, labels), logits.softmax(-1)


NOT_CALLABLE = 3


def optax_style(logits, labels):
    """JAX: optax.smooth_labels on a one-hot target, mean of the per-example losses."""
    import jax
    import optax

    onehot = jax.nn.one_hot(labels, logits.shape[-1])
    return optax.softmax_cross_entropy(logits, optax.smooth_labels(onehot, 0.2)).mean()


def t5x_style(logits, targets, label_smoothing=EPS, z_loss=1e-4):
    """NumPy transcription of T5X's cross entropy: ε/(K−1), minus the target entropy, z-loss, summed."""
    vocab_size = logits.shape[-1]
    confidence = 1.0 - label_smoothing
    low_confidence = label_smoothing / (vocab_size - 1)
    normalizing_constant = -(
        confidence * np.log(confidence) + (vocab_size - 1) * low_confidence * np.log(low_confidence + 1e-20)
    )
    soft_targets = np.full(logits.shape, low_confidence)
    soft_targets[np.arange(len(targets)), targets] = confidence
    log_z = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), axis=-1)) + logits.max(-1)
    log_softmax = logits - log_z[:, None]
    loss = -np.sum(soft_targets * log_softmax, axis=-1) - normalizing_constant + z_loss * log_z**2
    return loss.sum()
