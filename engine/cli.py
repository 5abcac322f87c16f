"""`head-surgeon` command line: every workbench capability is reachable headless from here."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import HeadSurgeonError, InputError


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:
        pass


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="hub id (e.g. bigscience/bloom-560m) or local directory; default: the bundled organism")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")


def add_diagnosis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", help="diagnostic prompts: .jsonl ({\"text\": ...} per line) or .txt (one per line)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-len", type=int, default=512, help="truncate prompts to this many tokens")
    p.add_argument("--sink", type=float, default=0.50, help="BOS mass above this is a BOS sink")
    p.add_argument("--dead", type=float, default=0.95, help="BOS mass above this is dead")
    p.add_argument("--low-entropy", type=float, default=0.5, help="entropy (nats) below this is low-entropy")


def diagnosis_settings(args):
    from .diagnosis import DiagnosisSettings
    from .report import Thresholds

    return DiagnosisSettings(
        batch_size=args.batch_size,
        max_len=args.max_len,
        thresholds=Thresholds(sink=args.sink, dead=args.dead, low_entropy=args.low_entropy),
    )


def load_from_args(args):
    from .model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision)


def cmd_diagnose(args) -> int:
    from rich.console import Console

    from .console import print_report
    from .diagnosis import diagnose
    from .prompts import load_prompts

    console = Console(stderr=False)
    settings = diagnosis_settings(args)
    prompts = load_prompts(args.prompts)
    with console.status("loading model…"):
        loaded = load_from_args(args)
    with console.status(f"diagnosing {loaded.name} on {len(prompts)} prompts ({loaded.device}, {loaded.dtype})…"):
        report = diagnose(loaded, prompts, settings)
    print_report(report, console)
    if args.json:
        report.save(args.json)
        console.print(f"report written to {args.json}")
    return 0


def cmd_organism(args) -> int:
    from rich.console import Console

    from .console import ConsoleSink
    from .corpus import CorpusSpec
    from .data_parallel import is_main_process, launched_world_size
    from .organism import DATA_FILE, OrganismConfig, prepare_data, train_organism

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


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", required=True,
                   help="text file, directory of text files, .jsonl/.parquet with a text column, hub dataset id, "
                   "python-stdlib or python-packages")
    p.add_argument("--corpus-config", help="hub dataset config (e.g. en for allenai/c4)")
    p.add_argument("--corpus-split", help="hub dataset split (e.g. validation)")
    p.add_argument("--text-column", default="text")
    p.add_argument("--max-documents", type=int, help="use only the first N documents")


def add_train_args(p: argparse.ArgumentParser) -> None:
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="optimizer steps")
    length.add_argument("--epochs", type=int, help="epochs over the training blocks (default 1)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=8)
    p.add_argument("--warmup-frac", type=float, default=0.05)
    p.add_argument("--eval-every", type=int, default=50, help="evaluate every N optimizer steps (and per epoch)")
    p.add_argument("--eval-blocks", type=int, default=16, help="held-out blocks for perplexity")
    p.add_argument("--no-checkpointing", action="store_true", help="disable gradient checkpointing")
    p.add_argument("--seed", type=int, default=0)


def job_from_args(args, loaded, sick):
    from .corpus import CorpusSpec
    from .evaluate import EvalSettings
    from .operation import SurgeryJob
    from .report import Thresholds
    from .surgery import SurgeryPlan
    from .train import TrainConfig

    plans = [SurgeryPlan.from_specs(args.targets, args.frozen, loaded.adapter, sick=sick, init=args.init, seed=args.seed)]
    if args.pass2_targets:
        plans.append(SurgeryPlan.from_specs(args.pass2_targets, args.pass2_frozen, loaded.adapter, sick=sick,
                                            init=args.init, seed=args.seed + 1))
    train = TrainConfig(lr=args.lr, micro_batch=args.micro_batch, grad_accum=args.grad_accum, seq_len=args.seq_len,
                        steps=args.steps, epochs=args.epochs, warmup_frac=args.warmup_frac, eval_every=args.eval_every,
                        eval_blocks=args.eval_blocks, gradient_checkpointing=not args.no_checkpointing, seed=args.seed)
    corpus = CorpusSpec(args.corpus, args.corpus_config, args.corpus_split, args.text_column, args.max_documents)
    evaluation = EvalSettings(thresholds=Thresholds(sink=args.sink, dead=args.dead, low_entropy=args.low_entropy),
                              completion_prompts=args.completions)
    return SurgeryJob(plans, corpus, train, evaluation)


def run_recorded(loaded, job, out, *, prompts, baseline, console, session=None, resume=False) -> dict:
    """run_job with rich progress, recording into `session` (autosaved) when one is given."""
    from .console import ConsoleSink, print_operation
    from .events import MultiSink
    from .operation import run_job
    from .session import SessionRecorder

    if session is not None:
        session.set_run_dir(out)
        session.status = "running"
        session.log("resume" if resume else "operate", run_dir=session.run_dir)
        session.save()
    with ConsoleSink(console) as printer:
        sink = MultiSink(printer, SessionRecorder(session) if session is not None else None)
        report = run_job(loaded, job, out, prompts=prompts, sink=sink, baseline=baseline, resume=resume)
    if session is not None:
        session.save()
    print_operation(report, console)
    console.print(f"patch and report written to {out}" + (f"; session {session.path}" if session else ""))
    return report


def new_session(loaded, args, baseline, job):
    from .model import model_identity
    from .session import Session
    from .spec import format_heads

    session = Session(model=model_identity(loaded), job=job.to_dict(), report=baseline.to_json(),
                      diagnosis={"batch_size": args.batch_size, "max_len": args.max_len, "prompts": args.prompts,
                                 "thresholds": {"sink": args.sink, "dead": args.dead, "low_entropy": args.low_entropy}},
                      marks={"targets": format_heads(job.targets), "frozen": format_heads(job.frozen)})
    session.log("diagnose", sick=len(baseline.sick()))
    session.log("mark", targets=session.marks["targets"], frozen=session.marks["frozen"])
    return session


def cmd_operate(args) -> int:
    from rich.console import Console

    from .diagnosis import diagnose
    from .patch import export_model
    from .prompts import load_prompts

    console = Console()
    prompts = load_prompts(args.prompts)
    with console.status("loading model…"):
        loaded = load_from_args(args)
    settings = diagnosis_settings(args)
    with console.status(f"diagnosing {loaded.name} before surgery…"):
        baseline = diagnose(loaded, prompts, settings)
    job = job_from_args(args, loaded, baseline.sick())
    session = None
    if args.session:
        session = new_session(loaded, args, baseline, job)
        session.path = Path(args.session)
    run_recorded(loaded, job, args.out, prompts=prompts, baseline=baseline, console=console, session=session)
    if args.export:
        export_model(loaded.model, loaded.tokenizer, args.export)
        console.print(f"repaired model exported to {args.export}")
    return 0


def default_run_dir(name: str) -> Path:
    """sessions/NAME in the working directory, numbered when it exists."""
    from .session import DEFAULT_DIR

    out, n = DEFAULT_DIR / name, 2
    while out.exists():
        out, n = DEFAULT_DIR / f"{name}-{n}", n + 1
    return out


def _session_model(session, args):
    """Load the session's base model (or --model) and refuse a different one."""
    from .model import check_identity, load_model

    ref = args.model or session.model.get("ref")
    loaded = load_model(ref, device=args.device, dtype=args.dtype, revision=session.model.get("revision"))
    check_identity(session.model, loaded, f"session {session.path}")
    return loaded


