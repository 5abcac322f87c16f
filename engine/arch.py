"""Architecture adapters: where each attention head lives inside a model's fused tensors, one adapter a family.

An adapter answers every structural question the engine asks (blocks, attention module, a head's Q/K/V rows
and output columns, MLP projections, per-head ALiBi slopes as the family's transformers code applies them),
so diagnosis and surgery never hard-code module paths or tensor layouts. Supported: BLOOM, MPT and Falcon
with ALiBi (Falcon-RW). BLOOM and Falcon-RW interleave q, k and v per head in `query_key_value`; MPT's `Wqkv`
holds all queries, then all keys, then all values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .errors import InputError, UnsupportedModelError

SUPPORTED = ("BLOOM (bigscience/bloom-560m ... bloom-176b), MPT (mosaicml/mpt-7b, mpt-30b) and Falcon with ALiBi "
             "(tiiuae/falcon-rw-1b, falcon-rw-7b)")


def alibi_slopes(n_head: int) -> list[float]:
    """Per-head ALiBi slopes exactly as transformers' BLOOM builds them (any head count)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # build_alibi_tensor returns slope * position; at position 1 that is the slope itself.
    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_head, torch.float32)
    return [float(x) for x in alibi[:, 0, 1]]


def mpt_alibi_slopes(n_head: int, alibi_bias_max: float) -> list[float]:
    """Per-head slopes as transformers' MPT builds its bias (`alibi_bias_max`, head counts not powers of two)."""
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    bias = build_mpt_alibi_tensor(n_head, 2, alibi_bias_max)  # [H, 1, 2]: -slope, 0
    return [float(-x) for x in bias[:, 0, 0]]


def falcon_alibi_slopes(n_head: int, head_dim: int) -> list[float]:
    """Falcon-RW's slopes on the attention logits: its ALiBi tensor divided by sqrt(head_dim), as the model
    folds it into the mask (the tensor itself is built in bf16)."""
    from transformers.models.falcon.modeling_falcon import build_alibi_tensor

    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_head, torch.float32)
    return [float(x) / math.sqrt(head_dim) for x in alibi[:, 0, 1]]


@dataclass(frozen=True)
class Adapter:
    """Head geometry of one family; subclasses name the modules and the Q/K/V layout."""

    n_layer: int
    n_head: int
    hidden_size: int
    max_len: int | None = None  # the longest sequence the model takes (MPT builds ALiBi for max_seq_len only)
    family: ClassVar[str] = ""
    interleaved: ClassVar[bool] = True  # q, k, v per head ([H, 3, d]) rather than [3, H, d]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def slopes(self) -> list[float]:  # pragma: no cover - every family defines it
        raise NotImplementedError

    # --- module access -------------------------------------------------------------------------
    def body(self, model: nn.Module) -> nn.Module:
        return base_model(model)

    def blocks(self, model: nn.Module) -> nn.ModuleList:  # pragma: no cover
        raise NotImplementedError

    def attention(self, model: nn.Module, layer: int) -> nn.Module:  # pragma: no cover
        raise NotImplementedError

    def qkv(self, model: nn.Module, layer: int) -> nn.Linear:  # pragma: no cover
        raise NotImplementedError

    def dense(self, model: nn.Module, layer: int) -> nn.Linear:  # pragma: no cover
        raise NotImplementedError

    def mlp_in(self, block: nn.Module) -> nn.Linear:  # pragma: no cover
        raise NotImplementedError

    def mlp_out(self, block: nn.Module) -> nn.Linear:  # pragma: no cover
        raise NotImplementedError

    # --- head slices -----------------------------------------------------------------------------
    def qkv_rows(self, head: int) -> torch.Tensor:
        """Rows of the fused Q/K/V weight (and bias) owned by `head`, in the order q (d rows), k, v."""
        d = self.head_dim
        if self.interleaved:
            return torch.arange(3 * d * head, 3 * d * (head + 1))
        return torch.cat([torch.arange(part * self.hidden_size + d * head, part * self.hidden_size + d * (head + 1))
                          for part in range(3)])

    def check_length(self, length: int, what: str) -> None:
        """One line when `length` tokens are more than the model takes."""
        if self.max_len is not None and length > self.max_len:
            raise InputError(f"{what} {length} is longer than this {self.family} model takes ({self.max_len} tokens, "
                             f"its max_seq_len): give {self.max_len} or less")

    def dense_cols(self, head: int) -> slice:
        """Columns of the output projection that read `head`'s context vector."""
        d = self.head_dim
        return slice(d * head, d * (head + 1))


