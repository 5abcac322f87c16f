"""Diagnosis statistics without the eager attention's probabilities: BLOOM on a GPU.

The eager path writes every layer's scores, fp32 softmax and bf16 probabilities, multiplies them with the
values, and the diagnosis hook then reads the probabilities again in fp32: several full passes over a
[B, H, L, L] tensor per layer, which made diagnosis about 0.35x a plain forward on bloom-1b7. Within
`statistics_attention` every attention module hands the statistics collector its per-row mass on key 0,
entropy and local mass (keys i, i-1, i-2) instead, by one of two paths, and the MLP runs the fused GeLU, as
in training:
  - kernel (the default on CUDA): the layer's output and its statistics from one flash-attention kernel over
    BLOOM's own scores (engine.flash_stats); nothing of size [B, H, L, L] is written;
  - scores (CUDA without the kernel: no Triton, or a GPU before compute capability 8.0): the scores
    computed exactly as BLOOM's eager code does (`alibi.baddbmm(q, k^T)` in the model's dtype, plus its
    additive mask) and reduced in one compiled kernel (`row_statistics`), and the output through SDPA
    (engine.fastpath).
Both compute the statistics in fp32 from the scores in the model's dtype (eager rounds the probabilities to
bf16 first); their outputs differ from eager's by bf16 rounding, which later layers see
(docs/benchmarks.md has the measured differences). On CUDA the reduction and the contribution sums are
compiled with torch.compile (a process's first diagnosis compiles them); elsewhere (CPU: tests) the same
functions run uncompiled, and the kernel under Triton's interpreter.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import flash_stats
from .arch import Adapter
from .fastpath import _combined_bias, _swapped, fused_gelu


def local_band(x: torch.Tensor) -> torch.Tensor:
    """Per query row of x [..., Lq, Lk], the sum over keys i, i-1 and i-2 (the local mass of probabilities)."""
    local = torch.diagonal(x, 0, -2, -1)
    for back in (1, 2):
        if x.shape[-1] > back:
            local = local + F.pad(torch.diagonal(x, -back, -2, -1), (back, 0))
    return local


def row_statistics(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """[3, B, H, Lq] (mass on key 0, entropy in nats, local mass) of the scores [B, H, Lq, Lk] with the model's
    additive mask (masked keys at the dtype's minimum), added in the scores' dtype as the eager path adds it;
    the rest in fp32."""
    s = (scores + mask if mask is not None else scores).float()
    # two passes over a row: its maximum, then the sums of e = exp(s - max) and of e * (s - max); the entropy
    # is log-sum-exp - E_p[s], and the masses are e at the keys over the sum (no probability row is formed)
    top = s.amax(-1, keepdim=True)
    shifted = s - top
    e = torch.exp(shifted)
    z = e.sum(-1)
    weighted = torch.where(e > 0, e * shifted, 0.0).sum(-1)  # masked keys: e = 0 at the dtype's minimum score
    entropy = torch.log(z) - weighted / z  # relative to the maximum: no two numbers of size slope x L subtracted
    return torch.stack((e[..., 0] / z, entropy, local_band(e) / z))


def dense_terms(ctx: torch.Tensor, out: torch.Tensor, gram: torch.Tensor, bias: torch.Tensor | None,
                weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The contribution sums of one `dense` call: per head sum_rows w ||W_h c_h|| ([H]) and sum_rows w ||y - b||,
    in fp32 (engine.diagnosis.HeadStatsCollector, which holds the per-head Gram matrices W_h^T W_h)."""
    n_head, d = gram.shape[0], gram.shape[-1]
    c = ctx.float().reshape(-1, n_head, d).transpose(0, 1)  # [H, B*L, d]
    head_sq = (torch.bmm(c, gram) * c).sum(-1)  # ||W_h c_h||^2, [H, B*L]
    total = out.float() - bias.float() if bias is not None else out.float()
    w = weights.reshape(-1)
    return head_sq.clamp_min(0).sqrt() @ w, total.norm(dim=-1).reshape(-1) @ w


@functools.cache
def _compiled():
    return torch.compile(row_statistics, dynamic=True)


@functools.cache
def compiled_dense_terms():
    """`dense_terms` as one compiled graph (CUDA): the casts, the norms and the weighted sums fused."""
    return torch.compile(dense_terms, dynamic=True)


PATHS = ("kernel", "scores", "eager")


def default_path(adapter: Adapter, device: torch.device) -> str:
    """The diagnosis path used unless one is asked for: for BLOOM on CUDA, the statistics kernel where it runs
    (`flash_stats.kernel_available`), else its scores reduced; the eager probabilities elsewhere (CPU, other
    families)."""
    if adapter.family != "bloom" or device.type != "cuda":
        return "eager"
    return "kernel" if flash_stats.kernel_available(device) else "scores"


def _stats_forward(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
                   output_attentions=False, **kwargs):
    # generation and probability requests take the eager path, and on the scores path so do masks other than
    # transformers' additive float one; the collector's hook then reads the probabilities (the kernel reads no
    # mask: diagnosis's batches are causal and right-padded)
    if layer_past is not None or output_attentions or (self._hs_slopes is None and (
            attention_mask is None or not attention_mask.is_floating_point())):
        return self._hs_original_forward(hidden_states, residual, alibi, attention_mask, layer_past=layer_past,
                                         use_cache=use_cache, output_attentions=output_attentions, **kwargs)
    batch, q_len, _ = hidden_states.shape
    q, k, v = self._reshape(self.query_key_value(hidden_states))  # [B, H, L, d] each
    collector, layer = self._hs_collector, self._hs_layer
    if self._hs_slopes is not None:  # one kernel: output and statistics (engine.flash_stats)
        rows, norms = collector.layer_buffers(layer, batch, q_len)
        ctx, _ = flash_stats.attention_with_statistics(q, k, v, self._hs_slopes, self.inv_norm_factor,
                                                       collector.gram_parts(layer, self.dense, q.dtype), rows)
        out = self.dense(ctx)
        flash_stats.output_norms(out, self.dense.bias, norms)
    else:  # the scores reduced; the output projection's hook measures the contribution
        flat = lambda x: x.reshape(batch * self.num_heads, -1, self.head_dim)  # noqa: E731
        scores = alibi.baddbmm(batch1=flat(q), batch2=flat(k).transpose(-1, -2), beta=self.beta,
                               alpha=self.inv_norm_factor).view(batch, self.num_heads, q_len, -1)
        collector.add_row_stats(layer, self._hs_reduce(scores, attention_mask))
        bias = _combined_bias(self, alibi, attention_mask, batch, q_len, q.dtype)
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=0.0, scale=self.inv_norm_factor)
        out = self.dense(ctx.transpose(1, 2).reshape(batch, q_len, self.num_heads * self.head_dim))
    return F.dropout(out, p=self.hidden_dropout, training=self.training) + residual, None


