"""The one place that turns user input into work: jobs, run directories, sessions, replay and resume.

The CLI and the workbench both call it, so they share defaults and rules:
- `JobInputs` is what a user types (flags or dialog fields); `check()` runs the cheap checks (specs,
  numbers, corpus, prompts) before any model is loaded; `build_job()` resolves it against a model.
- A new run always gets a new run directory and a new session; an existing one is refused unless
  `overwrite` is given (and then only a run directory or an empty one is replaced).
- A loaded session is never written to: work started from it goes into a new session that says so.
- Every run starts from the base weights its run.json names (the runner loads and checks them).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .distributed import world
from .errors import InputError
from .runner import RUN_FILE, RunSpec
from .session import SESSION_FILE, Session

DTYPE_NAMES = {"torch.bfloat16": "bf16", "torch.float16": "fp16", "torch.float32": "fp32"}
RUNS_DIR = Path("runs")
SESSIONS_DIR = Path("sessions")
DEFAULT_CORPUS = "python-stdlib/json"
DEFAULT_STEPS = 100


@dataclass
class JobInputs:
    """A surgery as the user asks for it; defaults are the same in the CLI and the workbench."""

    targets: str
    frozen: str = ""
    pass2_targets: str | None = None
    pass2_frozen: str | None = None
    recipe: str = "default"  # engine.recipe: fills every setting below that is None
    init: str | None = None
    corpus: str = DEFAULT_CORPUS
    corpus_config: str | None = None
    corpus_split: str | None = None
    text_column: str = "text"
    max_documents: int | None = None
    steps: int | None = None  # neither steps nor epochs: DEFAULT_STEPS
    epochs: int | None = None
    seq_len: int = 512
    lr: float = 5e-5
    micro_batch: int = 1
    grad_accum: int = 8
    warmup_frac: float | None = None
    warmup_max_steps: int | None = None
    keep_partial_step: bool | None = None
    patience: int | None = None  # 0: no early stopping
    select_on: str | None = None
    slice_dtype: str | None = None
    eval_every: int | None = None  # None: ten evaluation points over the run (every 50 steps by epochs)
    eval_blocks: int = 16
    track_blocks: int = 16
    track_texts: str | None = None
    checkpointing: str = "auto"
    loss_chunk_tokens: int = 1024
    prefix_cache_gb: float = 4.0
    prefix_cache_where: str = "device"
    seed: int = 0
    prompts: str | None = None
    batch_size: int = 8
    max_len: int = 512
    sink: float = 0.50
    dead: float = 0.95
    low_entropy: float = 0.5
    positional_local: float = 0.5
    sink_rate_epsilon: float = 0.3
    band_share: float = 0.3
    completions: int = 3
    control: str | None = None  # "sham": a control arm trains the same slices without re-init or zeroing

    @classmethod
    def from_namespace(cls, args: Any, **overrides: Any) -> "JobInputs":
        """From an argparse namespace (attributes named like the fields; missing ones keep defaults)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        if getattr(args, "no_checkpointing", False):
            values["checkpointing"] = "none"
        return cls(**{**values, **overrides})

    @classmethod
    def from_job(cls, job: dict[str, Any], **overrides: Any) -> "JobInputs":
        """The inputs a recorded job came from (targets as recorded): `o` on a loaded session keeps every
        setting the dialog does not show."""
        plans = list(job.get("plans") or [{}]) + ([job["deferred"]] if job.get("deferred") else [])
        train = job.get("train", {})
        corpus, ev = job.get("corpus", {}), job.get("evaluation", {})
        diag = job.get("diagnosis") or {"thresholds": ev.get("thresholds", {})}
        th = diag.get("thresholds", {})
        second = plans[1] if len(plans) > 1 else {}
        recorded = {k: train[k] for k in ("warmup_max_steps", "keep_partial_step", "select_on", "slice_dtype",
                                          "track_blocks", "track_texts", "prefix_cache_gb", "prefix_cache_where",
                                          "loss_chunk_tokens")
                    if k in train}
        if "patience" in train:
            recorded["patience"] = train["patience"] or 0  # recorded None: none, whatever the recipe says
        values = dict(
            targets=plans[0].get("targets", ""), frozen=plans[0].get("frozen", ""),
            pass2_targets=second.get("targets"), pass2_frozen=second.get("frozen"), recipe=train.get("recipe", "default"),
            init=plans[0].get("init", "xavier_uniform"), corpus=corpus.get("source", DEFAULT_CORPUS),
            corpus_config=corpus.get("config"), corpus_split=corpus.get("split"),
            text_column=corpus.get("text_column", "text"), max_documents=corpus.get("max_documents"),
            steps=train.get("steps"), epochs=train.get("epochs"), seq_len=train.get("seq_len", 512),
            lr=train.get("lr", 5e-5), micro_batch=train.get("micro_batch", 1), grad_accum=train.get("grad_accum", 8),
            warmup_frac=train.get("warmup_frac", 0.05), eval_every=train.get("eval_every"),
            eval_blocks=train.get("eval_blocks", 16), checkpointing=_checkpointing(train),
            seed=plans[0].get("seed", train.get("seed", 0)), prompts=diag.get("prompts"),
            batch_size=diag.get("batch_size", 8), max_len=diag.get("max_len", 512),
            sink=th.get("sink", 0.5), dead=th.get("dead", 0.95), low_entropy=th.get("low_entropy", 0.5),
            positional_local=th.get("positional_local", 0.5), sink_rate_epsilon=th.get("sink_rate_epsilon", 0.3),
            band_share=th.get("band_share", 0.3),
            completions=ev.get("completion_prompts", 3), control=job.get("control"), **recorded)
        return cls(**{**values, **overrides})

    # --- pieces of the job ------------------------------------------------------------------------
    def diagnosis_settings(self):
        from .diagnosis import DiagnosisSettings
        from .report import Thresholds

        return DiagnosisSettings(batch_size=self.batch_size, max_len=self.max_len, prompts=_absolute(self.prompts),
                                 thresholds=Thresholds(sink=self.sink, dead=self.dead, low_entropy=self.low_entropy,
                                                       positional_local=self.positional_local,
                                                       sink_rate_epsilon=self.sink_rate_epsilon,
                                                       band_share=self.band_share))

    def chosen(self, name: str):
        """A recipe-dependent setting: the one given, else the recipe's."""
        from .recipe import recipe

        value = getattr(self, name)
        return getattr(recipe(self.recipe), name) if value is None else value

    def train_config(self):
        from .recipe import recipe
        from .train import TrainConfig

        steps = self.steps if self.steps is not None or self.epochs is not None else DEFAULT_STEPS
        if self.eval_every is not None and self.eval_every < 1:
            raise InputError(f"evaluate every N steps needs N of at least 1 (got {self.eval_every})")
        if self.eval_every:
            eval_every = self.eval_every
        elif recipe(self.recipe).eval_at_epoch_ends and self.epochs:
            eval_every = None  # at each epoch's end
        else:
            eval_every = max(1, steps // 10) if steps else 50
        return TrainConfig(lr=self.lr, micro_batch=self.micro_batch, grad_accum=self.grad_accum, seq_len=self.seq_len,
                           steps=steps, epochs=self.epochs, warmup_frac=self.chosen("warmup_frac"),
                           # a warm-up share given without a cap is not capped by the recipe's
                           warmup_max_steps=self.warmup_max_steps if self.warmup_frac is not None
                           else self.chosen("warmup_max_steps"),
                           keep_partial_step=self.chosen("keep_partial_step"), eval_every=eval_every,
                           eval_blocks=self.eval_blocks, track_blocks=self.track_blocks,
                           track_texts=_absolute(self.track_texts), select_on=self.chosen("select_on"),
                           patience=self.chosen("patience") or None, slice_dtype=self.chosen("slice_dtype"),
                           checkpointing=self.checkpointing, loss_chunk_tokens=self.loss_chunk_tokens,
                           prefix_cache_gb=self.prefix_cache_gb,
                           prefix_cache_where=self.prefix_cache_where, seed=self.seed, recipe=recipe(self.recipe).name)

    def corpus_spec(self):
        from .corpus import CorpusSpec

        if not self.corpus:
            raise InputError("give a corpus: a text file, directory, hub dataset id or python-stdlib/PKG")
        return CorpusSpec(_absolute(self.corpus), self.corpus_config, self.corpus_split, self.text_column,
                          self.max_documents)

    def specs(self) -> list[tuple[str, str | None]]:
        """(targets, frozen) per pass."""
        out = [(self.targets, self.frozen or None)]
        if self.pass2_targets:
            out.append((self.pass2_targets, self.pass2_frozen or None))
        return out

    def needs_diagnosis(self) -> bool:
        """True when a spec names heads by class or statistic (`sick`, `bos>0.3`), which a diagnosis resolves."""
        from .spec import needs_report

        return any(needs_report(s) for s in self.specs()[0])  # a second pass resolves during the run

    def check(self) -> None:
        """Every check that needs no model: specs' syntax, numbers, corpus readable, prompts readable."""
        from .corpus import check_corpus
        from .prompts import load_prompts
        from .spec import check_syntax

        for spec, frozen in self.specs():
            for s in filter(None, (spec, frozen)):
                check_syntax(s)  # bounds need the model, words and predicates a diagnosis
        self.train_config()
        self.diagnosis_settings()
        check_corpus(self.corpus_spec())
        load_prompts(self.prompts)
        if self.track_texts:
            load_prompts(self.track_texts, what="track texts file")

    def build_job(self, adapter, report=None):
        """The job for a loaded model; `report` (its diagnosis with these inputs' settings) resolves class
        words and predicates of the first pass. A second pass that names heads by class or statistic is
        kept as written and resolved against the model the first pass leaves, as the paper built its pass 2."""
        from .evaluate import EvalSettings
        from .operation import SurgeryJob
        from .spec import needs_report
        from .surgery import SurgeryPlan

        first, *rest = self.specs()
        init = self.chosen("init")
        plans = [SurgeryPlan.from_specs(*first, adapter, report=report, init=init, seed=self.seed)]
        deferred = None
        for targets, frozen in rest:
            if needs_report(targets) or needs_report(frozen):
                deferred = {"targets": targets, "frozen": frozen or "", "init": init, "seed": self.seed + 1}
            else:
                plans.append(SurgeryPlan.from_specs(targets, frozen, adapter, init=init, seed=self.seed + 1))
        diagnosis = self.diagnosis_settings()
        evaluation = EvalSettings(thresholds=diagnosis.thresholds, completion_prompts=self.completions)
        return SurgeryJob(plans, self.corpus_spec(), self.train_config(), evaluation, diagnosis=diagnosis,
                          control=self.control, deferred=deferred)


JOB_DEFAULTS = {f.name: f.default for f in fields(JobInputs)}  # the CLI's flags and the workbench's dialog start here


# --- where things go ---------------------------------------------------------------------------------
def check_out(out: str | Path, *, overwrite: bool = False) -> None:
    """The cheap checks on an `--out` run directory, before any work: new, or (with `overwrite`) a run
    directory that no runner is using, or an empty one."""
    from .preflight import check_creatable, check_output_dir
    from .runner import is_live

    out = Path(out)
    if overwrite and out.is_dir():
        if any(out.iterdir()) and not (out / RUN_FILE).is_file():
            raise InputError(f"--overwrite replaces only a run directory, and {out} is not one (no {RUN_FILE}): "
                             "choose a new directory")
        if is_live(out):
            raise InputError(f"run {out} is running: cancel it (head-surgeon cancel {out}) before replacing it")
        check_creatable(out, "--out")  # the old run is set aside and a new one made beside it, in its parent
        return
    check_output_dir(out, what="--out")


def new_run_dir(name: str, out: str | Path | None = None, *, root: str | Path = RUNS_DIR) -> Path:
    """Create the run directory: `out` (which must not exist) or a fresh `root/NAME-YYYYmmdd-HHMMSS[-N]`."""
    from .preflight import check_output_dir

    if out is not None:
        out = Path(out)
        check_output_dir(out, what="--out")
        _mkdir(out, parents=True)
        return out
    root = Path(root)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1, 1000):
        path = root / (f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}")
        if path.exists():
            continue
        check_output_dir(path, what="run directory")  # writable: one line if not
        try:
            _mkdir(path, parents=True)
            return path
        except FileExistsError:
            continue
    raise InputError(f"cannot find a free run directory name under {root}: clean it up or pass --out")


