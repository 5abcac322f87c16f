"""Fused kernels for BLOOM's training and evaluation path.

transformers' BLOOM attention is eager only (scores, fp32 softmax and probabilities materialised per layer),
and its GeLU is a hand-written autograd function of several elementwise kernels. Within
`fast_kernels(model, adapter)` every attention module computes the same function through
`scaled_dot_product_attention` with the ALiBi bias as a float mask (memory-efficient or cuDNN kernel on
CUDA; no probabilities returned), and every MLP uses PyTorch's fused tanh GeLU (the same formula).
Diagnosis keeps the eager path, because it needs the probabilities themselves.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .arch import BloomAdapter


def _combined_bias(module, alibi: torch.Tensor, attention_mask, batch: int, q_len: int, dtype) -> torch.Tensor:
    """ALiBi + causal/padding mask as one additive [B, H, Lq, Lk] tensor, built once per forward and shared
    by every layer (all layers receive the same `alibi` and mask objects)."""
    cache = module._hs_bias_cache
    if cache and cache[0] is alibi and cache[1] is attention_mask:
        return cache[2]
    k_len = alibi.shape[-1]
    bias = alibi.view(batch, -1, 1, k_len).to(dtype)
    if attention_mask is None:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=alibi.device).tril(k_len - q_len)
        mask = torch.zeros(q_len, k_len, dtype=dtype, device=alibi.device).masked_fill(~causal, torch.finfo(dtype).min)
    elif attention_mask.dtype == torch.bool:
        mask = torch.zeros(attention_mask.shape, dtype=dtype, device=alibi.device).masked_fill(
            ~attention_mask, torch.finfo(dtype).min)
    else:
        mask = attention_mask.to(dtype)
    bias = (bias + mask).expand(batch, -1, q_len, k_len)
    module._hs_bias_cache[:] = [alibi, attention_mask, bias]
    return bias


def _sdpa_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                  output_attentions=False, **kwargs):
    if layer_past is not None or output_attentions:  # generation and probability requests take the exact path
        return self._hs_eager_forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                      use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch, q_len, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))  # [B, H, L, d] each
    bias = _combined_bias(self, alibi, attention_mask, batch, q_len, q.dtype)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, scale=self.inv_norm_factor)
    ctx = ctx.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
    out = self.dense(ctx)
    out = F.dropout(out, p=self.hidden_dropout, training=self.training) + residual
    return out, None


def _tanh_gelu(self, x):
    return F.gelu(x, approximate="tanh")


@contextmanager
def fast_kernels(model, adapter: BloomAdapter, enabled: bool = True):
    """Within the block, BLOOM attention runs through SDPA (no attention probabilities are returned) and
    the MLP through the fused tanh GeLU."""
    if not enabled:
        yield
        return
    modules = [adapter.attention(model, layer) for layer in range(adapter.n_layer)]
    gelus = [block.mlp.gelu_impl for block in adapter.blocks(model)]
    shared_cache: list = []
    for m in modules:
        m._hs_eager_forward = m.forward
        m._hs_bias_cache = shared_cache
        m.forward = types.MethodType(_sdpa_forward, m)
    for g in gelus:
        g.forward = types.MethodType(_tanh_gelu, g)
    try:
        yield
    finally:
        shared_cache.clear()
        for m in modules:
            del m.forward, m._hs_eager_forward, m._hs_bias_cache
        for g in gelus:
            del g.forward
