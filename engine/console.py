"""Rich rendering of reports for the CLI (the TUI has its own views)."""

from __future__ import annotations

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from .report import BOS_SINK, CLASSES, DEAD, HEALTHY, LOW_ENTROPY, POSITIONAL, HeadReport

CLASS_STYLE = {HEALTHY: "green", BOS_SINK: "yellow", DEAD: "bold red", LOW_ENTROPY: "magenta", POSITIONAL: "cyan"}
GRID_MAX_HEADS = 32


def grid_table(report: HeadReport) -> Table:
    """Layers x heads, BOS mass per cell, coloured by class."""
    table = Table(title="BOS mass per head (colour = class)", box=None, pad_edge=False, padding=(0, 0))
    table.add_column("", style="dim", justify="right")
    for h in range(report.n_head):
        table.add_column(f"H{h}", justify="right", min_width=4)
    classes = report.classes
    for layer in range(report.n_layer):
        cells = [Text(f"{report.bos_mass[layer, h]:.2f}".lstrip("0") or "0", style=CLASS_STYLE[classes[layer, h]]) for h in range(report.n_head)]
        table.add_row(f"L{layer} ", *[Text(" ") + c for c in cells])
    return table


def column_table(report: HeadReport) -> Table:
    """Per head-index column: ALiBi slope, mean BOS mass and class counts across layers."""
    table = Table(title="Per head index (column)", box=None)
    for name in ("head", "slope", "mean BOS", *CLASSES):
        table.add_column(name, justify="right")
    cols = report.column_counts()
    means = report.column_mean_bos()
    for h in range(report.n_head):
        table.add_row(
            f"H{h}", f"{report.slopes[h]:.4g}", f"{means[h]:.3f}",
            *[Text(str(cols[c][h]), style=CLASS_STYLE[c] if cols[c][h] else "dim") for c in CLASSES],
        )
    return table


def histogram(report: HeadReport, width: int = 40) -> Table:
    counts, edges = report.bos_histogram()
    table = Table(title="BOS-mass histogram (all heads)", box=None)
    table.add_column("bin")
    table.add_column("heads", justify="right")
    table.add_column("")
    top = max(max(counts), 1)
    for c, lo, hi in zip(counts, edges, edges[1:]):
        table.add_row(f"{lo:.1f}-{hi:.1f}", str(c), "█" * round(width * c / top))
    return table


def summary(report: HeadReport) -> Text:
    counts = report.counts()
    total = report.n_layer * report.n_head
    text = Text(f"{report.model}\n{report.n_layer} layers x {report.n_head} heads, {report.n_prompts} prompts, "
                f"{report.n_tokens} query tokens\n")
    for name in CLASSES:
        text.append(f"{name}: {counts[name]} ({100 * counts[name] / total:.1f}%)  ", style=CLASS_STYLE[name])
    paper = report.paper_counts()
    text.append("\nthe paper's four classes: " + ", ".join(f"{k} {v}" for k, v in paper.items()), style="dim")
    _, rate = report.sink_rate()
    band = report.band()
    t = report.thresholds
    text.append(f"\nsink rate (Gu et al., first-token mass > {t.sink_rate_epsilon}): {100 * rate:.1f}%; band (sick in "
                f"> {100 * t.band_share:.0f}% of layers): {'H' + ',H'.join(map(str, band)) if band else 'none'}")
    text.append(f"\nthresholds: sink > {t.sink}, dead > {t.dead}, low-entropy < {t.low_entropy} nats, positional "
                f"when local mass >= {t.positional_local}", style="dim")
    m = report.measurement
    if m.get("path"):
        spread = f", {m['world_size']} processes" if m.get("world_size", 1) > 1 else ""
        text.append(f"\nmeasured by the {m['path']} path ({m.get('dtype')} on {m.get('device')}{spread})", style="dim")
    return text


def print_report(report: HeadReport, console: Console | None = None) -> None:
    console = console or Console()
    parts = [summary(report)]
    if report.n_head <= GRID_MAX_HEADS:
        parts.append(grid_table(report))
    else:
        parts.append(Text(f"(grid of {report.n_layer} x {report.n_head} heads omitted: open it in the workbench or use --json)", style="dim"))
    parts += [column_table(report), histogram(report)]
    console.print(Group(*parts))


