"""GPU check of the diagnosis paths' statistics against the eager probabilities (engine.flash_stats,
engine.fused_stats). Run from the repository root: OUT=DIR python3 docs/bench/flash_stats_gpu.py

For the bloom-1b7 shape (random weights, plus heads planted to sink on the first token so that every class
occurs), in fp32 and bf16: per-head BOS mass, entropy, local mass and contribution by the kernel, scores and
eager paths over 32 prompts of 200-512 tokens, and the largest difference of each pair, both within a dtype
and against the fp32 eager path (the reference: a bf16 model differs from it by its own rounding, which the
eager-bf16 row shows). Also each path's first-call time (Triton and torch.compile compile then)."""

import json
import os
import sys
import time

sys.path[:0] = ["."]
import torch  # noqa: E402

from engine.arch import adapter_for  # noqa: E402
from engine.bench import SHAPES, build_random_model  # noqa: E402
from engine.diagnosis import run_statistics  # noqa: E402

STATS = ("bos_mass", "entropy", "local_mass", "contribution")


def plant_sinks(model, adapter) -> None:
    """A few heads of every layer read key 0 through a BOS marker in embedding dimension 0."""
    with torch.no_grad():
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
stats, first_call = {}, {}
for dtype in (torch.float32, torch.bfloat16):
    torch.manual_seed(0)
    model = build_random_model(SHAPES["bloom-1b7"], torch.device("cuda"), dtype)
    adapter = adapter_for(model)
    plant_sinks(model, adapter)
    name = str(dtype).replace("torch.", "")
    for path in ("eager", "kernel", "scores"):
        t0 = time.perf_counter()
        stats[name, path], _ = run_statistics(model, adapter, ids, batch_size=8, path=path)
        first_call[f"{path}_{name}"] = round(time.perf_counter() - t0, 2)
    del model
    torch.cuda.empty_cache()

pairs = [(("float32", "kernel"), ("float32", "eager")), (("bfloat16", "kernel"), ("bfloat16", "eager")),
         (("bfloat16", "scores"), ("bfloat16", "eager")), (("bfloat16", "kernel"), ("float32", "eager")),
         (("bfloat16", "eager"), ("float32", "eager"))]
out = {f"{a[1]}_{a[0]}_vs_{b[1]}_{b[0]}": {k: float(abs(stats[a][k] - stats[b][k]).max()) for k in STATS}
       for a, b in pairs}
for key in ("kernel_float32_vs_eager_float32", "kernel_bfloat16_vs_eager_bfloat16"):
    d = out[key]
    d["within_bounds"] = d["bos_mass"] <= 1e-3 and d["entropy"] <= 1e-2 and d["local_mass"] <= 1e-3
out["bos_mass_range"] = [float(stats["float32", "eager"]["bos_mass"].min()),
                         float(stats["float32", "eager"]["bos_mass"].max())]
out["first_call_seconds"] = first_call
out["versions"] = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name()}
print(json.dumps(out, indent=1))
with open(os.path.join(os.environ.get("OUT", "."), "flash_stats_gpu.json"), "w") as fh:
    json.dump(out, fh, indent=1)