def _mkdir(path: Path, parents: bool) -> None:
    from .preflight import os_error_message

    try:
        path.mkdir(parents=parents, exist_ok=False)
    except FileExistsError:
        raise
    except OSError as exc:
        raise InputError(os_error_message(exc, path)) from exc


def check_new_session(path: str | Path | None, *, overwrite: bool = False) -> Path | None:
    from .preflight import check_output_file

    return None if path is None else check_output_file(path, overwrite=overwrite, what="--session")


@dataclass
class Launch:
    """A run that was set up (and maybe started): where it lives and the session that records it."""

    run_dir: Path
    session: Session
    pid: int | None = None


def create_run(loaded, job, *, out: str | Path | None = None, session_path: str | Path | None = None,
               overwrite: bool = False, baseline=None, marks: dict[str, str] | None = None,
               derived_from: Session | None = None, action: str = "operate", device: str | None = None,
               dtype: str | None = None, root: str | Path = RUNS_DIR, nproc: int = 1) -> Launch:
    """A new run directory holding run.json, and a new session (at `session_path`, else RUN_DIR/session.json).
    `nproc` > 1: a detached start runs it over that many processes of this host (torchrun, one GPU each)."""
    from .model import model_identity
    from .spec import format_heads

    session_file = check_new_session(session_path, overwrite=overwrite)
    identity = model_identity(loaded)
    aside = None
    if out is not None and overwrite and Path(out).exists():  # set the old run aside until the new one stands
        check_out(out, overwrite=True)
        aside = Path(out).parent / f".{Path(out).name}.replaced-{os.getpid()}"
        os.rename(out, aside)
    try:
        run_dir = new_run_dir(run_name(identity), out, root=root)
    except BaseException:
        if aside is not None:
            os.rename(aside, out)
        raise
    session = derived_from.derive() if derived_from is not None else Session(model=identity)
    session.model = identity
    session.path = Path(session_file) if session_file else run_dir / SESSION_FILE
    session.diagnosis = job.diagnosis.to_dict()
    session.job = job.to_dict()
    if baseline is not None:
        session.report = baseline.to_json()
        session.log("diagnose", sick=len(baseline.sick()))
    session.marks = marks or {"targets": format_heads(job.targets), "frozen": format_heads(job.frozen)}
    session.set_run_dir(run_dir)
    session.status = "new"
    details = {"of": session.derived_from} if action == "replay" else {}
    session.log(action, run_dir=str(run_dir), targets=format_heads(job.targets), frozen=format_heads(job.frozen),
                **details)
    # The base exactly: a hub model's commit, and the device type and dtype it ran in (a resume elsewhere
    # in another precision would not give the same patch).
    model = {"ref": identity["ref"], "revision": identity.get("commit") or identity.get("revision"),
             "device": device or loaded.device.type, "dtype": dtype or DTYPE_NAMES.get(str(loaded.dtype), dtype)}
    nproc = max(nproc, world().size)  # a run started under torchrun resumes over as many processes
    if nproc > 1:
        model["nproc"] = nproc
        session.world = {"world_size": nproc, "backend": "nccl" if model["device"].startswith("cuda") else "gloo"}
    else:
        session.world = world().record()
    try:
        RunSpec(model=model, identity=identity, job=job.to_dict(), session=str(session.path.resolve())).save(run_dir)
        session.save()
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)  # a run that could not be set up leaves nothing behind
        if aside is not None:
            os.rename(aside, out)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return Launch(run_dir, session)


