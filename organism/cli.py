"""The `organism` command: `head-surgeon organism ...` (through `add_parser`) or `python -m organism ...`.

Heavy imports happen inside `cmd_organism`, so building the parser (and `--help`) stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.errors import HeadSurgeonError, InputError

HELP = "pretrain a small ALiBi BLOOM until its low-slope heads collapse"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The command's arguments, on any parser."""
    p.add_argument("--out", required=True, help="directory for the trained model (save_pretrained layout)")
    p.add_argument("--data", help="prepared-data directory (tokenizer + token stream); prepared here if absent "
                   "(default: OUT-data)")
    p.add_argument("--prepare-only", action="store_true", help="only prepare the data (run training elsewhere)")
    p.add_argument("--corpus", default="python-stdlib",
                   help="text file, directory, .jsonl/.parquet, hub dataset id, python-stdlib (default: the "
                   "running Python's standard library) or python-packages (the standard library and every "
                   "installed package's sources)")
    p.add_argument("--corpus-config")
    p.add_argument("--corpus-split")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-budget", type=float, metavar="SECONDS",
                   help="fit the run into this many seconds: measure the step rate during warm-up and lower "
                   "--steps to what fits (the record keeps the steps that reproduce the run)")
    p.add_argument("--time-limit", type=float, metavar="SECONDS",
                   help="stop pretraining after this many seconds (with --state: save it, to resume later)")
    p.add_argument("--state", metavar="FILE",
                   help="resumable run: continue from FILE if it exists; a run stopped by --time-limit saves its "
                   "full training state (fp32 weights, bf16 AdamW moments, batch generator) there")
    p.add_argument("--probe-every", type=int, metavar="N",
                   help="every N steps, diagnose a few held-out blocks and show (and record) where the band stands")
    p.add_argument("--no-alibi", action="store_true", help="control run: train with the ALiBi bias zeroed")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each block for pretraining (faster on a GPU; compiling takes ~15 s)")
    p.add_argument("--device")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the `organism` subcommand on `subparsers` (from `ArgumentParser.add_subparsers`)."""
    p = subparsers.add_parser("organism", help=HELP)
    add_arguments(p)
    p.set_defaults(func=cmd_organism)
    return p


def cmd_organism(args: argparse.Namespace) -> int:
    """Prepare the data unless it is there, pretrain, and print the band; under torchrun rank 0 reports."""
    from rich.console import Console

    from engine.console import ConsoleSink
    from engine.corpus import CorpusSpec

    from .data import DATA_FILE, prepare_data
    from .data_parallel import is_main_process, launched_world_size
    from .recipe import OrganismConfig
    from .train import train_organism

    console = Console()
    config = OrganismConfig(
        layers=args.layers, heads=args.heads, hidden=args.hidden, seq_len=args.seq_len, batch_size=args.batch_size,
        steps=args.steps, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay, seed=args.seed,
        alibi=not args.no_alibi,
    )
    data_dir = Path(args.data) if args.data else Path(f"{args.out.rstrip('/')}-data")
    if launched_world_size() > 1 and not (data_dir / DATA_FILE).is_file():  # ranks would all write the same files at once
        raise InputError(f"no prepared data in {data_dir}: run once without torchrun with --prepare-only first")
    with ConsoleSink(console) as sink:
        if not (data_dir / DATA_FILE).is_file():
            meta = prepare_data(CorpusSpec(args.corpus, args.corpus_config, args.corpus_split), data_dir, args.vocab, sink=sink)
            console.print(f"prepared {meta['tokens']:,} tokens from {meta['documents']} documents into {data_dir}")
        if args.prepare_only:
            return 0
        record = train_organism(config, data_dir, args.out, device=args.device, sink=sink,
                                time_budget_s=args.time_budget, time_limit_s=args.time_limit,
                                probe_every=args.probe_every, compile_blocks=args.compile, state=args.state)
    if not is_main_process():  # under torchrun, rank 0 reports
        return 0
    band = record["heldout_diagnosis"]
    console.print(
        f"held-out ppl {record['heldout_ppl']:.2f}; heads with BOS mass > 0.5: {band['heads_over_0.5']} "
        f"({100 * band['frac_over_0.5']:.1f}%); upper/lower head-index BOS ratio {band['upper_to_lower']:.1f}x"
    )
    console.print(f"model written to {args.out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m organism`: the command alone; an error is one line on stderr and exit status 2."""
    parser = argparse.ArgumentParser(prog="python -m organism", description=HELP)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from engine.runtime import quiet_libraries

    quiet_libraries()
    try:
        return cmd_organism(args)
    except HeadSurgeonError as exc:
        print(f"head-surgeon: error: {exc}", file=sys.stderr)
        return 2
