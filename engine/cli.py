"""`head-surgeon` command line: every workbench capability is reachable headless from here."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from .errors import HeadSurgeonError, InputError
from .arch import SUPPORTED
from .checkpointing import MODES as CHECKPOINT_MODES
from .recipe import INIT_SCHEMES, RECIPES, SLICE_DTYPE_NAMES
from .workflow import DEFAULT_CORPUS, DEFAULT_STEPS, JOB_DEFAULTS


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="hub id (e.g. bigscience/bloom-560m, mosaicml/mpt-7b, tiiuae/falcon-rw-1b) or local "
                   "directory of a BLOOM, MPT or Falcon-RW model; default: the bundled organism")
    p.add_argument("--revision", help="hub revision (branch, tag or commit)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when present, else cpu)")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: bf16 on cuda, fp32 on cpu")


def add_diagnosis_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prompts", help="diagnostic prompts: .jsonl ({\"text\": ...} per line) or .txt (one per line)")
    p.add_argument("--batch-size", type=int, default=JOB_DEFAULTS["batch_size"])
    p.add_argument("--max-len", type=int, default=JOB_DEFAULTS["max_len"], help="truncate prompts to this many tokens")
    p.add_argument("--sink", type=float, default=JOB_DEFAULTS["sink"], help="BOS mass above this is a BOS sink")
    p.add_argument("--dead", type=float, default=JOB_DEFAULTS["dead"], help="BOS mass above this is dead")
    p.add_argument("--low-entropy", type=float, default=JOB_DEFAULTS["low_entropy"],
                   help="entropy (nats) below this is low-entropy")
    p.add_argument("--positional-local", type=float, default=JOB_DEFAULTS["positional_local"],
                   help="a low-entropy head with at least this local mass is positional (not collapsed)")
    p.add_argument("--sink-rate-epsilon", type=float, default=JOB_DEFAULTS["sink_rate_epsilon"],
                   help="first-token mass above this counts toward the sink rate (Gu et al. 2024)")
    p.add_argument("--band-share", type=float, default=JOB_DEFAULTS["band_share"],
                   help="a head index is in the band when sick in more than this share of layers (the paper's 0.3)")


def diagnosis_settings(args):
    from .workflow import JobInputs

    return JobInputs.from_namespace(args, targets="").diagnosis_settings()


def load_from_args(args):
    from .model import load_model

    return load_model(args.model, device=args.device, dtype=args.dtype, revision=args.revision)


def cmd_diagnose(args) -> int:
    from rich.console import Console

    from .console import print_report
    from .diagnosis import diagnose
    from .preflight import check_output_file
    from .prompts import load_prompts

    from .distributed import world

    if args.nproc > 1 and not world().active:
        return _relaunch_under_torchrun(args.nproc, args.argv)
    console = Console(stderr=False)
    settings = diagnosis_settings(args)
    prompts = load_prompts(args.prompts)
    if args.json:
        check_output_file(args.json, overwrite=args.overwrite, what="--json")
    with console.status("loading model…"):
        loaded = load_from_args(args)
    with console.status(f"diagnosing {loaded.name} on {len(prompts)} prompts ({loaded.device}, {loaded.dtype})…"):
        report = diagnose(loaded, prompts, settings)
    print_report(report, console)
    if args.json:
        report.save(args.json)
        console.print(f"report written to {args.json}")
    return 0


def add_corpus_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default=JOB_DEFAULTS["corpus"],
                   help="text file, directory of text files, .jsonl/.parquet with a text column, hub dataset id, "
                   f"python-stdlib[/PKG] or python-packages (default: {DEFAULT_CORPUS})")
    p.add_argument("--corpus-config", help="hub dataset config (e.g. en for allenai/c4)")
    p.add_argument("--corpus-split", help="hub dataset split (e.g. validation)")
    p.add_argument("--text-column", default=JOB_DEFAULTS["text_column"])
    p.add_argument("--max-documents", type=int, help="use only the first N documents")


def add_train_args(p: argparse.ArgumentParser) -> None:
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help=f"optimizer steps (default {DEFAULT_STEPS})")
    length.add_argument("--epochs", type=int, help="epochs over the training blocks")
    p.add_argument("--seq-len", type=int, default=JOB_DEFAULTS["seq_len"])
    p.add_argument("--lr", type=float, default=JOB_DEFAULTS["lr"], help="0 trains nothing: a re-initialisation-only control")
    p.add_argument("--micro-batch", type=int, default=JOB_DEFAULTS["micro_batch"])
    p.add_argument("--grad-accum", type=int, default=JOB_DEFAULTS["grad_accum"])
    p.add_argument("--recipe", choices=tuple(RECIPES), default=JOB_DEFAULTS["recipe"],
                   help="default: head-surgeon's choices; paper: the paper's scripts' (Xavier over each head's whole "
                   "Q/K/V block, bf16 slices and optimizer state, warm-up min(100, total/4), an epoch's partial last "
                   "step kept, early stopping with patience 6, checkpoints picked on the tracked set, evaluation at "
                   "each epoch's end). Any flag below overrides it")
    p.add_argument("--warmup-frac", type=float, help="warm-up share of the steps (default 0.05; paper 0.25)")
    p.add_argument("--warmup-max-steps", type=int, help="cap on the warm-up steps (default none; paper 100)")
    p.add_argument("--keep-partial-step", action=argparse.BooleanOptionalAction,
                   help="an epoch's last, partial accumulation steps the optimizer too (default no; paper yes)")
    p.add_argument("--patience", type=int, help="stop a pass after N evaluations without a better checkpoint; "
                   "0: never (default 0; paper 6)")
    p.add_argument("--select-on", choices=("heldout", "tracked"),
                   help="the perplexity that picks the kept checkpoint (default heldout; paper tracked)")
    p.add_argument("--slice-dtype", choices=SLICE_DTYPE_NAMES,
                   help="dtype of the trained slices and AdamW's moments (default fp32; paper bf16)")
    p.add_argument("--eval-every", type=int, help="evaluate every N optimizer steps (default: ten points over --steps, "
                   "every 50 steps over --epochs; paper with --epochs: each epoch's end)")
    p.add_argument("--eval-blocks", type=int, default=JOB_DEFAULTS["eval_blocks"], help="held-out blocks for perplexity")
    p.add_argument("--track-blocks", type=int, default=JOB_DEFAULTS["track_blocks"],
                   help="the tracked in-domain set measured at every evaluation: N training blocks, evenly spaced "
                   "(0: none)")
    p.add_argument("--track-texts", help="track this text file instead (.txt one text a line, or .jsonl {\"text\": ...})")
    checkpointing = p.add_mutually_exclusive_group()
    checkpointing.add_argument("--checkpointing", choices=CHECKPOINT_MODES, default=JOB_DEFAULTS["checkpointing"],
                               help="activation checkpointing of the trained layers: auto measures what a layer keeps "
                               "(one probing forward) and keeps as many layers' activations as free memory holds, "
                               "recomputing the rest (none, selective or full); the patch is the same")
    checkpointing.add_argument("--no-checkpointing", action="store_true", help="the same as --checkpointing none")
    p.add_argument("--loss-chunk-tokens", type=_positive, default=JOB_DEFAULTS["loss_chunk_tokens"],
                   help="tokens whose vocabulary logits the loss holds at once (fp32, 250,880 a token for BLOOM): "
                   "smaller holds less (256 for bloom-7b1 on a 16 GB card), the same loss to rounding")
    p.add_argument("--prefix-cache-gb", type=float, default=JOB_DEFAULTS["prefix_cache_gb"],
                   help="keep what the frozen layers below the lowest target compute for each training block, up to "
                   "this many GiB (on a GPU at most half its free memory), so later epochs skip them (0: off)")
    p.add_argument("--prefix-cache-where", choices=("device", "host"), default=JOB_DEFAULTS["prefix_cache_where"],
                   help="beside the model, or in pinned host memory")
    p.add_argument("--seed", type=int, default=JOB_DEFAULTS["seed"])


def add_run_args(p: argparse.ArgumentParser, *, out_help: str) -> None:
    p.add_argument("--out", help=out_help)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out run directory or --session file instead of refusing")
    p.add_argument("--detach", action="store_true",
                   help="run in its own process (survives closing the terminal); print the run directory and return")


def _follow_in_process(launch, *, loaded, baseline, console, resume: bool = False) -> dict:
    """Run a launch in this process with rich progress; Ctrl-C stops at the next step like `cancel`
    (a second Ctrl-C aborts at once, leaving the run dead and resumable from its last saved state)."""
    import signal
    import threading

    from .console import ConsoleSink, print_operation
    from .workflow import start

    stop = threading.Event()

    def interrupt(*_):
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
        console.print("[yellow]stopping at the next step (keeps a resumable state); Ctrl-C again aborts[/]")

    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, interrupt) if main_thread else None
    try:
        with ConsoleSink(console) as printer:
            report = start(launch, detach=False, resume=resume, loaded=loaded, baseline=baseline, sink=printer,
                           cancelled=stop.is_set)
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    if report.get("cancelled"):
        console.print(f"run cancelled; continue it with: head-surgeon resume {launch.run_dir}")
        return report
    print_operation(report, console)
    where = f"; session {launch.session.path}" if launch.session else ""  # None on the ranks after rank 0
    console.print(f"patch and report written to {launch.run_dir}{where}")
    return report


def _detached(launch, console) -> None:
    from .workflow import start

    start(launch, detach=True)
    console.print(f"run {launch.run_dir} started in the background (pid {launch.pid}); session {launch.session.path}")
    console.print(f"follow it: head-surgeon attach {launch.run_dir}   stop it: head-surgeon cancel {launch.run_dir}")


def _check_outputs(args) -> None:
    """Refuse existing or unwritable outputs before any model is loaded."""
    from .preflight import check_output_dir
    from .workflow import check_new_session, check_out

    if getattr(args, "out", None):
        check_out(args.out, overwrite=args.overwrite)
    check_new_session(getattr(args, "session", None) if args.command == "operate" else None, overwrite=args.overwrite)
    if getattr(args, "export", None):
        if args.detach:
            raise InputError("--export needs the repaired model in this process: drop --detach, or export later "
                             "with head-surgeon apply --patch RUN/patch.safetensors --out DIR")
        check_output_dir(args.export, what="--export")


def cmd_operate(args) -> int:
    from rich.console import Console

    from .diagnosis import diagnose
    from .patch import export_model
    from .prompts import load_prompts
    from .distributed import broadcast, on_main, world
    from .workflow import JobInputs, Launch, create_run

    if args.nproc > 1 and not args.detach and not world().active:
        return _relaunch_under_torchrun(args.nproc, args.argv)
    console = Console()
    inputs = JobInputs.from_namespace(args)
    inputs.check()
    _check_outputs(args)
    if world().active and (args.detach or args.export):
        raise InputError("under torchrun the run stays in the foreground and exports nothing: drop --detach and "
                         "--export (a detached run over N GPUs: head-surgeon operate --detach --nproc N, without "
                         "torchrun; export later with head-surgeon apply)")
    with console.status("loading model…"):
        loaded = load_from_args(args)
    baseline = None
    if inputs.needs_diagnosis() or not args.detach:
        with console.status(f"diagnosing {loaded.name} before surgery…"):
            baseline = diagnose(loaded, load_prompts(inputs.prompts), inputs.diagnosis_settings())
    job = inputs.build_job(loaded.adapter, baseline)
    # under torchrun rank 0 makes the run directory and the session; every rank then runs the job in step
    launch = on_main(lambda: create_run(loaded, job, out=args.out, session_path=args.session,
                                        overwrite=args.overwrite, baseline=baseline, device=args.device,
                                        dtype=args.dtype, nproc=args.nproc))
    run_dir = broadcast(str(launch.run_dir) if launch else None)
    launch = launch or Launch(Path(run_dir), None)
    if args.detach:
        _detached(launch, console)
        return 0
    report = _follow_in_process(launch, loaded=loaded, baseline=baseline, console=console)
    if report.get("cancelled"):
        return 130
    if args.export:
        export_model(loaded.model, loaded.tokenizer, args.export)
        console.print(f"repaired model exported to {args.export}")
    return 0


def _relaunch_under_torchrun(nproc: int, argv: list[str]) -> int:
    """`operate --nproc N` (or diagnose, resume, bench) in the foreground: this same command again under
    torchrun, one process per GPU. --nproc is left out of the relaunched command: torchrun's own parser
    would take it for an abbreviation of its --nproc-per-node, and each process knows the world it is in.
    Output streams as it comes, less torchrun's own log lines and its closing traceback; of a failure the
    first error line of ours is shown (rank 0's when it has one). Ctrl-C reaches torchrun, which passes it on
    to the ranks: they stop together at the next step, as one process does; this process only waits."""
    import signal
    import subprocess

    from .runner import torchrun_command

    keep, rest = [], iter(argv)
    for arg in rest:
        if arg == "--nproc":
            next(rest, None)
        elif not arg.startswith("--nproc="):
            keep.append(arg)
    sys.stdout.flush()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's Ctrl-C goes to torchrun too
    try:
        proc = subprocess.Popen([*torchrun_command(nproc), "-m", "engine.cli", *keep], stderr=subprocess.PIPE,
                                text=True)
        relay = TorchrunStderr()
        for line in proc.stderr:
            sys.stderr.write(relay.feed(line))
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    message, code = relay.outcome(code)
    sys.stderr.write(message)
    return code


class TorchrunStderr:
    """What a relaunch shows of torchrun's stderr: the ranks' lines as they come, less torchrun's own log
    lines; our error lines kept for the end (rank 0's shown); torchrun's closing traceback (a rank's have a
    `[rankN]:` prefix) held back, and shown only when no line of ours says why the run failed."""

    def __init__(self) -> None:
        self.errors: list[str] = []
        self.codes: list[str] = []
        self.held: list[str] = []
        self.closing = False

    def feed(self, line: str) -> str:
        """The part of `line` to show now."""
        self.closing = self.closing or line.startswith("Traceback")
        if line.startswith("head-surgeon: error"):
            self.errors.append(line.rstrip("\n"))
        elif self.closing:
            self.held.append(line)
            self.codes += re.findall(r"exitcode\s*:\s*(-?\d+)", line)
        elif not _torchrun_line(line):
            return line
        return ""

    def outcome(self, code: int) -> tuple[str, int]:
        """(what to show at the end, the exit status) for torchrun's exit status `code`."""
        if code == 0:
            return "", 0
        if self.errors:
            return min(self.errors, key=lambda line: "(rank" in line) + "\n", 2
        if self.codes and all(c == "130" for c in self.codes):
            return "", 130  # stopped by Ctrl-C or cancel, at a step boundary: the run says how to resume it
        return "".join(self.held[-40:]), code  # no line of ours says why: torchrun's account


def _torchrun_line(line: str) -> bool:
    """torchrun's own log lines (`W1201 12:00:00.000 123 .../torch/distributed/...`), its OMP_NUM_THREADS
    notice and the banners around them."""
    return bool(re.match(r"^[WEI]\d{4} ", line)) or "OMP_NUM_THREADS" in line or line.strip("*= \n") == "" \
        or line.startswith(("[", "  ")) and "elastic" in line


def _session_model(session, args):
    """Load the session's base model (or --model) and refuse a different one."""
    from .model import check_identity, load_model

    ref = args.model or session.model.get("ref")
    loaded = load_model(ref, device=args.device, dtype=args.dtype, revision=session.model.get("revision"))
    check_identity(session.model, loaded, f"session {session.path}")
    return loaded


def cmd_replay(args) -> int:
    """Re-execute a session's recorded job into a new run directory and a new session."""
    from rich.console import Console

    from .diagnosis import diagnose
    from .prompts import load_prompts
    from .session import Session
    from .workflow import create_run, replay_job

    console = Console()
    original = Session.load(args.session)
    if not original.job:
        raise InputError(f"session {args.session} has no surgery to replay: it only holds a diagnosis")
    if args.out and original.path.resolve().is_relative_to(Path(args.out).resolve()):
        raise InputError(f"--out {args.out} holds the session being replayed: choose a new directory")
    _check_outputs(args)
    with console.status("loading model…"):
        loaded = _session_model(original, args)
    with console.status("diagnosing before surgery…"):
        job, baseline = replay_job(original, loaded)
        if baseline is None and not args.detach:
            baseline = diagnose(loaded, load_prompts(job.diagnosis.prompts), job.diagnosis)
    launch = create_run(loaded, job, out=args.out, overwrite=args.overwrite, baseline=baseline, derived_from=original,
                        action="replay", device=args.device, dtype=args.dtype)
    if args.detach:
        _detached(launch, console)
        return 0
    report = _follow_in_process(launch, loaded=loaded, baseline=baseline, console=console)
    return 130 if report.get("cancelled") else 0


def cmd_resume(args) -> int:
    """Continue a run (by its directory or its session) from its last saved state."""
    from rich.console import Console

    from .runner import run_state
    from .workflow import open_run, start

    from .distributed import broadcast, world
    from .runner import RunSpec

    console = Console()
    if world().active and args.detach:
        raise InputError("under torchrun a resume stays in the foreground: drop --detach (head-surgeon resume RUN "
                         "--detach, without torchrun, continues it over as many processes as it began with)")
    launch = open_run(args.run)
    # rank 0's reading: a rank that looked after rank 0 took the run's lock would see it running
    state = broadcast(run_state(launch.run_dir).state if world().main else None)
    nproc = int(RunSpec.load(launch.run_dir).model.get("nproc") or 1)
    if state == "running":
        raise InputError(f"run {launch.run_dir} is running: attach to it, or cancel it first")
    if state == "finished":
        raise InputError(f"run {launch.run_dir} already finished: use replay to run it again")
    if nproc > 1 and not args.detach and not world().active:  # it goes on over as many processes as it began
        return _relaunch_under_torchrun(nproc, args.argv)
    if args.detach:
        start(launch, detach=True, resume=True)
        console.print(f"run {launch.run_dir} resumed in the background (pid {launch.pid})")
        return 0
    report = _follow_in_process(launch, loaded=None, baseline=None, console=console, resume=True)
    return 130 if report.get("cancelled") else 0


def cmd_runs(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from .runner import list_runs
    from .workflow import RUNS_DIR

    console = Console()
    root = Path(args.dir) if args.dir else RUNS_DIR
    if args.dir and not root.is_dir():
        raise InputError(f"{root} is not a directory: pass the folder that holds run directories (default {RUNS_DIR})")
    runs = list_runs(root)
    if not runs:
        console.print(f"no runs under {root}")
        return 0
    colours = {"running": "green", "finished": "blue", "cancelled": "yellow", "failed": "red", "dead": "magenta"}
    table = Table("run", "state", "step", "targets", "held-out ppl", "model", box=None)
    for r in runs:
        table.add_row(str(r.run_dir), f"[{colours[r.state]}]{r.state}[/]", f"{r.step}/{r.total_steps or '?'}",
                      r.targets if len(r.targets) < 40 else r.targets[:37] + "…",
                      f"{r.heldout_ppl:.3f}" if r.heldout_ppl is not None else "-", r.model)
    console.print(table)
    dead = [r for r in runs if r.state == "dead"]
    if dead:
        console.print(f"dead runs stopped without finishing; continue one with head-surgeon resume {dead[-1].run_dir}")
    return 0


def cmd_cancel(args) -> int:
    from .runner import cancel

    print(cancel(args.run))
    return 0


def cmd_apply(args) -> int:
    from .model import check_identity
    from .patch import apply_head_tensors, export_model, load_patch
    from .spec import format_heads

    from .preflight import check_output_dir

    check_output_dir(args.out, what="--out")  # as operate: a new directory, refused before any work
    tensors, meta = load_patch(args.patch)
    loaded = load_from_args(args)
    if not args.force:
        check_identity(meta.get("base_model", {}), loaded, f"patch {args.patch}")
    heads = apply_head_tensors(loaded.model, loaded.adapter, tensors)
    export_model(loaded.model, loaded.tokenizer, args.out)
    print(f"applied {len(heads)} heads ({format_heads(heads)}) to {loaded.name}; model written to {args.out}")
    return 0


def cmd_figures(args) -> int:
    from .figures import write_figures

    for path in write_figures(args.source, args.out):
        print(path)
    return 0


def cmd_evaluate(args) -> int:
    """Perplexity of a model, or base + patch, on every block of a corpus (or the first --blocks)."""
    import json

    from rich.console import Console

    from .atomic import atomic_write_text
    from .corpus import CorpusSpec, check_corpus
    from .evaluate_cli import apply_patch, corpus_perplexity, summary_lines
    from .patch import load_patch
    from .preflight import check_output_file
    from .spec import format_heads

    console = Console()
    spec = CorpusSpec(args.corpus, args.corpus_config, args.corpus_split, args.text_column, args.max_documents)
    check_corpus(spec)
    if args.json:
        check_output_file(args.json, overwrite=args.overwrite, what="--json")
    tensors, meta = load_patch(args.patch) if args.patch else ({}, {})
    with console.status("loading model…"):
        loaded = load_from_args(args)
    heads = apply_patch(loaded, tensors, meta, f"patch {args.patch}", args.force) if args.patch else []
    with console.status(f"evaluating {loaded.name} on {spec.describe()} ({loaded.device}, {loaded.dtype})…"):
        result = corpus_perplexity(loaded, spec, args.seq_len, args.blocks, args.batch_size)
    result = {"model": loaded.ref, "patch": args.patch, "patched_heads": format_heads(heads),
              "device": str(loaded.device), "dtype": str(loaded.dtype).removeprefix("torch."), **result}
    patched = f" + patch {args.patch} ({len(heads)} heads: {result['patched_heads']})" if args.patch else ""
    console.print(f"{loaded.name}{patched} ({result['device']}, {result['dtype']})", highlight=False)
    for line in summary_lines(result):
        console.print(line, highlight=False)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1, allow_nan=False))
        console.print(f"results written to {args.json}")
    return 0


def cmd_bench(args) -> int:
    import json

    from rich.console import Console

    from .atomic import atomic_write_text
    from .bench import PARTS, print_bench, run_bench

    console = Console()
    shape = "tiny" if args.tiny else args.shape
    batch, seq_len = (2, 64) if args.tiny else (args.batch, args.seq_len)
    from .distributed import world

    if shape == "bloom-176b" and (args.nproc or 1) < 2 and not world().active:
        raise InputError("the bloom-176b shape does not fit one GPU: give --nproc N (8 H200s hold it)")
    if args.nproc is not None or world().active:
        if args.only:
            raise InputError("--only picks parts of the one-process bench: leave it out with --nproc")
        return _bench_distributed(args, console, shape, batch, seq_len)
    if args.baseline:
        raise InputError("--baseline compares runs over several processes: give --nproc N as well")
    with console.status(f"benchmarking {shape} (B={batch} x L={seq_len})…"):
        result = run_bench(shape, args.device, batch=batch, seq_len=seq_len, steps=2 if args.tiny else args.steps,
                           warmup=1 if args.tiny else 2, rounds=2 if args.tiny else args.rounds,
                           diag_batches=2 if args.tiny else 12,
                           parts=(args.only,) if args.only else PARTS)
    print_bench(result, console)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
        console.print(f"results written to {args.json}")
    return 0


def _bench_distributed(args, console, shape: str, batch: int, seq_len: int) -> int:
    import json

    from .atomic import atomic_write_text
    from .bench_distributed import print_distributed_bench, run_distributed_bench, scaling
    from .distributed import rank_device, world
    from .runtime import resolve_device

    if (args.nproc or 1) > 1 and not world().active:
        return _relaunch_under_torchrun(args.nproc, args.argv)
    baseline = _read_json(args.baseline, "--baseline") if args.baseline else None
    result = run_distributed_bench(shape, resolve_device(rank_device(args.device)), batch=batch, seq_len=seq_len,
                                   steps=2 if args.tiny else min(args.steps, 5), warmup=1,
                                   diag_batches=2 if args.tiny else 4)
    if baseline is not None:
        result["scaling"] = scaling(result, baseline)
    print_distributed_bench(result, console)
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
        console.print(f"results written to {args.json}")
    return 0


def _read_json(path: str, what: str) -> dict:
    import json

    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{what} {path} cannot be read as JSON ({exc}): pass a file bench --json wrote") from None


def build_parser(*extra_commands) -> argparse.ArgumentParser:
    """The argument parser; each of `extra_commands(subparsers)` adds commands (the UI adds the workbench)."""
    parser = argparse.ArgumentParser(
        prog="head-surgeon",
        description="Diagnose and repair collapsed attention heads in ALiBi transformers (BLOOM, MPT, Falcon-RW). "
        "With no command, opens the workbench.",
    )
    add_model_args(parser)
    parser.add_argument("--prompts", help="diagnostic prompts for the workbench (.jsonl or .txt)")
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("diagnose", help="measure every head and classify it (healthy / BOS-sink / dead / low-entropy "
                       "/ positional)", description="Measure every head of an ALiBi model and classify it. Supported "
                       f"families: {SUPPORTED}.")
    add_model_args(p)
    add_diagnosis_args(p)
    p.add_argument("--json", help="write the report as JSON to this new file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("--nproc", type=_positive, default=1, metavar="N",
                   help="spread the prompts over N processes of this host, one GPU each (torchrun, FSDP2-sharded "
                   "model): the same statistics")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("operate", help="re-initialise target heads and retrain only them; writes a patch and report")
    add_model_args(p)
    add_diagnosis_args(p)
    p.add_argument("--targets", required=True,
                   help="head spec, e.g. 3.9-15,5-22.9-15,23.12, sick (BOS-sink or dead), 5-22.*&bos>0.3")
    p.add_argument("--frozen", help="heads kept frozen for the record (never trained), same spec language")
    p.add_argument("--pass2-targets", help="second pass, started from the first pass's best checkpoint")
    p.add_argument("--pass2-frozen")
    p.add_argument("--init", choices=INIT_SCHEMES,
                   help="re-initialisation of the targets' Q/K/V rows (default xavier_uniform; paper xavier_uniform_block)")
    p.add_argument("--control", choices=("sham",), help="also run a sham control arm: the same slices, corpus, block "
                   "order, schedule and seed, trained from their current values (no re-init, no zeroing)")
    add_corpus_args(p)
    add_train_args(p)
    p.add_argument("--completions", type=int, default=JOB_DEFAULTS["completions"],
                   help="sample this many prompt completions before/after")
    add_run_args(p, out_help="new run directory for events.jsonl, patch.safetensors, report.json and checkpoints "
                 "(default: runs/MODEL-DATE-TIME)")
    p.add_argument("--export", help="also write the repaired model (save_pretrained) into this new directory")
    p.add_argument("--session", help="also record the run as a session file here (default: RUN/session.json)")
    p.add_argument("--nproc", type=_positive, default=1, metavar="N",
                   help="run over N processes of this host, one GPU each (PyTorch's torchrun, FSDP2-sharded base); "
                   "the same patch as one process")
    p.set_defaults(func=cmd_operate)

    p = sub.add_parser("replay", help="re-run a saved session's job into a new run directory and session")
    add_model_args(p)
    p.add_argument("session", help="session .json (or a run directory)")
    add_run_args(p, out_help="new run directory (default: runs/MODEL-DATE-TIME)")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("resume", help="continue a cancelled or dead run from its last saved state (its own model, "
                       "device and dtype)")
    p.add_argument("run", help="run directory (or the session that names it)")
    p.add_argument("--detach", action="store_true", help="continue in its own process and return at once")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("runs", help="list runs with their state (running, finished, failed, cancelled, dead)")
    p.add_argument("dir", nargs="?", help="folder holding run directories (default: runs)")
    p.set_defaults(func=cmd_runs)

    p = sub.add_parser("cancel", help="ask a running run to stop at its next step (it stays resumable)")
    p.add_argument("run", help="run directory")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("apply", help="apply a saved patch to its base model and export the repaired model")
    add_model_args(p)
    p.add_argument("--patch", required=True, help="patch.safetensors written by operate")
    p.add_argument("--out", required=True, help="new directory for the repaired model (save_pretrained)")
    p.add_argument("--force", action="store_true", help="apply even if the base model's weights hash differs")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("figures", help="publication figures (PNG and SVG) of a run or a diagnosis JSON; needs "
                       "the figures extra (matplotlib)")
    p.add_argument("source", metavar="RUN_OR_REPORT",
                   help="run directory, its report.json, or a diagnosis JSON (diagnose --json)")
    p.add_argument("--out", required=True, help="new directory for the figures")
    p.set_defaults(func=cmd_figures)

    p = sub.add_parser("evaluate", help="perplexity of a model, or base + patch, on every block of a corpus")
    add_model_args(p)
    p.add_argument("--patch", help="patch.safetensors written by operate, applied to --model first")
    p.add_argument("--force", action="store_true", help="apply the patch even if the base model's weights hash differs")
    add_corpus_args(p)
    p.add_argument("--seq-len", type=int, default=JOB_DEFAULTS["seq_len"], help="tokens per block")
    p.add_argument("--blocks", type=int, help="score only the first N blocks (default: all of them)")
    p.add_argument("--batch-size", type=int, default=JOB_DEFAULTS["batch_size"], help="blocks per forward pass")
    p.add_argument("--json", help="write the results as JSON to this new file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("bench", help="paper-style surgery loop vs ours on random weights in real BLOOM shapes")
    p.add_argument("--shape", choices=("bloom-560m", "bloom-1b7", "bloom-3b", "bloom-7b1", "bloom-176b"),
                   default="bloom-1b7")
    p.add_argument("--nproc", type=_positive, metavar="N",
                   help="diagnosis and surgery spread over N processes, one GPU each (torchrun, FSDP2), as operate "
                   "runs them: global tokens/s and each GPU's peak memory; 1 gives the one-GPU baseline")
    p.add_argument("--baseline", metavar="JSON", help="with --nproc: a bench --nproc --json of the same shape on fewer "
                   "processes; prints the scaling (goal for bloom-7b1 on 2 GPUs: 1.8x one)")
    p.add_argument("--tiny", action="store_true", help="a tiny shape that runs in seconds on CPU (smoke test)")
    p.add_argument("--device")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--steps", type=_positive, default=5, help="measured steps per case and round (after 2 warm-up "
                   "steps)")
    p.add_argument("--rounds", type=_positive, default=3, help="rounds in which the surgery cases take turns; each "
                   "case's fastest round is kept")
    p.add_argument("--only", choices=("surgery", "diagnosis"), help="run the cases of one part only")
    p.add_argument("--json", help="write the results to this file")
    p.set_defaults(func=cmd_bench)

    for add in extra_commands:
        add(sub)
    return parser


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


_positive.__name__ = "whole number"  # argparse names the type in its message: "invalid whole number value"


DISTRIBUTED_COMMANDS = ("diagnose", "operate", "bench", "resume")


def _join_torchrun(args) -> None:
    """Under torchrun: join the process group; only rank 0 prints (the others' stdout goes nowhere)."""
    import os

    from .distributed import init_from_env, launched

    if not launched():
        return
    if args.command not in DISTRIBUTED_COMMANDS:
        raise InputError(f"head-surgeon {args.command} does not run under torchrun: start it without (torchrun "
                         f"runs {', '.join(DISTRIBUTED_COMMANDS)})")
    w = init_from_env(getattr(args, "device", None))
    if getattr(args, "nproc", None) not in (None, 1, w.size):
        raise InputError(f"--nproc {args.nproc} but torchrun started {w.size} processes: give one of them")
    if os.environ.get("RANK", "0") != "0":
        sys.stdout = open(os.devnull, "w")


def dispatch(args) -> int:
    """Run a parsed command; user errors become one line on stderr and exit status 2."""
    import os

    from .distributed import launched, shutdown
    from .runtime import allocator_defaults, quiet_libraries

    quiet_libraries()
    allocator_defaults()
    code = 1
    try:
        _join_torchrun(args)
        code = args.func(args)
        return code
    except HeadSurgeonError as exc:  # under torchrun each rank says its own (a relaunch shows rank 0's)
        rank = os.environ.get("RANK", "0") if launched() else "0"
        # one write: the ranks share the terminal, and a line written in two pieces interleaves with another's
        sys.stderr.write(f"head-surgeon: error{'' if rank == '0' else f' (rank {rank})'}: {exc}\n")
        sys.stderr.flush()
        return 2
    except KeyboardInterrupt:
        print("head-surgeon: interrupted", file=sys.stderr)
        return 130
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "out of memory" not in str(exc):
            raise
        print("head-surgeon: error: out of memory: use a smaller --batch-size or --max-len, or a smaller model", file=sys.stderr)
        return 2
    finally:
        shutdown(together=code in (0, 130))  # a clean end or a cancel: every rank got here together


def main(argv: list[str] | None = None) -> int:
    """The headless commands alone (`python -m engine.cli`); `head-surgeon` adds the workbench on top."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what a relaunch under torchrun repeats
    if args.command is None:
        parser.error("give a command (the workbench opens with `head-surgeon`)")
    return dispatch(args)


if __name__ == "__main__":
    sys.exit(main())
