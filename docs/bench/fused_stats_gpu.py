"""GPU check of the fused diagnosis statistics (engine.fused_stats) against the eager probabilities.

Run from the repository root: OUT=DIR python3 docs/bench/fused_stats_gpu.py
For the bloom-1b7 shape (random weights, plus heads planted to sink on the first token so that all classes
occur) in bf16 and fp32: per-head BOS mass, entropy and local mass by both paths, their largest differences
against the issue's bounds (1e-3, 1e-2 nats, 1e-3), and the compiled kernel's first-call time."""

import json
import os
import sys
import time

sys.path[:0] = [".", "tests"]
import torch  # noqa: E402

from engine.arch import adapter_for  # noqa: E402
from engine.bench import SHAPES, build_random_model  # noqa: E402
from engine.diagnosis import run_statistics  # noqa: E402

out = {}
for dtype in (torch.bfloat16, torch.float32):
    model = build_random_model(SHAPES["bloom-1b7"], torch.device("cuda"), dtype)
    adapter = adapter_for(model)
    with torch.no_grad():  # sinks: a few heads of every layer read key 0 through a BOS marker in dimension 0
        emb = model.transformer.word_embeddings.weight
        emb[:, 0] = 0
        emb[0, 0] = 8.0
        d = adapter.head_dim
        for layer in range(adapter.n_layer):
            qkv = adapter.qkv(model, layer)
            for head in range(9, 16, 2):
                rows = adapter.qkv_rows(head).cuda()
                qkv.bias[rows[:d]] = 0
                qkv.bias[rows[0]] = 6.0
                qkv.weight[rows[d]] = 0
                qkv.weight[rows[d], 0] = 6.0
    gen = torch.Generator().manual_seed(0)
    ids = [[0] + torch.randint(1, 250880, (int(n),), generator=gen).tolist()
           for n in torch.randint(200, 512, (32,), generator=gen)]
    t0 = time.perf_counter()
    fused, _ = run_statistics(model, adapter, ids, batch_size=8, path="fused")
    first = time.perf_counter() - t0
    eager, _ = run_statistics(model, adapter, ids, batch_size=8, path="eager")
    name = str(dtype).replace("torch.", "")
    out[name] = {k: float(abs(fused[k] - eager[k]).max()) for k in ("bos_mass", "entropy", "local_mass", "contribution")}
    out[name]["first_call_seconds"] = round(first, 2)
    out[name]["bos_mass_range"] = [float(eager["bos_mass"].min()), float(eager["bos_mass"].max())]
    out[name]["within_bounds"] = (out[name]["bos_mass"] <= 1e-3 and out[name]["entropy"] <= 1e-2
                                  and out[name]["local_mass"] <= 1e-3)
    print(name, out[name], flush=True)
    del model
    torch.cuda.empty_cache()
with open(os.path.join(os.environ.get("OUT", "."), "fused_stats_gpu.json"), "w") as fh:
    json.dump(out, fh, indent=1)
