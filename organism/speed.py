"""Organism pretraining step speed on a GPU (run Q/R shape, random tokens): the SDPA fast path, compiled blocks,
and compiled blocks with FlexAttention (ALiBi score_mod + causal block mask), with a kernel profile of the first.

    python -m organism.speed
"""
import time
import types

import torch
from torch.nn.attention.flex_attention import create_block_mask, flex_attention
from transformers import BloomConfig, BloomForCausalLM

from engine.arch import adapter_for, alibi_slopes
from engine.fastpath import fast_kernels

from .recipe import pretrain_step

dev = torch.device("cuda")
L, V = 512, 4096

def make(heads=16, hidden=256, layers=6):
    torch.manual_seed(0)
    m = BloomForCausalLM(BloomConfig(vocab_size=V, hidden_size=hidden, n_layer=layers, n_head=heads,
                                     hidden_dropout=0.0, attention_dropout=0.0)).to(dev).train()
    return m

def flex_forward_factory(slopes, block_mask):
    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx).to(score.dtype)
    def fwd(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False, output_attentions=False, **kw):
        b, q_len, _ = hidden_states.shape
        q, k, v = self._reshape(self.query_key_value(hidden_states))
        ctx = flex_attention(q, k, v, score_mod=alibi_mod, block_mask=block_mask, scale=self.inv_norm_factor)
        ctx = ctx.transpose(1, 2).reshape(b, q_len, self.num_heads * self.head_dim)
        return self.dense(ctx) + residual, None
    return fwd

def bench(name, batch, compile_blocks=False, flex=False, steps=40, warm=10, profile=False):
    m = make(); ad = adapter_for(m)
    params = list(m.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    ids_all = torch.randint(0, V, (steps + warm, batch, L))
    with fast_kernels(m, ad):
        if flex:
            slopes = torch.tensor(alibi_slopes(16), device=dev)
            bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, L, L, device=dev)
            f = flex_forward_factory(slopes, bm)
            for layer in range(ad.n_layer):
                a = ad.attention(m, layer); a.forward = types.MethodType(f, a)
        if compile_blocks:
            for blk in m.transformer.h: blk.compile()
        def step(i):
            return pretrain_step(m, opt, params, ids_all[i].to(dev, non_blocking=True), clip=1.0)[0]
        t = time.perf_counter()
        for i in range(warm): step(i)
        torch.cuda.synchronize(); tw = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(steps): loss = step(warm + i)
        torch.cuda.synchronize(); dt = (time.perf_counter() - t) / steps
        print(f"{name:28s} batch {batch:4d}: {dt*1e3:7.2f} ms/step  {batch*L/dt/1e6:6.3f} M tok/s  "
              f"(warm-up {tw:.1f} s, loss {float(loss):.3f}, peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB)", flush=True)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                for i in range(3): step(i)
                torch.cuda.synchronize()
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    torch.cuda.reset_peak_memory_stats()

if __name__ == "__main__":
    print(torch.__version__, torch.cuda.get_device_name())
    bench("sdpa (current)", 128, profile=True)
    bench("sdpa (current)", 64)
    bench("sdpa + compiled blocks", 128, compile_blocks=True)
    bench("flex + compiled blocks", 128, compile_blocks=True, flex=True)
    bench("flex + compiled blocks", 256, compile_blocks=True, flex=True)