def alibi_slopes(n_head: int, device) -> torch.Tensor:
    """BLOOM's per-head ALiBi slopes in fp32, as transformers' `build_alibi_tensor` computes them (its
    position-1 entries), for any head count."""
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    ones = torch.ones(1, 2, dtype=torch.long, device=device)
    return build_alibi_tensor(ones, n_head, torch.float32)[:, 0, 1].contiguous()


@contextmanager
def statistics_attention(model, adapter: Adapter, collector, *, kernel: bool = False, compiled: bool | None = None):
    """Within the block every BLOOM attention module measures its heads into `collector`
    (engine.diagnosis.HeadStatsCollector), and the MLP runs the fused GeLU (as in training: the eager path's
    several-kernel GeLU and its launches cost more than the statistics). `kernel`: output, statistics and
    head output norms from one flash-attention kernel (engine.flash_stats; the model must be called with
    unpadded or right-padded rows, as diagnosis batches them), and the layer's output norms from another;
    otherwise BLOOM's scores are reduced by `row_statistics` and the output runs through SDPA, and `compiled`
    (default: on CUDA) fuses the reduction."""
    modules = [adapter.attention(model, layer) for layer in range(adapter.n_layer)]
    device = next(model.parameters()).device
    reduce = _compiled() if (device.type == "cuda" if compiled is None else compiled) else row_statistics
    slopes = alibi_slopes(adapter.n_head, device) if kernel else None
    shared_cache: list = []
    with fused_gelu(model, adapter), _swapped(modules, _stats_forward, _hs_bias_cache=shared_cache,
                                              _hs_reduce=reduce, _hs_collector=collector, _hs_layer=None,
                                              _hs_slopes=slopes):
        for layer, module in enumerate(modules):
            module._hs_layer = layer
        try:
            yield
        finally:
            shared_cache.clear()