def run_name(identity: dict[str, Any]) -> str:
    """A run directory's name stem: `organism`, `bloom-560m` (hub `org/name` -> `org--name`), a folder's name."""
    ref = str(identity.get("ref", "model"))
    if identity.get("source") == "local" and ref != "organism":
        return Path(ref).name
    return ref.replace("/", "--")


def start(launch: Launch, *, detach: bool, resume: bool = False, loaded=None, baseline=None, sink=None,
          cancelled=lambda: False) -> dict[str, Any] | None:
    """Run it here (returns the report) or detached (returns None at once; `launch.pid` is the runner)."""
    from . import runner

    if world().main:  # a cancel meant for an earlier segment (the other ranks of a run leave it to rank 0)
        (launch.run_dir / runner.CANCEL_FILE).unlink(missing_ok=True)
    if detach:
        launch.pid = runner.spawn(launch.run_dir, resume=resume)
        return None
    return runner.execute(launch.run_dir, resume=resume, loaded=loaded, baseline=baseline, sink=sink,
                          cancelled=cancelled)


def open_run(target: str | Path) -> Launch:
    """A run directory, or a session naming one, as a Launch (resume and attach take either)."""
    target = Path(target)
    if target.is_dir() and (target / RUN_FILE).is_file():
        spec = RunSpec.load(target)
        session = Session.load(spec.session) if spec.session and Path(spec.session).is_file() else \
            Session(model=spec.identity)
        return Launch(target, session)
    session = Session.load(target)
    run = session.run_path()
    if run is None or not (run / RUN_FILE).is_file():
        raise InputError(f"{target} has no run to continue: start one with operate")
    return Launch(run, session)


