"""The head-surgeon workbench: head grid, detail and summary panes, diagnosis in a thread worker, and
surgery as a run (detached by default) that the workbench follows through its event log.

The workbench never trains in its own model: `o` writes a run directory and starts a runner that loads
the base weights itself, so every surgery starts from the weights its record names and survives the
terminal. Attaching (`o`, `L`, `head-surgeon attach`) rebuilds everything from the log, then follows it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Label, ProgressBar, RichLog, Sparkline, Static
from textual.worker import WorkerState, get_current_worker

from engine.diagnosis import diagnose
from engine.errors import HeadSurgeonError, InputError
from engine.eventlog import LOG_FILE, LogReader
from engine.evaluate import EvalSettings, drifted
from engine.events import (Checkpoint, DiagnosisProgress, EvalMetrics, Notice, PhaseChanged, Resumed, RunFailed,
                           RunFinished, RunStarted, event_from_dict)
from engine.model import check_identity, load_model, model_identity
from engine.prompts import load_prompts
from engine.recipe import RECIPE_FIELDS
from engine.report import HeadReport
from engine.report import Thresholds
from engine.runner import RunSpec, cancel, is_live, list_runs, run_state, session_state
from engine.runview import CONTROL_PREFIX as CONTROL
from engine.runview import RunHistory, point_report
from engine.session import Session
from engine.spec import format_heads, parse_heads
from engine.workflow import (DEFAULT_STEPS, JOB_DEFAULTS, RUNS_DIR, SESSIONS_DIR, JobInputs, Launch, create_run,
                             new_session_path, open_run, run_name, start)

from .bridge import EngineEvent, MessageSink, ModelLoaded, ReportReady, RunCreated, RunLaunched, WorkFailed
from .headgrid import CLASS_NAMES, GridData, HeadGrid
from .screens import ChoiceScreen, ConfirmScreen, HelpScreen, PromptScreen, SurgeryScreen

POLL_S = 0.25  # how often an attached run's log is read


def dialog_job_inputs(fields: dict[str, str], targets, frozen, prompts: str | None,
                      base: JobInputs | None = None) -> JobInputs:
    """The surgery dialog's fields and the grid's marks as the same inputs the CLI builds from flags;
    `base` (a loaded session's job) supplies every setting the dialog does not show."""
    base = base or JobInputs(targets="", prompts=prompts)
    if fields.get("recipe") and fields["recipe"] != base.recipe:  # another recipe: its choices, not the session's
        base = replace(base, recipe=fields["recipe"], **dict.fromkeys(RECIPE_FIELDS))
    try:
        return replace(base, targets=format_heads(targets), frozen=format_heads(frozen), corpus=fields["corpus"],
                       steps=int(fields["steps"]), epochs=None, lr=float(fields["lr"]),
                       seq_len=int(fields["seq_len"]), seed=int(fields["seed"]),
                       control="sham" if fields.get("control") else None)
    except ValueError as exc:
        raise InputError(f"steps, seq len and seed must be whole numbers and lr a number ({exc})") from exc


def _spread(launch: Launch) -> bool:
    """Whether the run goes over several processes (its run.json says how many)."""
    return int(RunSpec.load(launch.run_dir).model.get("nproc") or 1) > 1


def dialog_nproc(fields: dict[str, str]) -> int:
    """The dialog's GPUs field: how many processes (one GPU each) the run is spread over."""
    text = str(fields.get("nproc") or "1").strip()
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise InputError(f"GPUs must be a whole number of at least 1 (got {text!r})")
    return value


DIALOG_DEFAULTS = {"corpus": JOB_DEFAULTS["corpus"], "steps": DEFAULT_STEPS, "lr": JOB_DEFAULTS["lr"],
                   "seq_len": JOB_DEFAULTS["seq_len"], "seed": JOB_DEFAULTS["seed"], "recipe": JOB_DEFAULTS["recipe"],
                   "nproc": 1, "control": False}
SHORT_CLASS = {"bos-sink": "sink", "low-entropy": "low-ent", "positional": "posit"}


def _sink_rate_and_band(report: HeadReport) -> str:
    """Gu et al.'s sink rate and the paper's band (head indices sick in more than band_share of the layers)."""
    band = report.band()
    heads = ",".join("H" + item.removeprefix("0.") for item in format_heads((0, h) for h in band).split(","))
    return f"sink rate {100 * report.sink_rate()[1]:.0f}% · band {heads if band else 'none'}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class HeadSurgeonApp(App[int]):
    TITLE = "head-surgeon"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("d", "diagnose", "diagnose"),
        Binding("b", "mark_spec", "band/spec"),
        Binding("a", "mark_sick", "all sick"),
        Binding("x", "clear_marks", "clear"),
        Binding("o", "surgery", "operate"),
        Binding("left_square_bracket", "scrub(-1)", "earlier"),
        Binding("right_square_bracket", "scrub(1)", "later"),
        Binding("R", "resume_run", "resume run", show=False),
        Binding("s", "save_session", "save"),
        Binding("L", "load_session", "load"),  # `l` is vim-right in the grid
        Binding("m", "open_model", "model"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit_app", "quit"),
    ]

    def __init__(self, model_ref: str | None = None, device: str | None = None, dtype: str | None = None,
                 prompts_path: str | None = None, *, attach: str | None = None, detach: bool = True,
                 runs_root: str | Path = RUNS_DIR, sessions_root: str | Path = SESSIONS_DIR) -> None:
        super().__init__()
        self.model_ref, self.device, self.dtype = model_ref, device, dtype
        self.prompts_path = prompts_path
        self.detach = detach  # False: runs execute in a thread of this process (tests, scripting)
        self.runs_root, self.sessions_root = Path(runs_root), Path(sessions_root)
        self.loaded = None  # engine LoadedModel: the unmodified base, only handed to engine calls
        self.report: HeadReport | None = None  # diagnosis of the base model
        self.session: Session | None = None  # the session shown (loaded, or the attached run's)
        self.origin: Session | None = None  # the session loaded (L) or saved (s): new work derives from it
        self.base_inputs: JobInputs | None = None  # a loaded session's job: `o` keeps what the dialog hides
        self.owned: set[Path] = set()  # session files this workbench wrote itself (`s` may update them)
        self.attached: Launch | None = None  # the attached run
        self.history = RunHistory()
        self.after: HeadReport | None = None  # the attached run's final diagnosis, once it has one
        self.verdict: dict | None = None  # surgery vs sham control, once a run with a control arm finished
        self.final_recovery: dict | None = None  # the finished run's recovery (of its kept checkpoint)
        self.point: int | None = None  # index into history.points while scrubbing
        self.run_state = ""  # running / finished / cancelled / failed / dead of the attached run
        self._reader: LogReader | None = None
        self._timer = None
        self._pending_attach: Launch | None = None
        self._thresholds = Thresholds()  # the attached run's class boundaries
        self._following = False  # reading a live run's log as it grows (not an old run's history)
        if attach is not None:
            self._pending_attach = open_run(attach)
            if self.model_ref is None:
                spec = RunSpec.load(self._pending_attach.run_dir)
                self.model_ref = spec.model.get("ref")
                self.device, self.dtype = self.device or spec.model.get("device"), self.dtype or spec.model.get("dtype")
        self.surgery_defaults = dict(DIALOG_DEFAULTS)

    # --- layout ---------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            yield HeadGrid(id="grid")
            with Vertical(id="side"):
                yield Static("", id="detail")
                yield Static("", id="summary")
                with Horizontal(classes="curve"):
                    yield Label("loss", id="loss-label")
                    yield Sparkline([], id="loss-curve")
                with Horizontal(classes="curve"):
                    yield Label("held-out ppl", id="ppl-label")
                    yield Sparkline([], id="ppl-curve")
                with Horizontal(classes="curve control", id="control-row"):  # shown when a sham arm runs
                    yield Label("sham ppl", id="control-label")
                    yield Sparkline([], id="control-curve")
        with Horizontal(id="status-row"):
            yield Static("", id="status")
            yield ProgressBar(id="progress", show_eta=False)
        yield RichLog(id="log", max_lines=500, markup=False)
        yield Footer()

    @property
    def grid(self) -> HeadGrid:
        return self.query_one(HeadGrid)

    @property
    def losses(self) -> list[float]:
        """The surgery's training loss at every step (the sham arm's is not drawn)."""
        return [v for phase, _, v in self.history.losses if v is not None and not phase.startswith(CONTROL)]

    @property
    def ppls(self) -> list[float]:
        """Held-out perplexity at the surgery's points, the model before the operation first."""
        return [p.heldout_ppl for p in self.history.points
                if p.heldout_ppl is not None and not p.label.startswith(CONTROL)]

    @property
    def control_ppls(self) -> list[float]:
        return [p.heldout_ppl for p in self.history.points if p.heldout_ppl is not None and p.label.startswith(CONTROL)]

    def on_mount(self) -> None:
        self.grid.border_title = "layers x heads"
        self.query_one("#detail", Static).border_title = "head"
        self.query_one("#summary", Static).border_title = "summary"
        self.grid.focus()
        self.open_model(self.model_ref)

    def log_line(self, text: str) -> None:
        self.query_one(RichLog).write(text)

    def set_status(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def _error(self, what: str, message: str) -> None:
        self.set_status(f"{what} failed")
        self.log_line(f"{what} failed: {message}")
        self.notify(message, title=f"{what} failed", severity="error", timeout=8)

    # --- model and diagnosis (thread workers) ------------------------------------------------------
    def open_model(self, ref: str | None) -> None:
        self.set_status(f"loading {ref or 'bundled organism'}…")
        self.query_one(ProgressBar).update(total=None)
        self._load_worker(ref)

    @work(thread=True, exclusive=True, group="load", exit_on_error=False)
    def _load_worker(self, ref: str | None) -> None:
        try:
            loaded = load_model(ref, device=self.device, dtype=self.dtype)
        except HeadSurgeonError as exc:
            self.post_message(WorkFailed("load", str(exc)))
            return
        if not get_current_worker().is_cancelled:
            self.post_message(ModelLoaded(loaded))

    @work(thread=True, exclusive=True, group="diagnose", exit_on_error=False)
    def _diagnose_worker(self, loaded) -> None:
        worker = get_current_worker()
        try:
            prompts = load_prompts(self.prompts_path)
            report = diagnose(loaded, prompts, self._diagnosis_settings(), sink=MessageSink(self), cancelled=lambda: worker.is_cancelled)
        except HeadSurgeonError as exc:
            self.post_message(WorkFailed("diagnosis", str(exc)))
            return
        if not worker.is_cancelled:
            self.post_message(ReportReady(report))

    def _diagnosis_settings(self):
        """The workbench's diagnosis settings: the defaults a surgery started here is judged by."""
        return JobInputs(targets="", prompts=self.prompts_path).diagnosis_settings()

    def on_worker_state_changed(self, event) -> None:
        if event.state == WorkerState.ERROR:  # an unexpected failure: one line, never a traceback
            error = event.worker.error
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            if "out of memory" in first.lower():
                first = "out of memory: try a smaller model or --device cpu"
            self.post_message(WorkFailed(event.worker.group, f"{type(error).__name__}: {first}"))
        if event.worker.group == "surgery" and event.state in (WorkerState.SUCCESS, WorkerState.ERROR,
                                                              WorkerState.CANCELLED):
            self._poll()  # an in-process run ended: read the rest of its log now

    @on(ModelLoaded)
    def _model_loaded(self, message: ModelLoaded) -> None:
        loaded = message.loaded
        self.loaded, self.report = loaded, None
        a = loaded.adapter
        self.grid.set_data(GridData(a.n_layer, a.n_head, a.slopes))
        self.sub_title = (f"{loaded.name} · {a.family} {a.n_layer}x{a.n_head} · {loaded.device} "
                          f"{str(loaded.dtype).removeprefix('torch.')}")
        self.log_line(f"loaded {loaded.ref} ({a.n_layer} layers x {a.n_head} heads)")
        if self._pending_attach is not None:
            launch, self._pending_attach = self._pending_attach, None
            try:
                self._show_session(launch.session)
                self.attach(launch)
                return
            except HeadSurgeonError as exc:
                self._error("attach", str(exc))
        self.refresh_panes()
        self.action_diagnose()
        self._offer_live_runs()

    def _offer_live_runs(self) -> None:
        live = [r for r in list_runs(self.runs_root) if r.state == "running"]
        if not live:
            return
        newest = live[-1]

        def answer(yes: bool | None) -> None:
            if yes:
                try:
                    self.attach(open_run(newest.run_dir))
                except HeadSurgeonError as exc:
                    self._error("attach", str(exc))

        self.push_screen(ConfirmScreen(f"{len(live)} run(s) live. Attach to {newest.run_dir.name} "
                                       f"(step {newest.step}/{newest.total_steps or '?'})?"), answer)

    def _set_grid(self, report: HeadReport) -> None:
        data = self.grid.data
        data.bos = report.bos_mass.tolist()
        data.classes = report.classes.tolist()
        self.grid.set_data(data)

    @on(ReportReady)
    def _report_ready(self, message: ReportReady) -> None:
        report = message.report
        self.report, self.after, self.point = report, None, None
        self._set_grid(report)
        counts = report.counts()
        self.set_status(f"diagnosed {report.n_prompts} prompts · {_sink_rate_and_band(report)}")
        self.log_line("diagnosis: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        self.query_one(ProgressBar).update(total=1, progress=1)
        self.refresh_panes()

    @on(WorkFailed)
    def _work_failed(self, message: WorkFailed) -> None:
        self._error(message.what, message.message)
        self.query_one(ProgressBar).update(total=1, progress=0)

    @on(EngineEvent)
    def _engine_event(self, message: EngineEvent) -> None:
        event = message.event
        if isinstance(event, DiagnosisProgress):
            self.query_one(ProgressBar).update(total=event.total_prompts, progress=event.done_prompts)

    # --- runs: start, attach, follow ---------------------------------------------------------------
    @work(thread=True, exclusive=True, group="surgery", exit_on_error=False)
    def _run_worker(self, job, marks: dict[str, str] | None, launch: Launch | None, nproc: int = 1) -> None:
        """Set up the run (off the UI thread: the base's content hash can take a while on a large model)
        unless `launch` resumes one, then start it detached, or here when the workbench does not detach.
        A run over several GPUs always starts detached: torchrun runs it, one process a GPU."""
        worker = get_current_worker()
        resume = launch is not None
        try:
            if launch is None:
                launch = create_run(self.loaded, job, baseline=self.report, derived_from=self.origin, marks=marks,
                                    device=self.device, dtype=self.dtype, root=self.runs_root, nproc=nproc)
            self.post_message(RunCreated(launch, resume))
            if self.detach or _spread(launch):
                start(launch, detach=True, resume=resume)
                self.post_message(RunLaunched(launch))
            else:
                start(launch, detach=False, resume=resume, cancelled=lambda: worker.is_cancelled)
        except HeadSurgeonError as exc:
            self.post_message(WorkFailed("surgery", str(exc)))

    def _start_run(self, job=None, marks: dict[str, str] | None = None, launch: Launch | None = None,
                   nproc: int = 1) -> None:
        self.set_status("surgery starting…")
        self.query_one(ProgressBar).update(total=None, progress=0)
        self._run_worker(job, marks, launch, nproc)

    @on(RunCreated)
    def _run_created(self, message: RunCreated) -> None:
        self.attach(message.launch, fresh=not message.resume)

    @on(RunLaunched)
    def _run_launched(self, message: RunLaunched) -> None:
        self.log_line(f"run {message.launch.run_dir} started (pid {message.launch.pid}); it keeps going if you quit")

    def attach(self, launch: Launch, fresh: bool = False) -> None:
        """Show a run: rebuild its history from the log, then follow the log while the run is live."""
        spec = RunSpec.load(launch.run_dir)
        if self.loaded is not None:
            check_identity(spec.identity, self.loaded, f"run {launch.run_dir}")
        if self._timer is not None:
            self._timer.stop()
        self._thresholds = Thresholds(**(spec.job.get("diagnosis") or {}).get("thresholds", {}))
        self.attached, self.session = launch, launch.session
        self.history, self.after, self.point, self.run_state, self.verdict = RunHistory(), None, None, "", None
        self.final_recovery = None
        self._reader = LogReader(launch.run_dir / LOG_FILE)
        if not fresh:
            self.log_line(f"attached to {launch.run_dir}")
        self._poll()
        self._timer = self.set_interval(POLL_S, self._poll)

    def _poll(self) -> None:
        if self.attached is None or self._reader is None:
            return
        live = is_live(self.attached.run_dir)
        records = self._reader.read_new(final=not live)
        self._following = live or any(w.is_running for w in self.workers if w.group == "surgery")
        for record in records:
            try:
                event = event_from_dict(record)
            except (TypeError, ValueError):
                continue  # a record from another version: skip it, keep the rest
            self.history.apply(event)
            self._log_event(event)
        if self.report is None and self.history.points and self.history.points[0].label == "before":
            self.report = point_report(self.history.points[0], self._blank_report())  # attached with no diagnosis
        starting = any(w.is_running for w in self.workers if w.group == "surgery")  # its runner not yet up
        try:
            state = "running" if live or starting else run_state(self.attached.run_dir).state
        except HeadSurgeonError as exc:
            state, self.history.message = "damaged", str(exc)
        if records or state != self.run_state:
            self.run_state = state
            self._redraw_run()
        if state not in ("running",) and self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _redraw_run(self) -> None:
        h, bar = self.history, self.query_one(ProgressBar)
        if h.total_steps:
            bar.update(total=h.total_steps, progress=h.step)
        if self.run_state == "running":
            last = f"loss {h.losses[-1][2]:.4f}  " if h.losses and h.losses[-1][2] is not None else ""
            self.set_status(f"step {h.step}/{h.total_steps}  {last}{h.tokens_per_s:,.0f} tok/s  ETA {_duration(h.eta_s())}"
                            if h.total_steps else f"{h.phase}: {h.detail}")
        elif self.run_state == "finished":
            self._finished()
        elif self.run_state == "failed":
            self.set_status(f"run failed: {h.message}"[:200])
            self.notify(h.message, title="surgery failed", severity="error", timeout=10)
        elif self.run_state == "cancelled":
            self.set_status(f"run cancelled at step {h.step}: R resumes it")
        elif self.run_state == "dead":
            self.set_status(f"run dead at step {h.step} (its runner is gone): R resumes it")
            self.notify(f"the runner of {self.attached.run_dir.name} is gone: R resumes from the last saved state",
                        title="run dead", severity="warning", timeout=10)
        elif self.run_state == "damaged":
            self.set_status("run directory damaged")
            self.notify(h.message, title="run damaged", severity="error", timeout=10)
        if self.point is None:
            self._show(self._latest_report())
        self._update_curves()
        self.refresh_panes()

    def _log_event(self, event) -> None:
        """The log pane, rebuilt from the event log like everything else."""
        line = None
        if isinstance(event, PhaseChanged):
            line = f"{event.phase}: {event.detail}"
        elif isinstance(event, EvalMetrics):
            ppl = f"{event.heldout_ppl:.3f}" if event.heldout_ppl is not None else "?"
            tracked = f", tracked {event.tracked_ppl:.3f}" if event.tracked_ppl is not None else ""
            line = f"eval {event.label or ''} step {event.step}: held-out ppl {ppl}{tracked}"
        elif isinstance(event, Checkpoint) and event.best:
            line = f"best checkpoint at step {event.step}"
        elif isinstance(event, Resumed):
            line = f"{event.pass_name} resumed from step {event.step}"
        elif isinstance(event, RunStarted):
            line = f"runner {event.pid} {'resumed' if event.resume else 'started'}"
        elif isinstance(event, RunFinished):
            line = f"run {'cancelled' if event.cancelled else 'finished'} at step {event.step}"
        elif isinstance(event, RunFailed):
            line = f"run failed at step {event.step}: {event.message}"
        elif isinstance(event, Notice):
            line = f"{event.level}: {event.message}"
            if self._following:
                self.notify(event.message, title=event.level, severity="warning", timeout=12)
        if line:
            self.log_line(line)

    def _blank_report(self) -> HeadReport:
        """The loaded model's shape and slopes with no statistics (grids come from a run's points)."""
        a = self.loaded.adapter
        zeros = np.zeros((a.n_layer, a.n_head))
        return HeadReport(model=self.loaded.ref, n_layer=a.n_layer, n_head=a.n_head, slopes=a.slopes, bos_mass=zeros,
                          entropy=zeros, local_mass=zeros, contribution=zeros, thresholds=self._thresholds)

    def _finished(self) -> None:
        import json

        report_file = self.attached.run_dir / "report.json"
        try:
            report = json.loads(report_file.read_text())
        except (OSError, ValueError):
            self.set_status("run finished")
            return
        self.after = HeadReport.from_json(report["diagnosis_after"])
        self.verdict = report.get("verdict") if "heldout_ppl_kept" in report.get("verdict", {}) else None
        rec = report["recovery"]
        self.final_recovery = {"woken": rec["woken"], "functional": rec["functional"], "targets": rec["targets"],
                               "lost": len(rec.get("lost_function", []))}
        rec, ppl = report["recovery"], report["ppl"]
        sham = f" (sham {self.verdict['heldout_ppl_kept']['control']:.2f})" if self.verdict else ""
        self.set_status(f"done: woken {rec['woken']}/{rec['targets']}, functional {rec['functional']}; "
                        f"ppl {ppl['heldout_before']:.2f} → {ppl['heldout_after']:.2f}{sham}")
        if self.verdict:
            self.log_line(self.verdict["text"])
        self.log_line(f"patch and report in {self.attached.run_dir}; drift {report['drift']['drifted']} heads, "
                      f"iatrogenic {len(report['iatrogenic'])}")

    def _latest_report(self) -> HeadReport | None:
        if self.after is not None:
            return self.after
        surgery = [p for p in self.history.points if not p.label.startswith(CONTROL)]
        if surgery and self.report is not None:  # the grid follows the surgery; its control is scrubbed to
            return point_report(surgery[-1], self.report)
        return self.report

    def _show(self, report: HeadReport | None) -> None:
        if report is not None:
            self._set_grid(report)

    def _update_curves(self) -> None:
        losses, ppls, control = self.losses, self.ppls, self.control_ppls
        self.query_one("#loss-curve", Sparkline).data = losses
        self.query_one("#ppl-curve", Sparkline).data = ppls
        self.query_one("#loss-label", Label).update(f"loss {losses[-1]:.3f}" if losses else "loss")
        self.query_one("#ppl-label", Label).update(f"ppl {ppls[-1]:.2f}" if ppls else "held-out ppl")
        self.query_one("#control-row").display = bool(control)
        self.query_one("#control-curve", Sparkline).data = control
        self.query_one("#control-label", Label).update(f"sham {control[-1]:.2f}" if control else "sham ppl")

    # --- what the panes show ---------------------------------------------------------------------------
    def shown_report(self) -> HeadReport | None:
        """The statistics on screen: a scrubbed point, else the run's latest, else the base diagnosis."""
        if self.point is not None and self.report is not None:
            return point_report(self.history.points[self.point], self.report)
        return self._latest_report() if self.attached is not None else self.report

    def before_report(self) -> HeadReport | None:
        """The model before the attached run's operation (its first point), for `was` values and drift."""
        points = self.history.points
        if points and points[0].label == "before" and self.report is not None:
            return point_report(points[0], self.report)
        return None

    @property
    def recovery(self) -> dict | None:
        rec = (self.history.recovery_at(self.history.points[self.point]) if self.point is not None
               else self.history.latest_recovery(skip_prefix=CONTROL))  # the surgery's, not its control's
        if self.point is None and self.final_recovery is not None:
            return self.final_recovery  # the kept checkpoint's, as the report says
        if rec is None:
            return None
        lost = sum(bool(e.get("lost_function")) for e in rec.per_head.values())
        return {"woken": rec.woken, "functional": rec.functional, "targets": rec.targets, "lost": lost}

    @property
    def drift(self) -> int | None:
        before, shown = self.before_report(), self.shown_report()
        if before is None or shown is None or shown is before:
            return None
        targets = list(self.grid.data.targets)
        return int(drifted(before.bos_mass, shown.bos_mass, targets, EvalSettings().drift_threshold).sum())

    @on(HeadGrid.CursorMoved)
    @on(HeadGrid.MarksChanged)
    def refresh_panes(self) -> None:
        self.query_one("#detail", Static).update(self._detail_text())
        self.query_one("#summary", Static).update(self._summary_text())

    def _detail_text(self) -> Text:
        data = self.grid.data
        if not data.n_layer:
            return Text("no model loaded", style="dim")
        layer, head = self.grid.cursor
        text = Text()
        text.append(f"L{layer}.H{head}", style="bold")
        text.append(f"  slope {data.slopes[head]:.3g}\n")
        if (layer, head) in data.targets:
            text.append("target ", style="bold")
        elif (layer, head) in data.frozen:
            text.append("frozen ", style="bold")
        report = self.shown_report()
        if report is None:
            text.append("not diagnosed yet (d)", style="dim")
            return text
        info = report.head(layer, head)
        text.append(info["class"] + "\n", style=self.grid.class_style(info["class"]))
        before = self.before_report()
        was = before.head(layer, head) if before is not None and before is not report else None
        for key, label in (("bos_mass", "BOS"), ("entropy", "entropy"), ("local_mass", "local"),
                           ("contribution", "contrib")):
            text.append(f"{label:<8}{info[key]:.3f}" + (f" (was {was[key]:.2f})" if was is not None else "") + "\n")
        return text

    def _summary_text(self) -> Text:
        data = self.grid.data
        text = Text()
        report = self.shown_report()
        counts = report.counts() if report is not None else {}
        for i, name in enumerate(CLASS_NAMES):  # two classes a line: the pane is 24 columns at 80x24
            text.append(" ", style=self.grid.class_style(name))
            cell = f"{SHORT_CLASS.get(name, name)} {counts.get(name, '-')}"
            text.append(f"{cell:<11}" if i % 2 == 0 else f"{cell}\n")
        if len(CLASS_NAMES) % 2:  # beside the last class: Gu et al.'s sink rate at the point shown (the band: status)
            text.append(f" rate {100 * report.sink_rate()[1]:.0f}%\n" if report is not None else "\n")
        text.append(f"targets {len(data.targets)}  frozen {len(data.frozen)}\n")
        recovery = self.recovery
        if recovery is not None:
            r = recovery
            text.append(f"woken {r['woken']} / functional {r['functional']}\n", style="bold")  # of the targets above
        drift = self.drift
        if drift is not None:
            lost = f" · lost fn {recovery['lost']}" if recovery and recovery.get("lost") else ""
            text.append(f"drift {drift} untouched{lost}\n" if not lost else f"drift {drift}{lost}\n")
        if self.verdict is not None:
            end = self.verdict["heldout_ppl_kept"]
            worse = self.verdict["lower_kept"] == "control"
            text.append(f"ppl {end['surgery']:.2f} vs sham {end['control']:.2f}\n", style="bold red" if worse else "bold")
        return text

    # --- actions ----------------------------------------------------------------------------------------
    def action_diagnose(self) -> None:
        if self.loaded is None:
            self.notify("no model loaded yet", severity="warning")
            return
        self.set_status("diagnosing…")
        self.query_one(ProgressBar).update(total=None, progress=0)
        self._diagnose_worker(self.loaded)

    def action_mark_sick(self) -> None:
        if self.report is None:
            self.notify("run diagnosis first (d)", severity="warning")
            return
        self.grid.set_marks(targets=set(self.grid.data.targets) | set(self.report.sick()))

    def action_clear_marks(self) -> None:
        self.grid.set_marks(targets=set(), frozen=set())

    def action_mark_spec(self) -> None:
        data = self.grid.data
        hint = (f"e.g. 5-22.9-15 (layers 5-22, heads 9-15), 3.*, sick, positional, 2-4.*&bos>0.3, !dead · "
                f"{data.n_layer} layers x {data.n_head} heads")
        self.push_screen(PromptScreen("Mark targets by head spec", "LAYER.HEAD items", hint=hint), self._apply_spec)

    def _apply_spec(self, spec: str | None) -> None:
        if not spec:
            return
        data = self.grid.data
        try:
            heads = parse_heads(spec, data.n_layer, data.n_head, report=self.report)
        except HeadSurgeonError as exc:
            self.notify(str(exc), title="head spec", severity="error")
            return
        self.grid.set_marks(targets=set(data.targets) | set(heads))
        self.log_line(f"marked {len(heads)} heads: {spec}")

    def action_surgery(self) -> None:
        data = self.grid.data
        if self.loaded is None or self.report is None:
            self.notify("load a model and run diagnosis first (d)", severity="warning")
            return
        if not data.targets:
            self.notify("mark target heads first (space, r, c, b or a)", severity="warning")
            return
        if self.attached is not None and self.run_state == "running":
            self.notify("a surgery is already running: wait for it, or quit and cancel it", severity="warning")
            return
        summary = f"{len(data.targets)} targets: {format_heads(data.targets)[:50]}  frozen: {len(data.frozen)}"
        self.push_screen(SurgeryScreen(summary, self.surgery_defaults), self._start_surgery)

    def _start_surgery(self, fields: dict | None) -> None:
        if not fields:
            return
        data = self.grid.data
        self.surgery_defaults = {**fields}  # a mistake is fixed in the dialog as typed, not retyped
        try:
            inputs = dialog_job_inputs(fields, data.targets, data.frozen, self.prompts_path, self.base_inputs)
            nproc = dialog_nproc(fields)
            inputs.check()
            job = inputs.build_job(self.loaded.adapter, self.report)
        except HeadSurgeonError as exc:
            self.notify(str(exc), title="surgery", severity="error", timeout=10)
            return
        self._start_run(job, {"targets": format_heads(data.targets), "frozen": format_heads(data.frozen)}, nproc=nproc)

    def action_resume_run(self) -> None:
        if self.attached is None or self.run_state not in ("dead", "cancelled"):
            self.notify("no dead or cancelled run to resume here", severity="warning")
            return
        self._start_run(launch=self.attached)

    def _snapshot(self) -> Session:
        """The current work as a new session (model, diagnosis settings and report, marks, the run shown)."""
        data = self.grid.data
        session = self.session.derive() if self.session is not None else Session(model=model_identity(self.loaded))
        session.model = model_identity(self.loaded)
        session.report = self.report.to_json() if self.report is not None else None
        session.marks = {"targets": format_heads(data.targets), "frozen": format_heads(data.frozen)}
        session.diagnosis = self._diagnosis_settings().to_dict()
        if self.attached is not None:
            session.set_run_dir(self.attached.run_dir)
            session.status = self.run_state or session.status
        return session

    def action_save_session(self) -> None:
        if self.loaded is None:
            self.notify("nothing to save: no model loaded", severity="warning")
            return
        try:
            mine = self.session is not None and self.session.path is not None and self.session.path in self.owned
            path = self.session.path if mine else new_session_path(run_name(model_identity(self.loaded)),
                                                                   self.sessions_root)
            session = self._snapshot()
            if mine:
                session.derived_from = self.session.derived_from
            session.log("save")
            session.save(path)
        except HeadSurgeonError as exc:
            self.notify(str(exc), title="save session", severity="error", timeout=10)
            return
        self.session = self.origin = session
        self.owned.add(session.path)
        self.notify(f"session saved to {session.path}", title="saved")
        self.log_line(f"session saved to {session.path}")

    def action_load_session(self) -> None:
        self.push_screen(PromptScreen("Load session", "path to a session .json or a run directory", "sessions/",
                                      "shows the recorded grid, marks, curves and recovery without recomputing; "
                                      "the file is never changed"),
                         self._load_session)

    def _load_session(self, path: str | None) -> None:
        if not path:
            return
        if self.loaded is None:
            self.notify("no model loaded yet", severity="warning")
            return
        try:
            session = Session.load(path)
            check_identity(session.model, self.loaded, f"session {path}")
            self._show_session(session)
            run = session.run_path()
            if run is not None and (run / LOG_FILE).is_file():
                self.attach(Launch(run, session))
            else:
                self._show_legacy(session)
            status = session_state(session)
        except HeadSurgeonError as exc:
            self.notify(str(exc), title="load session", severity="error", timeout=10)
            return
        self.origin = session
        self.log_line(f"loaded session {path} ({status}, {len(session.actions)} actions); read-only: s saves a new one")

    def _show_session(self, session: Session) -> None:
        """Report, marks and surgery defaults of a session (the run, if any, is attached separately)."""
        data = self.grid.data
        self.session = session
        report = HeadReport.from_json(session.report) if session.report else None
        if report is not None:
            self.report = report
            self._set_grid(report)
        marks = {k: parse_heads(v, data.n_layer, data.n_head, report=report) if v else []
                 for k, v in session.marks.items()}
        self.grid.set_marks(targets=set(marks.get("targets", [])), frozen=set(marks.get("frozen", [])))
        if session.job:  # `o` re-runs the recorded job (every setting) on the current marks
            self.base_inputs = JobInputs.from_job(session.job)
            b = self.base_inputs
            self.surgery_defaults = {"corpus": b.corpus, "steps": b.train_config().steps or DEFAULT_STEPS, "lr": b.lr,
                                     "seq_len": b.seq_len, "seed": b.seed, "recipe": b.recipe,
                                     "nproc": (session.world or {}).get("world_size") or 1,
                                     "control": b.control == "sham"}
        self.refresh_panes()

    def _show_legacy(self, session: Session) -> None:
        """A schema 1 session embeds its events: replay them into the history (nothing to follow)."""
        if self._timer is not None:
            self._timer.stop()
            self._timer = None
        self.attached, self.after, self.point, self.verdict, self.final_recovery = None, None, None, None, None
        self.history = RunHistory()
        for event in session.events():
            self.history.apply(event)
        if self.history.points and self.report is not None:
            self._show(point_report(self.history.points[-1], self.report))
        self._update_curves()
        self.refresh_panes()
        self.set_status(f"session {session.path.name}: {session.status}, {len(self.history.points)} evaluation points")

    def action_scrub(self, delta: int) -> None:
        """Step through the evaluation points (grid, detail and summary together); the first is the model
        before the operation."""
        points = self.history.points
        if not points or self.report is None:
            self.notify("no recorded evaluation points: run surgery (o) or load a session (L)", severity="warning")
            return
        last = len(points) - 1
        self.point = min(max((last if self.point is None else self.point) + delta, 0), last)
        point = points[self.point]
        self._show(self.shown_report())
        self.refresh_panes()
        what = "before the operation" if point.label == "before" else f"{point.label} step {point.step}"
        ppl = f"{point.heldout_ppl:.2f}" if point.heldout_ppl is not None else "?"
        self.set_status(f"evaluation point {self.point + 1}/{len(points)}: {what} · ppl {ppl}")

    def action_open_model(self) -> None:
        current = self.loaded.ref if self.loaded is not None else ""
        self.push_screen(
            PromptScreen("Open model", "hub id or local directory", current,
                         "bigscience/bloom-560m, /path/to/save_pretrained_dir, or empty for the bundled organism"),
            lambda ref: ref is not None and self.open_model(ref),
        )

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.help_markdown()))

    def help_markdown(self) -> str:
        lines = ["# head-surgeon keys", "", "| key | action |", "|---|---|"]
        for binding in [*HeadGrid.BINDINGS, *self.BINDINGS]:
            keys = "`, `".join(self.get_key_display(Binding(key.strip(), "")) for key in binding.key.split(","))
            lines.append(f"| `{keys}` | {binding.description or binding.action} |")
        lines += ["", "Grid cells: colour = class, number = BOS mass in percent (capped at 99), `+` target, `=` frozen.",
                  "Column headers are head indices; the detail pane shows each head's ALiBi slope.",
                  "Surgery runs in its own process: quitting leaves it going; `head-surgeon attach RUN` returns to it.",
                  "", "ctrl+p opens the command palette."]
        return "\n".join(lines)

    def action_quit_app(self) -> None:
        in_process = [w for w in self.workers if w.is_running and w.group == "surgery"]
        if in_process:
            def stop(yes: bool | None) -> None:
                if yes:
                    self.set_status("stopping the run at its next step…")
                    self.workers.cancel_all()
                    self.exit(0)

            self.push_screen(ConfirmScreen("A surgery runs in this process. Stop it at its next step and quit?"), stop)
            return
        if self.attached is not None and self.run_state == "running":
            run_dir = self.attached.run_dir

            def choose(key: str | None) -> None:
                if key == "l":
                    self.exit(0)
                elif key == "c":
                    try:
                        self.notify(cancel(run_dir))
                    except HeadSurgeonError as exc:
                        self.notify(str(exc), severity="warning")
                    self.exit(0)

            self.push_screen(ChoiceScreen(f"Run {run_dir.name} is still going.",
                                          {"l": "leave it running and quit", "c": "cancel the run and quit"}), choose)
            return
        self.workers.cancel_all()
        self.exit(0)

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Diagnose", "Run diagnosis on the current model", self.action_diagnose)
        yield SystemCommand("Open model", "Open a hub id or local directory", self.action_open_model)
        yield SystemCommand("Mark heads by spec", "Mark a band such as 5-22.9-15", self.action_mark_spec)
        yield SystemCommand("Mark all sick heads", "Target every BOS-sink and dead head", self.action_mark_sick)
        yield SystemCommand("Clear marks", "Unmark every target and frozen head", self.action_clear_marks)
        yield SystemCommand("Surgery", "Re-initialise and retrain the marked heads", self.action_surgery)
        yield SystemCommand("Resume run", "Continue the attached dead or cancelled run", self.action_resume_run)
        yield SystemCommand("Save session", "Save model, diagnosis, marks and run to sessions/", self.action_save_session)
        yield SystemCommand("Load session", "Show a saved session's grid, curves and recovery", self.action_load_session)
        yield SystemCommand("Help", "List every key", self.action_help)
