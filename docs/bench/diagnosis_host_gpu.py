"""Diagnosis's host time on a GPU machine: one launch of each statistics kernel and of a few torch calls
(tiny inputs), a whole diagnosis and the plain forward on tiny batches (8 x 16 tokens, so that the GPU waits
on the host) with their cProfile; then more block configurations of the split kernel (session 12). Run from
the repository root: OUT=DIR python3 docs/bench/diagnosis_host_gpu.py (results: diagnosis_host_gpu.json)."""
import cProfile, io, json, math, os, pstats, sys, time
sys.path[:0] = [".", "tests"]
import torch, triton
from engine import flash_stats, fused_stats
import engine.flash_stats_kernel as newk
from engine.arch import adapter_for
from engine.bench import SHAPES, build_random_model, random_ids
from engine.diagnosis import run_statistics
from engine.fastpath import fast_kernels
dev = torch.device("cuda")
res = {}
# one launch's host time
B, H, L, d = 1, 16, 16, 128
fused = torch.randn(B, L, H, 3, d, device=dev).to(torch.bfloat16)
q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
w = torch.randn(H * d, H * d, device=dev).view(-1, H, d).transpose(0, 1)
gram = flash_stats.gram_parts(w.transpose(1, 2) @ w, torch.bfloat16)
slopes = fused_stats.alibi_slopes(H, dev)
rows = torch.empty((4, H, B, L), device=dev)
y = torch.randn(B * L, H * d, device=dev).to(torch.bfloat16); bias = torch.zeros(H * d, device=dev, dtype=torch.bfloat16)
norms = torch.empty(B * L, device=dev)
def per_call(fn, n=3000):
    for _ in range(50): fn()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n): fn()
    host = (time.perf_counter() - t) / n * 1e6
    torch.cuda.synchronize()
    return round(host, 2)
res["launch_attention_with_statistics_us"] = per_call(lambda: flash_stats.attention_with_statistics(q, k, v, slopes, 0.1, gram, rows))
res["launch_output_norms_us"] = per_call(lambda: flash_stats.output_norms(y, bias, norms))
res["torch_empty_us"] = per_call(lambda: torch.empty((B, L, H, d), dtype=torch.bfloat16, device=dev))
res["torch_add_us"] = per_call(lambda: y + y)
lin = torch.nn.Linear(H * d, H * d, device=dev, dtype=torch.bfloat16)
res["torch_linear_us"] = per_call(lambda: lin(y))
print(json.dumps(res), flush=True)
# whole diagnosis, host-bound: tiny batches
model = build_random_model(SHAPES["bloom-1b7"], dev, torch.bfloat16)
adapter = adapter_for(model)
tiny = [random_ids(SHAPES["bloom-1b7"].vocab, 8, 16, "cuda", 1 + i) for i in range(40)]
lists = [r for b in tiny for r in b.cpu().tolist()]
def ours(): run_statistics(model, adapter, lists, batch_size=8)
@torch.no_grad()
def plain():
    model.eval()
    with fast_kernels(model, adapter):
        for b in tiny: model.transformer(input_ids=b, use_cache=False)
for fn in (ours, plain): fn()
for name, fn in (("ours", ours), ("plain", plain)) * 3:
    torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
    res.setdefault(name + "_tiny_ms_per_batch", []).append(round((time.perf_counter() - t) * 1000 / len(tiny), 3))
for name, fn in (("ours", ours), ("plain", plain)):
    pr = cProfile.Profile(); pr.enable(); fn(); torch.cuda.synchronize(); pr.disable()
    s = io.StringIO(); pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(30)
    print(name, s.getvalue()[:6000], flush=True)
print(json.dumps(res), flush=True)
# more block configurations (bloom-1b7 and bloom-7b1 shapes)
def timed(fn, iters=100):
    for _ in range(10): fn()
    torch.cuda.synchronize(); ts = []
    for _ in range(5):
        a, b = torch.cuda.Event(True), torch.cuda.Event(True); a.record()
        for _ in range(iters): fn()
        b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b) * 1000 / iters)
    return round(min(ts), 2)
for name, (B, H, L, d) in {"bloom-1b7": (8, 16, 512, 128), "bloom-7b1": (8, 32, 512, 128), "L2048": (2, 16, 2048, 128), "L128": (32, 16, 128, 128)}.items():
    fused = torch.randn(B, L, H, 3, d, device=dev).mul(1.5).to(torch.bfloat16)
    q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
    w = (torch.randn(H * d, H * d, device=dev) / math.sqrt(H * d)).view(-1, H, d).transpose(0, 1)
    gram = flash_stats.gram_parts(w.transpose(1, 2) @ w, torch.bfloat16)
    slopes = fused_stats.alibi_slopes(H, dev)
    out = torch.empty((B, L, H, d), dtype=q.dtype, device=dev); rows = torch.empty((4, H, B, L), device=dev)
    r = {}
    for bm, bn, wp, st, norm in [(64, 32, 4, 3, True), (64, 32, 4, 2, True), (64, 32, 4, 4, True), (64, 32, 2, 3, True),
                                 (64, 32, 4, 3, False), (32, 32, 2, 3, True), (32, 32, 4, 3, True), (64, 16, 4, 3, True),
                                 (128, 32, 8, 3, True), (128, 64, 8, 2, True), (64, 64, 4, 2, True)]:
        def go():
            newk.attention_statistics[(B * H, triton.cdiv(L, bm))](
                q, k, v, out, rows, slopes, gram[0] if norm else None, gram[1] if norm else None, 0.088, H, B, L,
                *q.stride()[:3], HEAD_DIM=d, BLOCK_D=d, BLOCK_M=bm, BLOCK_N=bn, ROUND=True, IEEE=False,
                BITWISE=False, UPCAST=False, HEAD_NORM=norm, GRAM_LO=norm, num_warps=wp, num_stages=st)
        try:
            r[f"{bm}x{bn}_w{wp}_s{st}{'' if norm else '_nonorm'}"] = timed(go)
        except Exception as e:
            r[f"{bm}x{bn}_w{wp}_s{st}"] = repr(e)[:100]
    res[name] = r
    print(name, json.dumps(r), flush=True)
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), "diagnosis_host_gpu.json"), "w"), indent=1)
