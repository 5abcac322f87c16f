"""torch.profiler of one diagnosis (bloom-1b7 shape, random weights, 2 batches of 8 x 512) on a GPU: the
kernels that take the time. Run from the repository root: python3 docs/bench/profile_diagnosis.py"""
import sys, torch
sys.path[:0] = [".", "tests"]
from torch.profiler import profile, ProfilerActivity
from engine.arch import adapter_for
from engine.bench import SHAPES, build_random_model, random_ids
from engine.diagnosis import run_statistics
model = build_random_model(SHAPES["bloom-1b7"], torch.device("cuda"), torch.bfloat16)
adapter = adapter_for(model)
ids = [r.tolist() for r in random_ids(250880, 16, 512, "cpu", 1)]
run_statistics(model, adapter, ids, batch_size=8)
torch.cuda.synchronize()
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    run_statistics(model, adapter, ids, batch_size=8)
    torch.cuda.synchronize()
print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))
print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=15, max_name_column_width=60))
