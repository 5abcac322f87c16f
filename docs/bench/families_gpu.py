"""GPU check of the three families in bf16: diagnosis finds planted heads, exact and fast paths against the
model's own outputs (bf16 and fp32), and a short operate with a sham control and a completion.

Run from the repository root on a CUDA machine: OUT=DIR python3 docs/bench/families_gpu.py"""
import json, os, subprocess, sys, time
from pathlib import Path

import torch

sys.path[:0] = [".", "tests"]
from helpers import plant_collapse, save_model, tiny_family_model  # noqa: E402

from engine.diagnosis import diagnose  # noqa: E402
from engine.fastpath import fast_kernels, probabilities_exposed  # noqa: E402
from engine.model import load_model  # noqa: E402
from engine.prompts import builtin_prompts  # noqa: E402

out = Path(os.environ["OUT"])
result = {}
for fam in ("bloom", "mpt", "falcon"):
    model = tiny_family_model(fam, n_layer=8, n_head=16, hidden=1024)
    plant_collapse(model, [(2, 15), (5, 14)])
    directory = save_model(model, Path(f"/tmp/{fam}"))
    row = {}
    for dtype in ("bf16", "fp32"):
        loaded = load_model(str(directory), device="cuda", dtype=dtype)
        t = time.perf_counter()
        report = diagnose(loaded, builtin_prompts())
        row[f"diagnose_{dtype}_s"] = round(time.perf_counter() - t, 2)
        row[f"sick_{dtype}"] = report.sick()
        ids = torch.randint(3, 300, (4, 512), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
        with torch.no_grad():
            default = loaded.model(input_ids=ids, use_cache=False).logits.float()
            with probabilities_exposed(loaded.model, loaded.adapter):
                exact = loaded.model(input_ids=ids, use_cache=False).logits.float()
            with fast_kernels(loaded.model, loaded.adapter):
                fast = loaded.model(input_ids=ids, use_cache=False).logits.float()
        row[f"exact_vs_default_{dtype}"] = float((exact - default).abs().max())
        row[f"fast_vs_default_{dtype}"] = float((fast - default).abs().max())
        if dtype == "fp32":
            row["bf16_default_vs_fp32"] = float((bf16_default - default).abs().max())
            row["bf16_fast_vs_fp32"] = float((bf16_fast - default).abs().max())
            row["bf16_exact_vs_fp32"] = float((bf16_exact - default).abs().max())
        bf16_default, bf16_fast, bf16_exact = default, fast, exact
        del loaded
    t = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "engine.cli", "operate", "--model", str(directory), "--targets", "sick",
                           "--corpus", "python-stdlib/json", "--steps", "40", "--seq-len", "512", "--completions", "1",
                           "--control", "sham", "--out", f"/tmp/run-{fam}"], capture_output=True, text=True)
    row["operate_rc"], row["operate_s"] = done.returncode, round(time.perf_counter() - t, 1)
    if done.returncode:
        row["operate_err"] = done.stderr[-2000:]
    else:
        rep = json.loads(Path(f"/tmp/run-{fam}/report.json").read_text())
        row.update(ppl=rep["ppl"], verdict=rep["verdict"]["text"], woken=rep["recovery"]["woken"],
                   tokens_per_s=rep["passes"][0]["tokens_per_s"], completion=rep["completions"]["after"][0]["completion"][:80])
    result[fam] = row
    print(fam, json.dumps(row), flush=True)
(out / "families.json").write_text(json.dumps(result, indent=1))
