"""Causal-LM loss from hidden states, in token chunks so full-vocabulary logits never exist at once."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


def causal_lm_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk_tokens: int = 1024) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens; each chunk's logits are recomputed in backward."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1).clone()
    if attention_mask is not None:
        labels[attention_mask[:, 1:].reshape(-1) == 0] = -100
    n = (labels != -100).sum().clamp_min(1)
    total = hidden.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and h.requires_grad
    for start in range(0, h.shape[0], chunk_tokens):
        hs, ls = h[start : start + chunk_tokens], labels[start : start + chunk_tokens]
        if needs_grad:
            total = total + checkpoint(_chunk_loss_sum, lm_head, hs, ls, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, hs, ls)
    return total / n
