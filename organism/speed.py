"""Organism pretraining step speed on a GPU (run Q/R shape, random tokens): the SDPA fast path, compiled blocks,
and compiled blocks with FlexAttention (ALiBi score_mod + causal block mask), with a kernel profile of the first.

    python -m organism.speed
"""

from __future__ import annotations

import time
import types

import torch
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from transformers import BloomConfig, BloomForCausalLM

from engine.arch import adapter_for, alibi_slopes
from engine.fastpath import fast_kernels

from .recipe import pretrain_step

SEQ_LEN, VOCAB = 512, 4096


def make(device: torch.device, heads: int = 16, hidden: int = 256, layers: int = 6) -> BloomForCausalLM:
    torch.manual_seed(0)
    config = BloomConfig(vocab_size=VOCAB, hidden_size=hidden, n_layer=layers, n_head=heads,
                         hidden_dropout=0.0, attention_dropout=0.0)
    return BloomForCausalLM(config).to(device).train()


def flex_forward_factory(slopes: torch.Tensor, block_mask: BlockMask):
    """A BloomAttention.forward that runs FlexAttention with the ALiBi bias as a score_mod."""
    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx).to(score.dtype)

    def fwd(self, hidden_states, residual, alibi, attention_mask, layer_past=None, use_cache=False,
            output_attentions=False, **kw):
        b, q_len, _ = hidden_states.shape
        q, k, v = self._reshape(self.query_key_value(hidden_states))
        ctx = flex_attention(q, k, v, score_mod=alibi_mod, block_mask=block_mask, scale=self.inv_norm_factor)
        ctx = ctx.transpose(1, 2).reshape(b, q_len, self.num_heads * self.head_dim)
        return self.dense(ctx) + residual, None
    return fwd


def bench(name: str, batch: int, device: torch.device, compile_blocks: bool = False, flex: bool = False,
          steps: int = 40, warm: int = 10, profile: bool = False) -> None:
    """Time `steps` pretraining steps after `warm` warm-up steps and print one line (and a kernel table)."""
    m = make(device)
    ad = adapter_for(m)
    params = list(m.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    ids_all = torch.randint(0, VOCAB, (steps + warm, batch, SEQ_LEN))
    with fast_kernels(m, ad):
        if flex:
            slopes = torch.tensor(alibi_slopes(16), device=device)
            bm = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, SEQ_LEN, SEQ_LEN, device=device)
            f = flex_forward_factory(slopes, bm)
            for layer in range(ad.n_layer):
                a = ad.attention(m, layer)
                a.forward = types.MethodType(f, a)
        if compile_blocks:
            for blk in ad.blocks(m):
                blk.compile()

        def step(i: int) -> torch.Tensor:
            return pretrain_step(m, opt, params, ids_all[i].to(device, non_blocking=True), clip=1.0)[0]

        t = time.perf_counter()
        for i in range(warm):
            step(i)
        torch.cuda.synchronize()
        tw = time.perf_counter() - t
        t = time.perf_counter()
        for i in range(steps):
            loss = step(warm + i)
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / steps
        print(f"{name:28s} batch {batch:4d}: {dt*1e3:7.2f} ms/step  {batch*SEQ_LEN/dt/1e6:6.3f} M tok/s  "
              f"(warm-up {tw:.1f} s, loss {float(loss):.3f}, peak {torch.cuda.max_memory_allocated()/2**30:.1f} GiB)",
              flush=True)
        if profile:
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as prof
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                for i in range(3):
                    step(i)
                torch.cuda.synchronize()
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60))
    torch.cuda.reset_peak_memory_stats()


def main() -> None:
    device = torch.device("cuda")
    print(torch.__version__, torch.cuda.get_device_name())
    bench("sdpa (current)", 128, device, profile=True)
    bench("sdpa (current)", 64, device)
    bench("sdpa + compiled blocks", 128, device, compile_blocks=True)
    bench("flex + compiled blocks", 128, device, compile_blocks=True, flex=True)
    bench("flex + compiled blocks", 256, device, compile_blocks=True, flex=True)


if __name__ == "__main__":
    main()