def _session_settings(session):
    from .diagnosis import DiagnosisSettings
    from .report import Thresholds

    d = session.diagnosis
    return DiagnosisSettings(batch_size=int(d.get("batch_size", 8)), max_len=int(d.get("max_len", 512)),
                             thresholds=Thresholds(**d.get("thresholds", {})))


def cmd_replay(args) -> int:
    """Re-execute a session's recorded actions headless into a new run directory and session."""
    from rich.console import Console

    from .diagnosis import diagnose
    from .operation import SurgeryJob
    from .prompts import load_prompts
    from .session import Session

    console = Console()
    original = Session.load(args.session)
    if not original.job:
        raise InputError(f"session {args.session} has no surgery to replay: it only holds a diagnosis")
    with console.status("loading model…"):
        loaded = _session_model(original, args)
    prompts = load_prompts(original.diagnosis.get("prompts"))
    with console.status("diagnosing before surgery…"):
        baseline = diagnose(loaded, prompts, _session_settings(original))
    job = SurgeryJob.from_dict(original.job, loaded.adapter, sick=baseline.sick())
    out = Path(args.out) if args.out else default_run_dir(f"{Path(args.session).stem}-replay")
    replay = Session(model=original.model, diagnosis=original.diagnosis, job=job.to_dict(), report=baseline.to_json(),
                     marks=original.marks, path=out / "session.json")
    replay.log("replay", of=str(Path(args.session).resolve()))
    replay.log("diagnose", sick=len(baseline.sick()))
    run_recorded(loaded, job, out, prompts=prompts, baseline=baseline, console=console, session=replay)
    return 0


def cmd_resume(args) -> int:
    """Continue a session's interrupted run from its last checkpoint."""
    from rich.console import Console

    from .errors import InputError
    from .operation import SurgeryJob
    from .prompts import load_prompts
    from .report import HeadReport
    from .session import Session

    console = Console()
    session = Session.load(args.session)
    run = session.run_path()
    if not session.job or run is None:
        raise InputError(f"session {args.session} has no run to resume: start one with operate --session")
    if session.status == "finished":
        raise InputError(f"session {args.session} already finished: use replay to run it again")
    loaded = _session_model(session, args)
    baseline = HeadReport.from_json(session.report) if session.report else None
    job = SurgeryJob.from_dict(session.job, loaded.adapter, sick=baseline.sick() if baseline else None)
    prompts = load_prompts(session.diagnosis.get("prompts"))
    run_recorded(loaded, job, run, prompts=prompts, baseline=baseline, console=console, session=session, resume=True)
    return 0


