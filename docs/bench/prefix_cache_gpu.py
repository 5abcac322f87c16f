"""GPU check of the frozen-prefix cache: device and pinned-host modes against no cache (fp32 and bf16).

Run from the repository root on a CUDA machine: OUT=DIR python3 docs/bench/prefix_cache_gpu.py"""
import json, os, sys
from pathlib import Path

import torch

sys.path[:0] = [".", "tests"]
from helpers import plant_collapse, save_model, tiny_model  # noqa: E402

from engine.events import ListSink  # noqa: E402
from engine.model import load_model  # noqa: E402
from engine.operation import run_job  # noqa: E402
from engine.patch import load_patch  # noqa: E402
from engine.prompts import builtin_prompts  # noqa: E402
from engine.workflow import JobInputs  # noqa: E402

model = tiny_model(n_layer=6, n_head=8, hidden=256)
plant_collapse(model, [(4, 3), (5, 1)])
directory = save_model(model, Path("/tmp/pc-model"))
corpus = Path("/tmp/pc-corpus.txt")
corpus.write_text("\n\n".join(builtin_prompts() * 2))
result = {}
for dtype in ("fp32", "bf16"):
    patches = {}
    for mode, gb in (("off", 0.0), ("device", 4.0), ("host", 4.0)):
        loaded = load_model(str(directory), device="cuda", dtype=dtype)
        job = JobInputs(targets="4.3,5.1", corpus=str(corpus), epochs=3, seq_len=64, grad_accum=2, lr=1e-3,
                        completions=0, eval_blocks=2, eval_every=1000, track_blocks=2).build_job(loaded.adapter)
        job.evaluation.ablation_blocks = 2
        job.train.prefix_cache_gb = gb
        job.train.prefix_cache_where = "host" if mode == "host" else "device"
        out = Path(f"/tmp/pc-{dtype}-{mode}")
        report = run_job(loaded, job, out, sink=ListSink())
        patches[mode] = load_patch(out / "patch.safetensors")[0]
        result[f"{dtype}-{mode}"] = {"cache": report["passes"][0]["prefix_cache"],
                                     "heldout_after": report["ppl"]["heldout_after"]}
    for mode in ("device", "host"):
        result[f"{dtype}-{mode}-max_diff_vs_off"] = max(float((patches[mode][k].float() - patches["off"][k].float()).abs().max())
                                                        for k in patches["off"])
print(json.dumps(result, indent=1))
Path(os.environ["OUT"], "prefix_gpu.json").write_text(json.dumps(result, indent=1))
