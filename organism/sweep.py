"""Train several organism variants side by side on one GPU (each its own process), then pick the one
that meets the shipping criteria. Used to make the bundled model; see docs/organism.md.

    python -m organism.sweep --data DATA_DIR --out RUNS_DIR --variant NAME [--time-budget S]
    python -m organism.sweep --prepare-packages DATA_DIR
    torchrun --standalone --nproc-per-node 4 -m organism.sweep ...   (one run, data-parallel)

`--prepare-packages` writes the same data as `head-surgeon organism --corpus python-packages --prepare-only`,
reading the files with plain `open` (identical text to `datasets`' document-wise text builder, checked on
the standard library) for GPU machines that have no `datasets`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from engine.corpus import PYTHON_PACKAGES, python_source_files
from engine.events import Event, PhaseChanged, StepMetrics

from .data import prepare_texts, sample_stride
from .data_parallel import is_main_process
from .recipe import OrganismConfig
from .train import train_organism

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
    # session 3: the same recipes on python-packages (10x+ more distinct text: no more 10-epoch memorising)
    "H": dict(layers=6, lr=1e-3, weight_decay=0.3),
    "I": dict(layers=6, lr=2e-3, weight_decay=0.3),
    "J": dict(layers=6, heads=32, lr=1e-3, weight_decay=0.3),
    "K": dict(layers=6, lr=2e-3, weight_decay=1.0),
    # session 4: more heads per width, a higher lr, a bigger batch, and fewer (wider) layers under the 16 MiB cap
    "J2": dict(layers=6, heads=32, lr=2e-3, weight_decay=0.3),
    "M": dict(layers=6, lr=3e-3, weight_decay=0.3),
    "P": dict(layers=6, lr=2e-3, weight_decay=0.3, batch_size=64),
    "N3": dict(layers=3, hidden=384, lr=2e-3, weight_decay=0.3),
    "N4": dict(layers=4, lr=2e-3, weight_decay=0.3),
    "N4w": dict(layers=4, hidden=320, lr=2e-3, weight_decay=0.3),
    # data-parallel over 4 GPUs (torchrun): four times the tokens of I per step, in the same wall time
    "Q": dict(layers=6, lr=2e-3, weight_decay=0.3, batch_size=128),
    "Q-noalibi": dict(layers=6, lr=2e-3, weight_decay=0.3, batch_size=128, alibi=False),
    # session 5: Q's recipe on one GPU with compiled blocks, over three chained calls (about 3x Q's tokens)
    "R": dict(layers=6, lr=2e-3, weight_decay=0.3, batch_size=128),
    "R-noalibi": dict(layers=6, lr=2e-3, weight_decay=0.3, batch_size=128, alibi=False),
}


class PrintSink:
    """Plain progress lines (every 250 steps, every phase and probe) for logs of unattended runs."""

    def emit(self, event: Event) -> None:
        if isinstance(event, StepMetrics) and event.step % 250 in (0, 1):
            print(f"step {event.step}/{event.total_steps} loss {event.loss:.4f} {event.tokens_per_s:,.0f} tok/s "
                  f"{event.elapsed_s:.0f}s", flush=True)
        elif isinstance(event, PhaseChanged):  # includes the band probes
            print(f"[{event.phase}] {event.detail}", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m organism.sweep", description="train one organism variant "
                                 "(or prepare python-packages data without `datasets`)")
    ap.add_argument("--prepare-packages", metavar="DATA_DIR")
    ap.add_argument("--max-chars", type=int, default=None, help="with --prepare-packages: keep every k-th file")
    ap.add_argument("--data")
    ap.add_argument("--out")
    ap.add_argument("--variant", choices=sorted(VARIANTS))
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--time-limit", type=float, default=None)
    ap.add_argument("--time-budget", type=float, default=None)
    ap.add_argument("--probe-every", type=int, default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--state", default=None, help="resumable run: state file to continue from and save to")
    args = ap.parse_args(argv)
    if args.prepare_packages:
        t0 = time.time()
        files = python_source_files(installed=True)
        texts = [t for t in (open(f, encoding="utf-8", errors="ignore").read() for f in files) if t.strip()]
        description = PYTHON_PACKAGES
        stride = sample_stride(texts, args.max_chars) if args.max_chars else 1
        if stride > 1:  # every k-th document: bounds the preparation time on a machine with many packages
            texts = texts[::stride]
            description += f", every {stride}th document"
        meta = prepare_texts(texts, description, args.prepare_packages, sink=PrintSink())
        print(json.dumps({**meta, "wall_s": round(time.time() - t0)}), flush=True)
        return
    if not (args.data and args.out and args.variant):
        ap.error("--data, --out and --variant are required to train")
    config = OrganismConfig(steps=args.steps, **VARIANTS[args.variant])
    t0 = time.time()
    record = train_organism(config, args.data, Path(args.out) / args.variant, sink=PrintSink(),
                            time_limit_s=args.time_limit, time_budget_s=args.time_budget,
                            probe_every=args.probe_every, compile_blocks=args.compile,
                            state=args.state)
    if is_main_process():  # under torchrun, rank 0 speaks for the run
        print(json.dumps({"variant": args.variant, "wall_s": round(time.time() - t0), "ppl": record["heldout_ppl"],
                          **{k: v for k, v in record["heldout_diagnosis"].items() if k != "column_mean_bos"}}), flush=True)


if __name__ == "__main__":
    main()
