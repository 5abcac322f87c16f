"""The statistics kernel alone on a GPU (bf16, d = 128): before and after its key blocks were split by kind
(session 12), in several block configurations, with and without the head-norm epilogue, against SDPA with
the materialised ALiBi + causal bias that the plain forward uses, and flash SDPA without a bias. Also checks
that both kernels give the same bits at 64 x 64. Run from the repository root, with the kernel before the
split taken from git:
    git show be4b2fe:engine/flash_stats_kernel.py > /tmp/old_kernel.py
    OUT=DIR python3 docs/bench/kernel_split_gpu.py /tmp/old_kernel.py
Results: docs/bench/kernel_split_gpu.json; more configurations in diagnosis_host_gpu.json."""
import importlib.util, json, math, os, sys, time
sys.path[:0] = ["."]
import torch, triton
import torch.nn.functional as F
from engine import flash_stats, fused_stats
import engine.flash_stats_kernel as newk
spec = importlib.util.spec_from_file_location("oldk", sys.argv[1])
oldk = importlib.util.module_from_spec(spec); spec.loader.exec_module(oldk)
dev = torch.device("cuda")
out_json = {}

def timed(fn, iters=100):
    for _ in range(10): fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True)
        a.record()
        for _ in range(iters): fn()
        b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) * 1000 / iters)
    return round(min(ts), 2)

def launcher(mod, q, k, v, slopes, scale, gram, bm, bn, warps, stages, head_norm=True):
    batch, n_heads, length, head_dim = q.shape
    out = torch.empty((batch, length, n_heads, head_dim), dtype=q.dtype, device=dev)
    rows = torch.empty((4 if head_norm else 3, n_heads, batch, length), dtype=torch.float32, device=dev)
    hi, lo = gram if head_norm else (None, None)
    def go():
        mod.attention_statistics[(batch * n_heads, triton.cdiv(length, bm))](
            q, k, v, out, rows, slopes, hi, lo, float(scale), n_heads, batch, length, *q.stride()[:3],
            HEAD_DIM=head_dim, BLOCK_D=head_dim, BLOCK_M=bm, BLOCK_N=bn, ROUND=True, IEEE=False, BITWISE=False,
            UPCAST=False, HEAD_NORM=head_norm, GRAM_LO=lo is not None, num_warps=warps, num_stages=stages)
        return out, rows
    return go

for name, (B, H, L, d) in {"bloom-1b7": (8, 16, 512, 128), "bloom-7b1": (8, 32, 512, 128),
                           "bloom-1b7-L2048": (2, 16, 2048, 128)}.items():
    torch.manual_seed(0)
    fused = torch.randn(B, L, H, 3, d, device=dev).mul(1.5).to(torch.bfloat16)
    q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
    w = (torch.randn(H * d, H * d, device=dev) / math.sqrt(H * d)).view(-1, H, d).transpose(0, 1)
    gram = flash_stats.gram_parts(w.transpose(1, 2) @ w, torch.bfloat16)
    slopes = fused_stats.alibi_slopes(H, dev)
    scale = 1 / math.sqrt(d)
    res = {}
    a = launcher(oldk, q, k, v, slopes, scale, gram, 64, 64, 4, 3)()
    a = (a[0].clone(), a[1].clone())
    b = launcher(newk, q, k, v, slopes, scale, gram, 64, 64, 4, 3)()
    res["bitwise_equal_old_new"] = bool(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]))
    res["max_stat_diff"] = float((a[1] - b[1]).abs().max())
    res["old_64x64_w4_s3"] = timed(launcher(oldk, q, k, v, slopes, scale, gram, 64, 64, 4, 3))
    res["old_64x64_w4_s3_nonorm"] = timed(launcher(oldk, q, k, v, slopes, scale, gram, 64, 64, 4, 3, False))
    for bm, bn, wp, st in [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 3),
                           (128, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 3), (64, 64, 8, 3)]:
        try:
            res[f"new_{bm}x{bn}_w{wp}_s{st}"] = timed(launcher(newk, q, k, v, slopes, scale, gram, bm, bn, wp, st))
        except Exception as e:  # out of shared memory and the like
            res[f"new_{bm}x{bn}_w{wp}_s{st}"] = repr(e)[:120]
    res["new_64x64_w4_s3_nonorm"] = timed(launcher(newk, q, k, v, slopes, scale, gram, 64, 64, 4, 3, False))
    # SDPA as the plain forward runs it: a materialised ALiBi + causal bias
    alibi = (slopes[:, None] * torch.arange(L, device=dev)[None]).to(torch.bfloat16)
    causal = torch.ones(L, L, dtype=torch.bool, device=dev).tril()
    bias = (alibi.view(1, H, 1, L) + torch.zeros(L, L, dtype=torch.bfloat16, device=dev).masked_fill(~causal, -3e38)).expand(B, H, L, L).contiguous()
    res["sdpa_bias"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale))
    res["sdpa_causal_flash"] = timed(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
    out_json[name] = res
    print(name, json.dumps(res, indent=1), flush=True)
json.dump(out_json, open(os.path.join(os.environ.get("OUT", "/tmp"), "kernel_split_gpu.json"), "w"), indent=1)