@dataclass(frozen=True)
class BloomAdapter(Adapter):
    """`BloomForCausalLM`: `transformer.h[l].self_attention.{query_key_value,dense}`, q/k/v interleaved."""

    family: ClassVar[str] = "bloom"

    @property
    def slopes(self) -> list[float]:
        return alibi_slopes(self.n_head)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return base_model(model).h

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return self.blocks(model)[layer].self_attention

    def qkv(self, model: nn.Module, layer: int) -> nn.Linear:
        return self.attention(model, layer).query_key_value

    def dense(self, model: nn.Module, layer: int) -> nn.Linear:
        return self.attention(model, layer).dense

    def mlp_in(self, block: nn.Module) -> nn.Linear:
        return block.mlp.dense_h_to_4h

    def mlp_out(self, block: nn.Module) -> nn.Linear:
        return block.mlp.dense_4h_to_h


@dataclass(frozen=True)
class FalconAdapter(BloomAdapter):
    """`FalconForCausalLM` with ALiBi (Falcon-RW): BLOOM's module names and layout, bias optional, and its
    ALiBi scaled by 1/sqrt(head_dim) on the logits."""

    family: ClassVar[str] = "falcon"

    @property
    def slopes(self) -> list[float]:
        return falcon_alibi_slopes(self.n_head, self.head_dim)


@dataclass(frozen=True)
class MptAdapter(Adapter):
    """`MptForCausalLM`: `transformer.blocks[l].attn.{Wqkv,out_proj}`, all queries, then keys, then values."""

    alibi_bias_max: float = 8.0
    family: ClassVar[str] = "mpt"
    interleaved: ClassVar[bool] = False

    @property
    def slopes(self) -> list[float]:
        return mpt_alibi_slopes(self.n_head, self.alibi_bias_max)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return base_model(model).blocks

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return self.blocks(model)[layer].attn

    def qkv(self, model: nn.Module, layer: int) -> nn.Linear:
        return self.attention(model, layer).Wqkv

    def dense(self, model: nn.Module, layer: int) -> nn.Linear:
        return self.attention(model, layer).out_proj

    def mlp_in(self, block: nn.Module) -> nn.Linear:
        return block.ffn.up_proj

    def mlp_out(self, block: nn.Module) -> nn.Linear:
        return block.ffn.down_proj


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body (`BloomModel`, `MptModel`, `FalconModel`) of a causal-LM wrapper, or the model itself."""
    return getattr(model, "transformer", model)


def _refuse(config, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"unsupported model ({why}): head-surgeon supports {SUPPORTED}; pass one of those "
                                 "as a hub id or a local directory")


def adapter_for(model_or_config) -> Adapter:
    """The adapter of a supported model or config; one line naming the supported families otherwise."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type == "bloom":
        return BloomAdapter(n_layer=config.n_layer, n_head=config.n_head, hidden_size=config.hidden_size)
    if model_type == "mpt":
        attn = config.attn_config
        if not getattr(attn, "alibi", True):
            raise _refuse(config, "an MPT model without ALiBi")
        if getattr(attn, "qk_ln", False) or getattr(attn, "attn_type", "multihead_attention") != "multihead_attention" \
                or not getattr(config, "no_bias", True):
            # transformers' MPT implements none of these: it would load and compute another model than the checkpoint's
            raise _refuse(config, "an MPT model with qk_ln, multi-query attention or biases, which transformers' MPT "
                                  "does not implement")
        return MptAdapter(n_layer=config.n_layers, n_head=config.n_heads, hidden_size=config.d_model,
                          max_len=config.max_seq_len, alibi_bias_max=float(attn.alibi_bias_max))
    if model_type == "falcon":
        if not config.alibi:
            raise _refuse(config, "a Falcon model with rotary positions, not ALiBi (Falcon-7B/40B and later)")
        if config.multi_query or config.new_decoder_architecture:
            raise _refuse(config, "a Falcon model whose heads share keys and values (multi-query or the new decoder)")
        return FalconAdapter(n_layer=config.num_hidden_layers, n_head=config.num_attention_heads,
                             hidden_size=config.hidden_size)
    raise _refuse(config, f"architecture {model_type!r}")
