"""The head-surgeon workbench: head grid, detail and summary panes, diagnosis and surgery in thread
workers with live curves and recovery, sessions saved and loaded from the keyboard."""

from __future__ import annotations

import time
from pathlib import Path

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, Label, ProgressBar, RichLog, Sparkline, Static
from textual.worker import get_current_worker

from engine.corpus import CorpusSpec
from engine.diagnosis import diagnose
from engine.errors import HeadSurgeonError, InputError
from engine.events import EvalMetrics, HeadRecovery, MultiSink, PhaseChanged, RunFailed, RunFinished, StepMetrics
from engine.evaluate import EvalSettings, drifted
from engine.model import load_model, model_identity
from engine.operation import SurgeryJob, run_job
from engine.prompts import load_prompts
from engine.report import HeadReport, Thresholds, classify
from engine.session import Session, SessionRecorder, default_session_path
from engine.spec import format_heads, parse_heads
from engine.surgery import SurgeryPlan
from engine.train import TrainConfig

from .bridge import EngineEvent, MessageSink, ModelLoaded, ReportReady, SurgeryDone, WorkFailed
from .headgrid import CLASS_NAMES, GridData, HeadGrid
from .screens import ConfirmScreen, HelpScreen, PromptScreen, SurgeryScreen

RUNS_DIR = Path("runs")


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
        Binding("s", "save_session", "save"),
        Binding("L", "load_session", "load"),  # `l` is vim-right in the grid
        Binding("m", "open_model", "model"),
        Binding("question_mark", "help", "help"),
        Binding("q", "quit_app", "quit"),
    ]

    def __init__(self, model_ref: str | None = None, device: str | None = None, dtype: str | None = None,
                 prompts_path: str | None = None) -> None:
        super().__init__()
        self.model_ref, self.device, self.dtype = model_ref, device, dtype
        self.prompts_path = prompts_path
        self.loaded = None  # engine LoadedModel: opaque here, only handed back to engine calls
        self.report = None  # engine HeadReport
        self.before = None  # the HeadReport before the last surgery (detail pane shows before/after)
        self.session: Session | None = None
        self.recovery: dict | None = None  # last HeadRecovery: woken / functional / targets
        self.drift: int | None = None  # untouched heads that drifted during the current run
        self.point: int | None = None  # index of the evaluation point shown while scrubbing
        self.losses: list[float] = []
        self._consumed = 0  # session events already drawn into the curves
        self.ppls: list[float] = []
        self.surgery_defaults = {"corpus": "python-stdlib/json", "steps": 100, "lr": 5e-5, "seq_len": 512, "seed": 0}

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
        with Horizontal(id="status-row"):
            yield Static("", id="status")
            yield ProgressBar(id="progress", show_eta=True)
        yield RichLog(id="log", max_lines=500, markup=False)
        yield Footer()

    @property
    def grid(self) -> HeadGrid:
        return self.query_one(HeadGrid)

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

    # --- engine work (thread workers) ----------------------------------------------------------------
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
            report = diagnose(loaded, prompts, sink=MessageSink(self), cancelled=lambda: worker.is_cancelled)
        except HeadSurgeonError as exc:
            self.post_message(WorkFailed("diagnosis", str(exc)))
            return
        if not worker.is_cancelled:
            self.post_message(ReportReady(report))

    def on_worker_state_changed(self, event) -> None:
        from textual.worker import WorkerState

        if event.state == WorkerState.ERROR:  # an unexpected failure: one line, never a traceback
            error = event.worker.error
            first = (str(error).strip().splitlines() or [type(error).__name__])[0]
            if "out of memory" in first.lower():
                first = "out of memory: try a smaller model or --device cpu"
            self.post_message(WorkFailed(event.worker.group, f"{type(error).__name__}: {first}"))

    @on(ModelLoaded)
    def _model_loaded(self, message: ModelLoaded) -> None:
        loaded = message.loaded
        self.loaded, self.report = loaded, None
        a = loaded.adapter
        self.grid.set_data(GridData(a.n_layer, a.n_head, a.slopes))
        self.sub_title = f"{loaded.name} · {a.n_layer}x{a.n_head} · {loaded.device} {str(loaded.dtype).removeprefix('torch.')}"
        self.log_line(f"loaded {loaded.ref} ({a.n_layer} layers x {a.n_head} heads)")
        self.refresh_panes()
        self.action_diagnose()

    def _set_report(self, report) -> None:
        self.report = report
        data = self.grid.data
        data.bos = report.bos_mass.tolist()
        data.classes = report.classes.tolist()
        self.grid.set_data(data)

    @on(ReportReady)
    def _report_ready(self, message: ReportReady) -> None:
        report = message.report
        self._set_report(report)
        counts = report.counts()
        self.set_status(f"diagnosed {report.n_prompts} prompts, {report.n_tokens} tokens")
        self.log_line("diagnosis: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        self.query_one(ProgressBar).update(total=1, progress=1)
        self.refresh_panes()

    @on(WorkFailed)
    def _work_failed(self, message: WorkFailed) -> None:
        self.set_status(f"{message.what} failed")
        self.log_line(f"{message.what} failed: {message.message}")
        self.notify(message.message, title=f"{message.what} failed", severity="error", timeout=8)
        self.query_one(ProgressBar).update(total=1, progress=0)

    @work(thread=True, exclusive=True, group="surgery", exit_on_error=False)
    def _surgery_worker(self, job: SurgeryJob, out_dir: Path) -> None:
        worker = get_current_worker()
        loaded, session = self.loaded, self.session
        try:
            session.model = model_identity(loaded)
            session.set_run_dir(out_dir)
            sink = MultiSink(MessageSink(self), SessionRecorder(session))
            report = run_job(loaded, job, out_dir, prompts=load_prompts(self.prompts_path), sink=sink,
                             cancelled=lambda: worker.is_cancelled, baseline=self.report)
        except HeadSurgeonError as exc:
            self.post_message(WorkFailed("surgery", str(exc)))
            return
        self.post_message(SurgeryDone(report, str(out_dir)))

    @on(EngineEvent)
    def _engine_event(self, message: EngineEvent) -> None:
        event = message.event
        bar = self.query_one(ProgressBar)
        if type(event).__name__ == "DiagnosisProgress":
            bar.update(total=event.total_prompts, progress=event.done_prompts)
        elif isinstance(event, StepMetrics):
            bar.update(total=event.total_steps, progress=event.step)
            self.set_status(f"step {event.step}/{event.total_steps}  loss {event.loss:.4f}  "
                            f"{event.tokens_per_s:,.0f} tok/s")
            self._sync_curves()
        elif isinstance(event, EvalMetrics):
            self._track_drift(event.bos_mass)
            self._show_bos(event.bos_mass)
            self.log_line(f"eval step {event.step}: held-out ppl {event.heldout_ppl:.3f}")
            self._sync_curves()
        elif isinstance(event, HeadRecovery):
            self.recovery = {"woken": event.woken, "functional": event.functional, "targets": event.targets}
            self.refresh_panes()
        elif isinstance(event, PhaseChanged):
            self.log_line(f"{event.phase}: {event.detail}")
        elif isinstance(event, RunFailed):
            self.notify(event.message, title="surgery stopped", severity="error", timeout=10)
        elif isinstance(event, RunFinished):
            self.log_line(f"run finished at step {event.step} (best step {event.best_step})"
                          + (" - cancelled" if event.cancelled else ""))

    def _track_drift(self, bos_mass: list[list[float]]) -> None:
        """Untouched heads whose BOS mass moved past the drift threshold since the diagnosis before the run."""
        if self.report is not None:
            moved = drifted(self.report.bos_mass, bos_mass, list(self.grid.data.targets), EvalSettings().drift_threshold)
            self.drift = int(moved.sum())

    def _show_bos(self, bos_mass: list[list[float]]) -> None:
        """Recolour the grid from a BOS-mass grid (entropy from the last full diagnosis)."""
        import numpy as np

        data = self.grid.data
        bos = np.asarray(bos_mass, dtype=float)
        entropy = self.report.entropy if self.report is not None else np.full(bos.shape, 9.9)
        thresholds = self.report.thresholds if self.report is not None else Thresholds()
        data.bos = bos.tolist()
        data.classes = classify(bos, entropy, thresholds).tolist()
        self.grid.set_data(data)

    def _sync_curves(self) -> None:
        """Extend the curves from the session's recorded events: step messages may coalesce when the UI
        falls behind, the recording never drops one."""
        events = self.session.events if self.session is not None else []
        for e in events[self._consumed:]:
            if e.get("kind") == StepMetrics.kind and e.get("loss") is not None:
                self.losses.append(e["loss"])
            elif e.get("kind") == EvalMetrics.kind and e.get("heldout_ppl") is not None:
                self.ppls.append(e["heldout_ppl"])
        self._consumed = len(events)
        self._update_curves()

    def _update_curves(self) -> None:
        self.query_one("#loss-curve", Sparkline).data = list(self.losses)
        self.query_one("#ppl-curve", Sparkline).data = list(self.ppls)
        if self.losses:
            self.query_one("#loss-label", Label).update(f"loss {self.losses[-1]:.3f}")
        if self.ppls:
            self.query_one("#ppl-label", Label).update(f"ppl {self.ppls[-1]:.2f}")

    @on(SurgeryDone)
    def _surgery_done(self, message: SurgeryDone) -> None:
        report = message.report
        self.before = self.report
        self._set_report(HeadReport.from_json(report["diagnosis_after"]))
        rec = report["recovery"]
        self.recovery = {k: rec[k] for k in ("woken", "functional", "targets")}
        ppl = report["ppl"]
        self.set_status(f"surgery done: woken {rec['woken']} / functional {rec['functional']} / targets "
                        f"{rec['targets']}; held-out ppl {ppl['heldout_before']:.2f} -> {ppl['heldout_after']:.2f}")
        self.log_line(f"patch and report in {message.out_dir}; drift {report['drift']['drifted']} heads, "
                      f"iatrogenic {len(report['iatrogenic'])}")
        if self.session is not None and self.session.path is not None:
            self.session.save()
        self.refresh_panes()

    # --- panes ------------------------------------------------------------------------------------------
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
        text = Text(f"L{layer}.H{head}", style="bold")
        text.append(f"   slope {data.slopes[head]:.4g}\n")
        if (layer, head) in data.targets:
            text.append("target\n", style="bold")
        elif (layer, head) in data.frozen:
            text.append("frozen\n", style="bold")
        if self.report is None:
            text.append("not diagnosed yet (d)", style="dim")
            return text
        info = self.report.head(layer, head)
        text.append(info["class"] + "\n", style=self.grid.class_style(info["class"]))
        before = self.before.head(layer, head) if self.before is not None else None
        for key, label in (("bos_mass", "BOS mass"), ("entropy", "entropy"), ("local_mass", "local mass"),
                           ("contribution", "contribution")):
            was = f" (was {before[key]:.3f})" if before is not None else ""
            text.append(f"{label:<13}{info[key]:.3f}{was}\n")
        return text

    def _summary_text(self) -> Text:
        data = self.grid.data
        text = Text()
        counts = self.report.counts() if self.report is not None else {}
        for name in CLASS_NAMES:
            count = counts.get(name, "-")
            text.append("  ", style=self.grid.class_style(name))
            text.append(f" {name:<12}{count}\n")
        if self.report is not None:
            text.append("\nmean BOS by head\n", style="bold")
            means = self.report.column_mean_bos()
            text.append(" ".join(f"{h}:{100 * m:.0f}" for h, m in enumerate(means)) + "\n", style="dim")
        text.append(f"\ntargets  {len(data.targets)}   frozen {len(data.frozen)}\n")
        if self.recovery is not None:
            r = self.recovery
            text.append(f"woken {r['woken']} / functional {r['functional']} / targets {r['targets']}\n", style="bold")
        if self.drift is not None:
            text.append(f"drift {self.drift} untouched heads\n")
        if data.targets:
            spec = format_heads(data.targets)
            text.append(spec if len(spec) < 90 else spec[:87] + "…", style="dim")
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
        hint = f"e.g. 5-22.9-15 (layers 5-22, heads 9-15), 3.*, sick   ·   {data.n_layer} layers x {data.n_head} heads"
        self.push_screen(PromptScreen("Mark targets by head spec", "LAYER.HEAD items", hint=hint), self._apply_spec)

    def _apply_spec(self, spec: str | None) -> None:
        if not spec:
            return
        data = self.grid.data
        sick = self.report.sick() if self.report is not None else None
        try:
            heads = parse_heads(spec, data.n_layer, data.n_head, sick=sick)
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
        if any(w.is_running for w in self.workers if w.group == "surgery"):
            self.notify("a surgery is already running", severity="warning")
            return
        summary = f"{len(data.targets)} targets: {format_heads(data.targets)[:60]}   frozen: {len(data.frozen)}"
        self.push_screen(SurgeryScreen(summary, self.surgery_defaults), self._start_surgery)

    def _start_surgery(self, fields: dict | None) -> None:
        if not fields:
            return
        data = self.grid.data
        try:
            try:
                steps, lr, seq_len, seed = (int(fields["steps"]), float(fields["lr"]), int(fields["seq_len"]),
                                            int(fields["seed"]))
            except ValueError as exc:
                raise InputError(f"steps, seq len and seed must be whole numbers and lr a number ({exc})") from exc
            if not fields["corpus"]:
                raise InputError("give a corpus: a text file, directory, hub dataset id or python-stdlib/PKG")
            plan = SurgeryPlan(sorted(data.targets), sorted(data.frozen), seed=seed)
            train = TrainConfig(steps=steps, lr=lr, seq_len=seq_len, seed=seed, eval_every=max(1, steps // 10))
            job = SurgeryJob([plan], CorpusSpec(fields["corpus"]), train, EvalSettings(thresholds=self.report.thresholds))
        except HeadSurgeonError as exc:
            self.notify(str(exc), title="surgery", severity="error")
            return
        self.surgery_defaults = {**fields}
        self.session = self._session_snapshot(self.session)
        if self.session.path is None:  # autosave at every evaluation and checkpoint needs a file
            self.session.path = default_session_path(self.loaded.name)
        self.session.job = job.to_dict()
        self.session.events = []
        self.session.log("operate", targets=format_heads(plan.targets), frozen=format_heads(plan.frozen))
        self.losses, self.ppls, self.recovery, self.drift, self._consumed = [], [], None, None, 0
        self._update_curves()
        out = RUNS_DIR / f"{self.loaded.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        self.set_status("surgery starting…")
        self.query_one(ProgressBar).update(total=None, progress=0)
        self._surgery_worker(job, out)

    def _session_snapshot(self, session: Session | None) -> Session:
        """The current work as a session (model, diagnosis, marks), keeping a loaded session's history."""
        data = self.grid.data
        if session is None:
            session = Session(model={"ref": self.loaded.ref, "n_layer": data.n_layer, "n_head": data.n_head})
        session.report = self.report.to_json() if self.report is not None else None
        session.marks = {"targets": format_heads(data.targets), "frozen": format_heads(data.frozen)}
        session.diagnosis = {"prompts": self.prompts_path,
                             "thresholds": vars(self.report.thresholds) if self.report is not None else {}}
        return session

    def action_save_session(self) -> None:
        if self.loaded is None:
            self.notify("nothing to save: no model loaded", severity="warning")
            return
        self.session = self._session_snapshot(self.session)
        if self.session.job is None or "weights_hash" not in self.session.model:
            self.session.model = model_identity(self.loaded)
        path = self.session.path or default_session_path(self.loaded.name)
        try:
            self.session.save(path)
        except OSError as exc:
            self.notify(f"cannot save {path}: {exc}", severity="error")
            return
        self.notify(f"session saved to {path}", title="saved")
        self.log_line(f"session saved to {path}")

    def action_load_session(self) -> None:
        self.push_screen(PromptScreen("Load session", "path to a session .json", "sessions/",
                                      "shows the recorded grid, marks, curves and recovery without recomputing"),
                         self._load_session)

    def _load_session(self, path: str | None) -> None:
        if not path:
            return
        try:
            session = Session.load(path)
            report = HeadReport.from_json(session.report) if session.report else None
        except HeadSurgeonError as exc:
            self.notify(str(exc), title="load session", severity="error", timeout=8)
            return
        data = self.grid.data
        shape = (session.model.get("n_layer"), session.model.get("n_head"))
        if shape != (data.n_layer, data.n_head):
            self.notify(f"session is for a {shape[0]}x{shape[1]} model ({session.model.get('ref')}): open it first (m)",
                        title="load session", severity="error", timeout=8)
            return
        self.session = session
        if report is not None:
            self._set_report(report)
        sick = report.sick() if report is not None else None
        marks = {k: parse_heads(v, data.n_layer, data.n_head, sick) if v else [] for k, v in session.marks.items()}
        self.grid.set_marks(targets=set(marks.get("targets", [])), frozen=set(marks.get("frozen", [])))
        self.losses, self.ppls, self._consumed = [], [], 0
        recoveries = [e for e in session.events if e.get("kind") == HeadRecovery.kind]
        self.recovery = {k: recoveries[-1][k] for k in ("woken", "functional", "targets")} if recoveries else None
        if session.job:  # `o` re-runs the recorded job's settings on the current marks
            train, corpus = session.job.get("train", {}), session.job.get("corpus", {})
            self.surgery_defaults = {"corpus": corpus.get("source", ""), "steps": train.get("steps") or 100,
                                     "lr": train.get("lr", 5e-5), "seq_len": train.get("seq_len", 512),
                                     "seed": train.get("seed", 0)}
        points = session.eval_points()
        self.point = None
        if points:
            self._show_bos(points[-1]["bos_mass"])
        self._sync_curves()
        self.refresh_panes()
        self.set_status(f"session {path}: {session.status}, {len(points)} evaluation points")
        self.log_line(f"loaded session {path} ({len(session.actions)} actions)")

    def action_scrub(self, delta: int) -> None:
        """Step through the recorded evaluation points (grid, recovery, ppl) without recomputing."""
        points = self.session.eval_points() if self.session is not None else []
        if not points:
            self.notify("no recorded evaluation points: run surgery (o) or load a session (L)", severity="warning")
            return
        last = len(points) - 1
        self.point = min(max((last if self.point is None else self.point) + delta, 0), last)
        point = points[self.point]
        self._show_bos(point["bos_mass"])
        recoveries = {e["step"]: e for e in self.session.events if e.get("kind") == HeadRecovery.kind}
        rec = recoveries.get(point["step"])
        if rec is not None:
            self.recovery = {k: rec[k] for k in ("woken", "functional", "targets")}
        self.refresh_panes()
        self.set_status(f"evaluation point {self.point + 1}/{len(points)}: step {point['step']}, "
                        f"held-out ppl {point['heldout_ppl']:.3f}   ([ / ] to move)")

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
                  "", "ctrl+p opens the command palette."]
        return "\n".join(lines)

    def action_quit_app(self) -> None:
        running = [w for w in self.workers if w.is_running]
        if not running:
            self.exit(0)
            return

        def answer(yes: bool | None) -> None:
            if yes:
                self.workers.cancel_all()
                self.exit(0)

        self.push_screen(ConfirmScreen("Work is in progress. Cancel it and quit?"), answer)

    def get_system_commands(self, screen):
        yield from super().get_system_commands(screen)
        yield SystemCommand("Diagnose", "Run diagnosis on the current model", self.action_diagnose)
        yield SystemCommand("Open model", "Open a hub id or local directory", self.action_open_model)
        yield SystemCommand("Mark heads by spec", "Mark a band such as 5-22.9-15", self.action_mark_spec)
        yield SystemCommand("Mark all sick heads", "Target every non-healthy head", self.action_mark_sick)
        yield SystemCommand("Clear marks", "Unmark every target and frozen head", self.action_clear_marks)
        yield SystemCommand("Surgery", "Re-initialise and retrain the marked heads", self.action_surgery)
        yield SystemCommand("Save session", "Save model, diagnosis, marks and run to sessions/", self.action_save_session)
        yield SystemCommand("Load session", "Show a saved session's grid, curves and recovery", self.action_load_session)
        yield SystemCommand("Help", "List every key", self.action_help)