def replay_job(original: Session, loaded) -> tuple[Any, Any]:
    """The recorded job of `original` with the diagnosis settings it was judged by (old sessions kept them
    beside the job), and the diagnosis before: measured here when the plans name heads by class or
    statistic (hand-written sessions keep words such as `5-22.9-15&sick`), else None."""
    from .diagnosis import DiagnosisSettings, diagnose
    from .operation import SurgeryJob
    from .prompts import load_prompts
    from .spec import needs_report

    if not original.job:
        raise InputError(f"session {original.path} has no surgery to replay: it only holds a diagnosis")
    job = dict(original.job)
    if "diagnosis" not in job and original.diagnosis:
        job["diagnosis"] = original.diagnosis
    report = None
    if any(needs_report(p.get(k)) for p in job.get("plans", []) for k in ("targets", "frozen")):
        settings = DiagnosisSettings.from_dict(job.get("diagnosis") or {})
        report = diagnose(loaded, load_prompts(settings.prompts), settings)
    return SurgeryJob.from_dict(job, loaded.adapter, report=report), report


def new_session_path(name: str, root: str | Path = SESSIONS_DIR) -> Path:
    """root/NAME.json, numbered when it exists; checked writable (nothing is created)."""
    from .preflight import check_output_file

    root = Path(root)
    path, n = root / f"{name}.json", 2
    while path.exists():
        path, n = root / f"{name}-{n}.json", n + 1
    return check_output_file(path, what="session")


def _checkpointing(train: dict[str, Any]) -> str:
    """A recorded job's checkpointing (jobs before the modes recorded gradient_checkpointing True/False)."""
    legacy = train.get("gradient_checkpointing")
    if legacy is not None:
        return "full" if legacy else "none"
    return train.get("checkpointing", "auto")


def _absolute(source: str | None) -> str | None:
    """A local path as an absolute one (so a run started or resumed elsewhere reads the same file);
    hub ids and built-in sources unchanged."""
    if source and Path(source).expanduser().exists():
        return str(Path(source).expanduser().resolve())
    return source
