"""Causal-LM loss from hidden states, in token chunks so full-vocabulary logits never exist at once."""

from __future__ import annotations

import functools
import importlib.util

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _chunk_loss_sum(lm_head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    logits = lm_head(hidden).float()
    return F.cross_entropy(logits, labels, reduction="sum", ignore_index=-100)


def loss_and_input_gradient(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                            labels: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk's summed cross-entropy (fp32 logits, labels -100 ignored) and its gradient with respect to
    `hidden` for the upstream gradient `upstream`, from one computation of the logits: the gradient of the
    logits is softmax - one-hot, scaled and cast to the hidden dtype as autograd would. Compiled on CUDA, where
    the softmax, the one-hot and the cast fuse into two passes over the logits; in place elsewhere."""
    logits = F.linear(hidden, weight, bias).float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = labels != -100
    safe = torch.where(valid, labels, 0)[:, None]
    loss = torch.where(valid, lse - logits.gather(1, safe).squeeze(1), 0.0).sum()
    probs = logits.sub_(lse[:, None]).exp_()
    probs.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=probs.dtype))
    grad_logits = probs.mul_(torch.where(valid, upstream, 0.0)[:, None]).to(hidden.dtype)
    return loss, grad_logits @ weight


@functools.cache
def _compiled():
    return torch.compile(loss_and_input_gradient, dynamic=True)


def _chunk_function(device_type: str):
    """`loss_and_input_gradient`, compiled on CUDA where Triton (which Inductor's kernels need) is installed."""
    if device_type == "cuda" and importlib.util.find_spec("triton") is not None:
        return _compiled()
    return loss_and_input_gradient


def peak_bytes(chunk_tokens: int, vocab: int) -> int:
    """The most memory `causal_lm_loss` holds at once with a frozen head, as checkpointing plans reserve it: a
    chunk's fp32 logits and one more tensor their size (their softmax's shift on the CPU; compiled on CUDA, the
    bf16 logits and their bf16 gradient fit in the same)."""
    return 2 * chunk_tokens * vocab * 4


class _LossWithEarlyGradient(torch.autograd.Function):
    """A chunk's summed cross-entropy whose gradient with respect to its hidden states is taken in the forward
    pass, while its logits exist, for the upstream gradient `expected`. Backward only rescales it to the upstream
    gradient that arrives (by exactly 1 when it is the expected one), so the logits are never recomputed. For a
    linear head with no trainable parameter: no gradient reaches the head."""

    @staticmethod
    def forward(ctx, hidden, labels, expected, weight, bias):  # noqa: D102 - autograd.Function protocol
        loss, grad = _chunk_function(hidden.device.type)(hidden, weight, bias, labels, expected)
        ctx.save_for_backward(grad, expected)
        return loss

    @staticmethod
    def backward(ctx, grad_output):  # noqa: D102
        grad, expected = ctx.saved_tensors
        return grad * (grad_output / expected), None, None, None, None


def causal_lm_loss(lm_head: torch.nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None, chunk_tokens: int = 1024,
                   backward_scale: float = 1.0) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens, a chunk of `chunk_tokens` logits at a time.

    With a frozen linear head (surgery's case) each chunk's gradient is taken in the forward pass, as fused
    linear-cross-entropy kernels do, so its logits are computed once rather than again in backward;
    `backward_scale` is the factor the caller multiplies the loss by before `backward()` (1 / accumulation
    steps), the upstream gradient that gradient is formed for (any other is rescaled exactly, up to rounding).
    Another head gets checkpointed chunks (logits recomputed in backward) and, if trainable, its gradient."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1).clone()
    if attention_mask is not None:
        labels[attention_mask[:, 1:].reshape(-1) == 0] = -100
    n = (labels != -100).sum().clamp_min(1)
    total = hidden.new_zeros((), dtype=torch.float32)
    needs_grad = torch.is_grad_enabled() and h.requires_grad
    early = needs_grad and type(lm_head) is torch.nn.Linear and not any(p.requires_grad for p in lm_head.parameters())
    # the upstream gradient of each chunk's sum in `(total / n) * backward_scale`, as autograd will form it
    expected = (torch.full((), backward_scale, dtype=torch.float32, device=hidden.device) / n) if early else None
    for start in range(0, h.shape[0], chunk_tokens):
        hs, ls = h[start : start + chunk_tokens], labels[start : start + chunk_tokens]
        if early:
            total = total + _LossWithEarlyGradient.apply(hs, ls, expected, lm_head.weight, lm_head.bias)
        elif needs_grad:
            total = total + checkpoint(_chunk_loss_sum, lm_head, hs, ls, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, hs, ls)
    return total / n
