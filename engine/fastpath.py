"""Fused kernels for the training and evaluation path, and the exact path diagnosis reads probabilities from.

transformers' BLOOM and MPT attention are eager only (scores, fp32 softmax and probabilities materialised per
layer), and BLOOM's GeLU is a hand-written autograd function of several elementwise kernels. Within
`fast_kernels(model, adapter)` every attention module computes the same function through
`scaled_dot_product_attention` with the ALiBi bias as a float mask (memory-efficient or cuDNN kernel on
CUDA; no probabilities returned), and BLOOM's MLP uses PyTorch's fused tanh GeLU (the same formula).
Diagnosis keeps the eager path, because it needs the probabilities themselves.

Falcon-RW is the other way round: transformers runs it through SDPA by default, with ALiBi / sqrt(d)
folded into the mask, and its eager path (the one `output_attentions` takes) adds ALiBi a second time
(transformers 5.24: its probabilities match a twice-biased softmax to 3e-8, not the model's own outputs).
So for Falcon both paths here are ours: SDPA with the model's mask as the fast one, and the same mask with
an explicit softmax as the one diagnosis reads (`probabilities_exposed`), which computes the model's outputs.
"""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .arch import Adapter


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
        return self._hs_original_forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                         use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch, q_len, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))  # [B, H, L, d] each
    bias = _combined_bias(self, alibi, attention_mask, batch, q_len, q.dtype)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, scale=self.inv_norm_factor)
    ctx = ctx.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)
    out = self.dense(ctx)
    out = F.dropout(out, p=self.hidden_dropout, training=self.training) + residual
    return out, None


def _mpt_bias(module, position_bias: torch.Tensor, attention_mask, q_len: int, dtype) -> torch.Tensor:
    """MPT's ALiBi + the boolean mask (True: masked) as one additive tensor, shared by every layer like BLOOM's.
    transformers keeps the bias in fp32, as slope x (j + 1 - L): cast to bf16 as it stands, the early queries'
    keys would all sit near -slope x L, where bf16 cannot tell neighbours apart. So it is taken relative to the
    query, slope x (j - i) (the same softmax for every row), in fp32 and cast after."""
    cache = module._hs_bias_cache
    if cache and cache[0] is position_bias and cache[1] is attention_mask:
        return cache[2]
    last = position_bias[:, :, -q_len:].float()  # [H, 1, Lk]: slope x (j + 1 - Lk), as MptAttention slices it
    bias = (last - last.transpose(-1, -2)).to(dtype)[None]  # [1, H, Lq, Lk]: slope x (j - i)
    if attention_mask is None:
        attention_mask = ~torch.ones(q_len, q_len, dtype=torch.bool, device=bias.device).tril()
    bias = bias.masked_fill(attention_mask, torch.finfo(dtype).min)
    module._hs_bias_cache[:] = [position_bias, attention_mask, bias]
    return bias


def _mpt_sdpa_forward(self, hidden_states, position_bias, cache=None, attention_mask=None, **kwargs):
    if cache is not None:  # generation takes transformers' own path
        return self._hs_original_forward(hidden_states, position_bias, cache=cache, attention_mask=attention_mask,
                                         **kwargs)
    batch, q_len = hidden_states.shape[:2]
    qkv = self.Wqkv(hidden_states)
    if self.clip_qkv:
        qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
    q, k, v = (x.reshape(batch, q_len, self.n_heads, self.head_dim).transpose(1, 2) for x in qkv.chunk(3, dim=2))
    bias = _mpt_bias(self, position_bias, attention_mask, q_len, q.dtype)
    ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, scale=self.softmax_scale)
    return self.out_proj(ctx.transpose(1, 2).reshape(batch, q_len, -1)), None


def _falcon_forward(self, hidden_states, alibi=None, attention_mask=None, *args, layer_past=None, **kwargs):
    """Falcon-RW attention with ALiBi applied once, as the model's mask holds it: through SDPA, or (when
    `_hs_probabilities`) with an explicit fp32 softmax whose probabilities it returns."""
    if layer_past is not None or alibi is None or args:
        if self._hs_probabilities:  # transformers' paths return none, or the twice-biased ones: never silently
            raise RuntimeError("Falcon probabilities are read without a cache: call the model with use_cache=False")
        return self._hs_original_forward(hidden_states, alibi, attention_mask, *args, layer_past=layer_past, **kwargs)
    batch, q_len, _ = hidden_states.shape
    q, k, v = (x.transpose(1, 2) for x in self._split_heads(self.query_key_value(hidden_states)))  # [B, H, L, d]
    probs = None
    if self._hs_probabilities:
        scores = (q.float() @ k.float().transpose(-1, -2)) * self.inv_norm_factor + attention_mask.float()
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        ctx = probs @ v
    else:
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask.to(q.dtype), dropout_p=0.0,
                                             scale=self.inv_norm_factor)
    return self.dense(ctx.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim)), probs


def _tanh_gelu(self, x):
    return F.gelu(x, approximate="tanh")


@contextmanager
def _swapped(modules: list, forward, **attributes):
    """Each module's forward replaced by `forward` (its own kept as `_hs_original_forward`) within the block."""
    for m in modules:
        m._hs_original_forward = m.forward
        for name, value in attributes.items():
            setattr(m, name, value)
        m.forward = types.MethodType(forward, m)
    try:
        yield
    finally:
        for m in modules:
            del m.forward, m._hs_original_forward
            for name in attributes:
                delattr(m, name)


@contextmanager
def fast_kernels(model, adapter: Adapter, enabled: bool = True):
    """Within the block, attention runs through SDPA (no attention probabilities are returned) and BLOOM's
    MLP through the fused tanh GeLU."""
    if not enabled:
        yield
        return
    modules = [adapter.attention(model, layer) for layer in range(adapter.n_layer)]
    shared_cache: list = []
    if adapter.family == "falcon":
        with _swapped(modules, _falcon_forward, _hs_probabilities=False):
            yield
        return
    forward = _mpt_sdpa_forward if adapter.family == "mpt" else _sdpa_forward
    try:
        with fused_gelu(model, adapter), _swapped(modules, forward, _hs_bias_cache=shared_cache):
            yield
    finally:
        shared_cache.clear()


@contextmanager
def fused_gelu(model, adapter: Adapter):
    """Within the block BLOOM's MLP runs PyTorch's fused tanh GeLU (the formula of its own several-kernel
    function); other families are left as they are."""
    gelus = [block.mlp.gelu_impl for block in adapter.blocks(model)] if adapter.family == "bloom" else []
    for g in gelus:
        g.forward = types.MethodType(_tanh_gelu, g)
    try:
        yield
    finally:
        for g in gelus:
            del g.forward


@contextmanager
def probabilities_exposed(model, adapter: Adapter):
    """Within the block every attention module returns its probabilities as the model computes them (BLOOM's
    and MPT's own eager paths do; Falcon-RW's goes through `_falcon_forward`)."""
    if adapter.family != "falcon":
        yield
        return
    with _swapped([adapter.attention(model, layer) for layer in range(adapter.n_layer)], _falcon_forward,
                  _hs_probabilities=True):
        yield