class ConsoleSink:
    """Prints engine events for headless runs: a progress bar for steps, a line per phase/eval/checkpoint."""

    def __init__(self, console: Console | None = None, every: int = 1):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console or Console()
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"), console=self.console, transient=False,
        )
        self.task = None

    def __enter__(self) -> "ConsoleSink":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def emit(self, event) -> None:
        from . import events as ev

        if isinstance(event, ev.StepMetrics):
            info = f"loss {event.loss:.4f}  lr {event.lr:.2e}  {event.tokens_per_s:,.0f} tok/s"
            if self.task is None:
                self.task = self.progress.add_task("steps", total=event.total_steps, info=info)
            self.progress.update(self.task, completed=event.step, total=event.total_steps, info=info)
        elif isinstance(event, ev.PhaseChanged):
            self.progress.console.print(f"[cyan]{event.phase}[/] {event.detail}")
        elif isinstance(event, ev.EvalMetrics):
            tracked = f", tracked ppl {event.tracked_ppl:.2f}" if event.tracked_ppl is not None else ""
            self.progress.console.print(
                f"[green]eval[/] step {event.step}: train loss {event.train_loss:.4f} (ppl {event.train_ppl:.2f}), "
                f"held-out ppl {event.heldout_ppl:.2f}{tracked}"
            )
        elif isinstance(event, ev.HeadRecovery):
            self.progress.console.print(
                f"[green]recovery[/] step {event.step}: woken {event.woken} / functional {event.functional} / targets {event.targets}"
            )
        elif isinstance(event, ev.Checkpoint):
            self.progress.console.print(f"[dim]checkpoint step {event.step}{' (best)' if event.best else ''}: {event.path}[/]")
        elif isinstance(event, ev.Notice):
            self.progress.console.print(f"[bold yellow]{event.level}:[/] {event.message}")
        elif isinstance(event, ev.RunFailed):
            self.progress.console.print(f"[bold red]run failed[/] at step {event.step}: {event.message}")


def print_operation(report: dict, console: Console | None = None) -> None:
    """Recovery table and before/after summary of a finished surgery job."""
    console = console or Console()
    rec = report["recovery"]
    table = Table(title=f"Recovery: woken {rec['woken']} / functional {rec['functional']} / targets {rec['targets']}")
    for name in ("head", "BOS before", "BOS after", "contribution", "Δloss before", "Δloss after", "woken",
                 "functional"):
        table.add_column(name, justify="right")
    fmt = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    delta = lambda v: "—" if v is None else f"{v:+.4f}"  # noqa: E731
    yes = lambda v: Text("yes", style="green") if v else Text("no", style="red")  # noqa: E731
    for name, e in rec["per_head"].items():
        functional = yes(e["functional"])
        if e.get("lost_function"):
            functional = Text("lost", style="bold red")
        table.add_row(name, fmt(e.get("bos_mass_before")), fmt(e["bos_mass"]), fmt(e["contribution"]),
                      delta(e.get("ablation_delta_before")), delta(e["ablation_delta"]), yes(e["woken"]), functional)
    ppl, d = report["ppl"], report["drift"]
    text = Text()
    if "rule" in rec:
        text.append(f"functional: {rec['rule']} (threshold {rec['threshold']:+.4f} nats); worked before: "
                    f"{rec['functional_before']}; lost function: {', '.join(rec['lost_function']) or 'none'}\n")
    text.append(f"held-out ppl {ppl['heldout_before']:.3f} -> {ppl['heldout_after']:.3f}; "
                f"prompt ppl {ppl['prompts_before']:.3f} -> {ppl['prompts_after']:.3f}")
    if ppl.get("tracked_before") is not None:
        text.append(f"; tracked ppl {ppl['tracked_before']:.3f} -> {ppl['tracked_after']:.3f} ({report['tracked_set']})")
    text.append("\n")
    recipe = report.get("recipe", {"name": "default"})
    kept = [f"pass {i} step {p['best_step']}" + (" (stopped early)" if p.get("stopped_early") else "")
            for i, p in enumerate(report["passes"], start=1)]
    selected = report["passes"][0].get("selected_on", "heldout") if report["passes"] else "heldout"
    text.append(f"recipe {recipe['name']}; kept (lowest {selected} ppl): {', '.join(kept)}\n")
    for name, counts in report.get("class_counts", {}).items():
        if counts:
            text.append(f"classes {name}: " + ", ".join(f"{k} {v}" for k, v in counts["paper"].items()) + "\n")
    text.append(f"drift (|Δ BOS| > {d['threshold']}): {d['drifted']} of {d['untouched_heads']} untouched heads "
                f"({len(d['outside_target_columns'])} outside target columns, {len(d['frozen_in_target_columns'])} frozen); "
                f"iatrogenic: {len(report['iatrogenic'])}")
    if "verdict" in report and "failed" in report["control"]:
        text.append(f"\n{report['verdict']['text']}", style="bold red")
    elif "verdict" in report:
        c = report["control"]["recovery"]
        text.append(f"\nsham control: woken {c['woken']} / functional {c['functional']} / targets {c['targets']}; "
                    f"{report['verdict']['text']}", style="bold")
    console.print(Group(table, text))