def cmd_apply(args) -> int:
    from .model import check_identity
    from .patch import apply_head_tensors, export_model, load_patch
    from .spec import format_heads

    tensors, meta = load_patch(args.patch)
    loaded = load_from_args(args)
    if not args.force:
        check_identity(meta.get("base_model", {}), loaded, f"patch {args.patch}")
    heads = apply_head_tensors(loaded.model, loaded.adapter, tensors)
    export_model(loaded.model, loaded.tokenizer, args.out)
    print(f"applied {len(heads)} heads ({format_heads(heads)}) to {loaded.name}; model written to {args.out}")
    return 0


def cmd_bench(args) -> int:
    import json

    from rich.console import Console

    from .atomic import atomic_write_text
    from .bench import print_bench, run_bench

    console = Console()
    shape = "tiny" if args.tiny else args.shape
    batch, seq_len = (2, 64) if args.tiny else (args.batch, args.seq_len)
    with console.status(f"benchmarking {shape} (B={batch} x L={seq_len})…"):
        result = run_bench(shape, args.device, batch=batch, seq_len=seq_len, steps=2 if args.tiny else args.steps,
                           warmup=1 if args.tiny else 2, diag_batches=2 if args.tiny else 6)
    print_bench(result, console)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
        console.print(f"results written to {args.json}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="head-surgeon",
        description="Diagnose and repair collapsed attention heads in ALiBi (BLOOM) transformers. "
        "With no command, opens the workbench.",
    )
    add_model_args(parser)
    parser.add_argument("--prompts", help="diagnostic prompts for the workbench (.jsonl or .txt)")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("diagnose", help="measure every head and classify it (healthy / BOS-sink / dead / low-entropy)")
    add_model_args(p)
    add_diagnosis_args(p)
    p.add_argument("--json", help="write the report as JSON to this path")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("operate", help="re-initialise target heads and retrain only them; writes a patch and report")
    add_model_args(p)
    add_diagnosis_args(p)
    p.add_argument("--targets", required=True, help="head spec, e.g. 3.9-15,5-22.9-15,23.12 or sick")
    p.add_argument("--frozen", help="heads kept frozen for the record (never trained), same spec language")
    p.add_argument("--pass2-targets", help="second pass, started from the first pass's best checkpoint")
    p.add_argument("--pass2-frozen")
    p.add_argument("--init", choices=("xavier_uniform", "xavier_normal"), default="xavier_uniform")
    add_corpus_args(p)
    add_train_args(p)
    p.add_argument("--completions", type=int, default=3, help="sample this many prompt completions before/after")
    p.add_argument("--out", required=True, help="directory for patch.safetensors, report.json and checkpoints")
    p.add_argument("--export", help="also write the repaired model (save_pretrained) into this new directory")
    p.add_argument("--session", help="record the run as a session file (autosaved; resumable, replayable)")
    p.set_defaults(func=cmd_operate)

    p = sub.add_parser("replay", help="re-run a saved session's actions headless into a new run and session")
    add_model_args(p)
    p.add_argument("session", help="session .json")
    p.add_argument("--out", help="run directory (default: sessions/NAME-replay in the working directory)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("resume", help="continue a session's interrupted run from its last checkpoint")
    add_model_args(p)
    p.add_argument("session", help="session .json")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("apply", help="apply a saved patch to its base model and export the repaired model")
    add_model_args(p)
    p.add_argument("--patch", required=True, help="patch.safetensors written by operate")
    p.add_argument("--out", required=True, help="new directory for the repaired model (save_pretrained)")
    p.add_argument("--force", action="store_true", help="apply even if the base model's weights hash differs")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("bench", help="paper-style surgery loop vs ours on random weights in real BLOOM shapes")
    p.add_argument("--shape", choices=("bloom-560m", "bloom-1b7", "bloom-3b", "bloom-7b1"), default="bloom-1b7")
    p.add_argument("--tiny", action="store_true", help="a tiny shape that runs in seconds on CPU (smoke test)")
    p.add_argument("--device")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="measured steps per case (after 2 warm-up steps)")
    p.add_argument("--json", help="write the results to this file")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("organism", help="pretrain a small ALiBi BLOOM until its low-slope heads collapse")
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
    p.set_defaults(func=cmd_organism)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_libraries()
    try:
        if args.command is None:
            from tui.launch import launch

            return launch(args)
        return args.func(args)
    except HeadSurgeonError as exc:
        print(f"head-surgeon: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("head-surgeon: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "out of memory" not in str(exc):
            raise
        print("head-surgeon: error: out of memory: use a smaller --batch-size or --max-len, or a smaller model", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
