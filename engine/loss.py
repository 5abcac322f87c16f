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
    logits is softmax - one-hot, scaled and cast to the hidden dtype as autograd would. Compiled (CUDA), the
    one-hot is a comparison, so the softmax, the one-hot and the cast fuse into passes over the logits with no
    fp32 copy of them; run as it is (CPU), the same values are computed in place."""
    logits = F.linear(hidden, weight, bias).float()
    lse = torch.logsumexp(logits, dim=-1)
    valid = labels != -100
    safe = torch.where(valid, labels, 0)[:, None]
    loss = torch.where(valid, lse - logits.gather(1, safe).squeeze(1), 0.0).sum()
    scale = torch.where(valid, upstream, 0.0)[:, None]
    if torch.compiler.is_compiling():
        columns = torch.arange(logits.shape[-1], device=logits.device)
        grad_logits = ((torch.exp(logits - lse[:, None]) - (columns == safe).float()) * scale).to(hidden.dtype)
    else:  # the same operations, in place: one fp32 buffer of the logits' size besides them
        probs = logits.sub_(lse[:, None]).exp_()
        probs.scatter_add_(1, safe, torch.full_like(safe, -1, dtype=probs.dtype))
        grad_logits = probs.mul_(scale).to(hidden.dtype)
    return loss, grad_logits @ weight


@functools.cache
def _compiled():
    """`loss_and_input_gradient` compiled for CUDA, or None where Triton (which Inductor's kernels need) is not
    installed; looked up once a process, not once a chunk."""
    if importlib.util.find_spec("triton") is None:
        return None
    return torch.compile(loss_and_input_gradient, dynamic=True)


def _chunk_function(device_type: str):
    """`loss_and_input_gradient`, compiled on CUDA where it can be, as it is elsewhere."""
    compiled = _compiled() if device_type == "cuda" else None
    return compiled or loss_and_input_gradient


def takes_early_gradient(lm_head: torch.nn.Module) -> bool:
    """Whether `causal_lm_loss` takes each chunk's gradient in its forward pass: for a linear head with no
    trainable parameter (surgery's); other heads get checkpointed chunks."""
    return type(lm_head) is torch.nn.Linear and not any(p.requires_grad for p in lm_head.parameters())


def peak_bytes(lm_head: torch.nn.Module, chunk_tokens: int) -> int:
    """The most memory `causal_lm_loss` holds at once for `lm_head`, as checkpointing plans reserve it, per
    logit of a chunk ([chunk_tokens, vocab]): with the early gradient compiled, the logits and their gradient in
    the head's dtype (measured: 0.96 GiB for bloom-1b7's head and 1,024 tokens in bf16, 2 x 2 bytes a logit),
    reserved as 2.5 x its element size; run as it is, an fp32 buffer besides those two (4 + 2 x); with
    checkpointed chunks 3.5 fp32 values (measured 3.06 on bloom-1b7's head). It is held only around the loss's
    forward (the checkpointed chunks': at the start of backward), never while the body's layers backpropagate."""
    logits = chunk_tokens * lm_head.weight.shape[0]
    if not takes_early_gradient(lm_head):
        return int(3.5 * 4 * logits)
    element = lm_head.weight.element_size()
    compiled = _chunk_function(lm_head.weight.device.type) is not loss_and_input_gradient
    return int((2.5 * element if compiled else 4 + 2 * element) * logits)


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
    @torch.autograd.function.once_differentiable  # the kept gradient is a constant of the forward pass
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
    early = needs_grad and takes_early_gradient(lm_head)
    # the upstream gradient of each chunk's sum in `(total / n) * backward_scale`, as autograd will form it (a
    # factor of 0, a filler's, is rescaled from 1: dividing by an expected 0 would give NaN)
    scale = backward_scale if backward_scale > 0 else 1.0
    expected = (torch.full((), scale, dtype=torch.float32, device=hidden.device) / n) if early else None
    for start in range(0, h.shape[0], chunk_tokens):
        hs, ls = h[start : start + chunk_tokens], labels[start : start + chunk_tokens]
        if early:
            total = total + _LossWithEarlyGradient.apply(hs, ls, expected, lm_head.weight, lm_head.bias)
        elif needs_grad:
            total = total + checkpoint(_chunk_loss_sum, lm_head, hs, ls, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(lm_head, hs, ls)
    return total / n
