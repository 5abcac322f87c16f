"""Surgery on the bundled organism on a GPU without `datasets` (the GPU box lacks it): the corpus is read
with plain Python and packed by the engine, then `run_job` runs as `head-surgeon operate` would.

    python scripts/gpu_operate.py --out runs/gpu --steps 200
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.console import ConsoleSink, print_operation  # noqa: E402
from engine.corpus import CorpusSpec, pack_corpus  # noqa: E402
from engine.diagnosis import diagnose  # noqa: E402
from engine.evaluate import EvalSettings  # noqa: E402
from engine.model import load_model  # noqa: E402
from engine.operation import SurgeryJob, run_job  # noqa: E402
from engine.prompts import builtin_prompts  # noqa: E402
from engine.surgery import SurgeryPlan  # noqa: E402
from engine.train import TrainConfig  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--targets", default="sick")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--attention", default="sdpa")
    args = ap.parse_args()
    root = Path(sysconfig.get_paths()["stdlib"]) / "email"
    texts = [p.read_text(errors="ignore") for p in sorted(root.rglob("*.py"))]
    loaded = load_model(None)
    corpus = pack_corpus(loaded.tokenizer, texts, 512, 0.05, str(root))
    prompts = builtin_prompts()
    baseline = diagnose(loaded, prompts)
    plan = SurgeryPlan.from_specs(args.targets, None, loaded.adapter, sick=baseline.sick())
    job = SurgeryJob([plan], CorpusSpec(str(root)), TrainConfig(steps=args.steps, lr=args.lr, eval_every=50,
                                                               attention=args.attention), EvalSettings())
    t0 = time.time()
    with ConsoleSink() as sink:
        report = run_job(loaded, job, args.out, prompts=prompts, sink=sink, baseline=baseline, corpus=corpus)
    print_operation(report)
    p = report["passes"][0]
    print(json.dumps({"device": report["device"], "dtype": report["dtype"], "wall_s": round(time.time() - t0, 1),
                      "train_seconds": p["train_seconds"], "tokens_per_s": round(p["tokens_per_s"]),
                      "train_blocks": report["corpus"]["train_blocks"]}))


if __name__ == "__main__":
    main()
