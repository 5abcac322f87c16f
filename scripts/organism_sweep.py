"""Train several organism variants side by side on one GPU (each its own process), then pick the one
that meets the shipping criteria. Used to make the bundled model; see docs/organism.md.

    python scripts/organism_sweep.py --data DATA_DIR --out RUNS_DIR --variant NAME
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.events import PhaseChanged, StepMetrics  # noqa: E402
from engine.organism import OrganismConfig, train_organism  # noqa: E402

VARIANTS = {
    "A": dict(layers=6, lr=6e-4, weight_decay=0.1),
    "B": dict(layers=6, lr=1e-3, weight_decay=0.3),
    "C": dict(layers=8, lr=1e-3, weight_decay=0.3),
    "B-noalibi": dict(layers=6, lr=1e-3, weight_decay=0.3, alibi=False),
    "C-noalibi": dict(layers=8, lr=1e-3, weight_decay=0.3, alibi=False),
    # session 2: stronger decay, higher lr, and more (smaller) steps in the same time
    "D": dict(layers=6, lr=1e-3, weight_decay=1.0),
    "E": dict(layers=6, lr=2e-3, weight_decay=0.3),
    "F": dict(layers=6, lr=1e-3, weight_decay=0.3, batch_size=16),
    "G": dict(layers=8, lr=1e-3, weight_decay=1.0, batch_size=16),
}


class PrintSink:
    def emit(self, event):
        if isinstance(event, StepMetrics) and event.step % 250 in (0, 1):
            print(f"step {event.step}/{event.total_steps} loss {event.loss:.4f} {event.tokens_per_s:,.0f} tok/s "
                  f"{event.elapsed_s:.0f}s", flush=True)
        elif isinstance(event, PhaseChanged):
            print(f"[{event.phase}] {event.detail}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--variant", required=True, choices=sorted(VARIANTS))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--time-limit", type=float, default=None)
    args = ap.parse_args()
    config = OrganismConfig(steps=args.steps, **VARIANTS[args.variant])
    t0 = time.time()
    record = train_organism(config, args.data, Path(args.out) / args.variant, sink=PrintSink(), time_limit_s=args.time_limit)
    print(json.dumps({"variant": args.variant, "wall_s": round(time.time() - t0), "ppl": record["heldout_ppl"],
                      **{k: v for k, v in record["heldout_diagnosis"].items() if k != "column_mean_bos"}}), flush=True)


if __name__ == "__main__":
    main()
