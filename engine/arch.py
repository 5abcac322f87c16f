"""Architecture adapters: where each attention head lives inside a model's fused tensors.

Only BLOOM is supported today. An adapter answers every structural question the engine asks,
so diagnosis and surgery never hard-code module paths.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UnsupportedModelError

SUPPORTED = "BLOOM (model_type 'bloom', ALiBi attention)"


def alibi_slopes(n_head: int) -> list[float]:
    """Per-head ALiBi slopes exactly as transformers' BLOOM builds them (any head count)."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    # build_alibi_tensor returns slope * position; at position 1 that is the slope itself.
    alibi = build_alibi_tensor(torch.ones(1, 2, dtype=torch.long), n_head, torch.float32)
    return [float(x) for x in alibi[:, 0, 1]]


@dataclass(frozen=True)
class BloomAdapter:
    """Head geometry of a HF `BloomForCausalLM` (q, k, v interleaved per head in `query_key_value`)."""

    n_layer: int
    n_head: int
    hidden_size: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def slopes(self) -> list[float]:
        return alibi_slopes(self.n_head)

    @staticmethod
    def from_config(config) -> "BloomAdapter":
        model_type = getattr(config, "model_type", None)
        if model_type != "bloom":
            raise UnsupportedModelError(
                f"unsupported architecture {model_type!r}: head-surgeon supports {SUPPORTED}; "
                "pass a BLOOM checkpoint such as bigscience/bloom-560m or a local BLOOM directory"
            )
        return BloomAdapter(n_layer=config.n_layer, n_head=config.n_head, hidden_size=config.hidden_size)

    # --- module access -------------------------------------------------------------------
    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return base_model(model).h

    def attention(self, model: nn.Module, layer: int) -> nn.Module:
        return self.blocks(model)[layer].self_attention

    def qkv(self, model: nn.Module, layer: int) -> nn.Linear:
        return self.attention(model, layer).query_key_value

    def dense(self, model: nn.Module, layer: int) -> nn.Linear:
        return self.attention(model, layer).dense

    # --- head slices -------------------------------------------------------------------------
    def qkv_rows(self, head: int) -> slice:
        """Rows of `query_key_value.weight` (and bias) owned by `head`: q, k, v of that head."""
        d = self.head_dim
        return slice(3 * d * head, 3 * d * (head + 1))

    def dense_cols(self, head: int) -> slice:
        """Columns of `dense.weight` that read `head`'s context vector."""
        d = self.head_dim
        return slice(d * head, d * (head + 1))


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body (`BloomModel`) of a causal-LM wrapper, or the model itself."""
    return getattr(model, "transformer", model)


def adapter_for(model_or_config) -> BloomAdapter:
    config = getattr(model_or_config, "config", model_or_config)
    return BloomAdapter.from_config(config)
