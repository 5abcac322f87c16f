"""The head-surgeon workbench: head grid, detail and summary panes, diagnosis in a thread worker."""

from __future__ import annotations


from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Footer, Header, ProgressBar, RichLog, Static
from textual.worker import get_current_worker

from engine.diagnosis import diagnose
from engine.errors import HeadSurgeonError
from engine.model import load_model
from engine.prompts import load_prompts
from engine.spec import format_heads, parse_heads

from .bridge import EngineEvent, MessageSink, ModelLoaded, ReportReady, WorkFailed
from .headgrid import CLASS_NAMES, GridData, HeadGrid
from .screens import ConfirmScreen, HelpScreen, PromptScreen


class HeadSurgeonApp(App[int]):
    TITLE = "head-surgeon"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("d", "diagnose", "diagnose"),
        Binding("b", "mark_spec", "band/spec"),
        Binding("a", "mark_sick", "all sick"),
        Binding("x", "clear_marks", "clear"),
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

    # --- layout ---------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="main"):
            yield HeadGrid(id="grid")
            with Vertical(id="side"):
                yield Static("", id="detail")
                yield Static("", id="summary")
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

    @on(ReportReady)
    def _report_ready(self, message: ReportReady) -> None:
        report = self.report = message.report
        data = self.grid.data
        data.bos = report.bos_mass.tolist()
        data.classes = report.classes.tolist()
        self.grid.set_data(data)
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

    @on(EngineEvent)
    def _engine_event(self, message: EngineEvent) -> None:
        event = message.event
        if type(event).__name__ == "DiagnosisProgress":
            self.query_one(ProgressBar).update(total=event.total_prompts, progress=event.done_prompts)

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
        for key, label in (("bos_mass", "BOS mass"), ("entropy", "entropy"), ("local_mass", "local mass"),
                           ("contribution", "contribution")):
            text.append(f"{label:<14}{info[key]:.3f}\n")
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
            lines.append(f"| `{binding.key.replace(',', '`, `')}` | {binding.description or binding.action} |")
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
        yield SystemCommand("Help", "List every key", self.action_help)
