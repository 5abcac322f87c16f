"""A whole diagnosis against the plain SDPA forward on a GPU (random weights in a real shape, 12 batches of
8 x 512): wall time of four runs each, then under torch.profiler the kernels' device time and the GPU
timeline's idle time. `*_gpu_busy_ms` counts operator and kernel rows both (about twice the kernels' time).
Run from the repository root: OUT=DIR python3 docs/bench/diagnosis_gpu_time.py [SHAPE]
Results: docs/bench/diagnosis_gpu_time-SHAPE.json (session 12: run with the split kernel in 64 x 64 blocks,
before 64 x 32 was chosen)."""
import json, os, sys, time
sys.path[:0] = [".", "tests"]
import torch
from torch.profiler import profile, ProfilerActivity
from engine.arch import adapter_for
from engine.bench import SHAPES, build_random_model, random_ids
from engine.diagnosis import run_statistics
from engine.fastpath import fast_kernels
shape = sys.argv[1] if len(sys.argv) > 1 else "bloom-1b7"
model = build_random_model(SHAPES[shape], torch.device("cuda"), torch.bfloat16)
adapter = adapter_for(model)
batches = [random_ids(SHAPES[shape].vocab, 8, 512, "cuda", 1 + i) for i in range(12)]
lists = [r for b in batches for r in b.cpu().tolist()]
def ours(): run_statistics(model, adapter, lists, batch_size=8)
@torch.no_grad()
def plain():
    model.eval()
    with fast_kernels(model, adapter):
        for b in batches: model.transformer(input_ids=b, use_cache=False)
res = {}
for name, fn in (("ours", ours), ("plain", plain)):
    fn(); torch.cuda.synchronize()
for name, fn in (("ours", ours), ("plain", plain)) * 4:
    torch.cuda.synchronize(); t = time.perf_counter(); fn(); torch.cuda.synchronize()
    res.setdefault(name + "_wall_ms", []).append(round((time.perf_counter() - t) * 1000, 2))
for name, fn in (("ours", ours), ("plain", plain)):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn(); torch.cuda.synchronize()
    ka = prof.key_averages()
    gpu = sum(e.self_device_time_total for e in ka) / 1000
    res[name + "_gpu_busy_ms"] = round(gpu, 2)
    top = sorted(ka, key=lambda e: -e.self_device_time_total)[:12]
    res[name + "_top"] = [(e.key[:70], round(e.self_device_time_total / 1000, 2), e.count) for e in top]
    # gaps: the GPU timeline's idle time between kernels
    evs = sorted([(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA"])
    idle, last = 0.0, evs[0][1]
    for s, e in evs[1:]:
        if s > last: idle += s - last
        last = max(last, e)
    res[name + "_gpu_span_ms"] = round((last - evs[0][0]) / 1000, 2)
    res[name + "_gpu_idle_ms"] = round(idle / 1000, 2)
print(json.dumps(res, indent=1))
json.dump(res, open(os.path.join(os.environ.get("OUT", "/tmp"), f"diagnosis_gpu_time-{shape}.json"), "w"), indent=1)
