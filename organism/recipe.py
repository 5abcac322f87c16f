"""The recipe: the organism's architecture and pretraining settings, the model they build, and one
pretraining step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.arch import adapter_for
from engine.errors import InputError
from engine.loss import causal_lm_loss

from .data_parallel import DataParallel


@dataclass
class OrganismConfig:
    """Architecture and pretraining recipe (defaults: the recipe that makes the low-slope band collapse)."""

    layers: int = 6
    heads: int = 16
    hidden: int = 256
    seq_len: int = 512
    batch_size: int = 32
    steps: int = 4000
    lr: float = 6e-4
    min_lr_frac: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    clip: float = 1.0
    seed: int = 0
    alibi: bool = True
    eval_blocks: int = 64

    def __post_init__(self) -> None:
        if self.hidden % self.heads:
            raise InputError(f"--hidden {self.hidden} is not divisible by --heads {self.heads}")
        if min(self.layers, self.heads, self.steps, self.batch_size) < 1 or self.seq_len < 8:
            raise InputError("layers, heads, steps and batch size must be >= 1 and seq len >= 8")

def build_model(config: OrganismConfig, tokenizer):
    """A freshly initialised BloomForCausalLM of `config`'s shape for `tokenizer` (seeded; no dropout)."""
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(
        vocab_size=len(tokenizer), hidden_size=config.hidden, n_layer=config.layers, n_head=config.heads,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        hidden_dropout=0.0, attention_dropout=0.0,
    )
    torch.manual_seed(config.seed)
    model = BloomForCausalLM(cfg)
    if not config.alibi:
        disable_alibi(model)
    return model


def disable_alibi(model) -> None:
    """Control experiment: every attention layer receives a zero ALiBi bias (the model then has no positional
    signal besides causal masking). A forward pre-hook on each attention module does it, so it holds whichever
    way transformers builds the bias (newer versions skip `build_alibi_tensor` when no attention mask is
    given) and under `fast_kernels`. Only for this process: a saved model always reloads with ALiBi."""
    last: list = [None, None]  # (incoming bias, its zeros): one zeros object per forward, shared by all layers

    def zero_alibi(module, args, kwargs):
        alibi = kwargs["alibi"] if "alibi" in kwargs else args[2]
        if last[0] is not alibi:
            last[:] = [alibi, torch.zeros_like(alibi)]
        if "alibi" in kwargs:
            return args, {**kwargs, "alibi": last[1]}
        return (*args[:2], last[1], *args[3:]), kwargs

    adapter = adapter_for(model)
    for layer in range(adapter.n_layer):
        adapter.attention(model, layer).register_forward_pre_hook(zero_alibi, with_kwargs=True)


def crops(stream: torch.Tensor, n: int, body: int, bos: int, generator: torch.Generator) -> torch.Tensor:
    """`n` random crops of `body` tokens, each prefixed with BOS."""
    starts = torch.randint(0, len(stream) - body, (n,), generator=generator)
    idx = starts[:, None] + torch.arange(body)[None, :]
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), stream[idx]], dim=1)


def lr_at(step: int, config: OrganismConfig) -> float:
    """Learning rate at `step`: linear warm-up, then cosine down to `min_lr_frac` of the peak."""
    if step < config.warmup:
        return config.lr * (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return config.lr * (config.min_lr_frac + (1 - config.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))


def pretrain_step(model, opt: torch.optim.Optimizer, params: list, ids: torch.Tensor, clip: float,
                  dp: DataParallel | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on `ids` (bf16 autocast on CUDA, chunked loss, gradient all-reduce under torchrun,
    clipping); returns the loss and gradient norm as tensors, so the GPU is not waited for."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=ids.device.type == "cuda"):
        hidden = model.transformer(input_ids=ids, use_cache=False).last_hidden_state
        loss = causal_lm_loss(model.lm_head, hidden, ids, chunk_tokens=8192)
    loss.backward()
    if dp is not None:
        dp.average_gradients(params)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss, grad_norm
