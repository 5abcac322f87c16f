"""Publication figures (PNG and SVG) of a diagnosis or a finished surgery run, drawn with matplotlib.

    write_figures("runs/r1", "figs/r1")     # a run directory, its report.json, or a diagnosis JSON

matplotlib is an optional extra (`pip install 'head-surgeon[figures]'`), imported only here and only when
figures are drawn. A run gives every figure; a diagnosis only those that need one diagnosis.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomic import atomic_write_bytes
from .errors import InputError
from .preflight import check_output_dir, os_error_message
from .report import SICK, HeadReport
from .runner import RUN_FILE

REPORT_FILE = "report.json"  # what engine.operation.run_job writes (not imported: that module loads torch)
MISSING = "figures need matplotlib: pip install 'head-surgeon[figures]'"
DPI = 150
SURGERY_STYLE = {"color": "C0"}
CONTROL_STYLE = {"color": "0.45", "linestyle": "--", "alpha": 0.8}


@dataclass
class FigureInputs:
    """What the figures draw: one diagnosis, or a run's before/after, history, drift and control arm."""

    model: str
    before: HeadReport
    after: HeadReport | None = None
    history: list[dict[str, Any]] | None = None
    ppl: dict[str, Any] | None = None
    drift: dict[str, Any] | None = None
    control: dict[str, Any] | None = None


# --- input -------------------------------------------------------------------------------------
def load_inputs(source: str | Path) -> FigureInputs:
    """Read a run directory, an operation report or a diagnosis JSON; refuse anything else in one line."""
    path = _report_path(Path(source).expanduser())
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not JSON ({exc}): pass a run directory, its report.json or a diagnosis "
                         "JSON") from exc
    if not isinstance(data, dict):
        raise InputError(f"{path} holds no report: pass a run directory, its report.json or a diagnosis JSON")
    if "diagnosis_before" in data:
        return _run_inputs(data, path)
    if "bos_mass" in data:
        report = HeadReport.from_json(data)
        return FigureInputs(_model_name(report.model), report)
    raise InputError(f"{path} is neither a surgery report nor a diagnosis: pass a run directory, its report.json "
                     "or the JSON of head-surgeon diagnose --json")


def _report_path(path: Path) -> Path:
    if not path.is_dir():
        if not path.exists():
            raise InputError(f"{path} does not exist: pass a run directory, its report.json or a diagnosis JSON")
        return path
    if (path / REPORT_FILE).is_file():
        return path / REPORT_FILE
    if (path / RUN_FILE).is_file():
        raise InputError(f"run {path} has no {REPORT_FILE} yet (still running, cancelled or failed): "
                         "figures need a finished run")
    raise InputError(f"{path} is not a run directory (no {REPORT_FILE}): pass one that `head-surgeon runs` lists")


def _run_inputs(data: dict[str, Any], path: Path) -> FigureInputs:
    try:
        before = HeadReport.from_json(data["diagnosis_before"])
        after = HeadReport.from_json(data["diagnosis_after"])
        history, drift, control = _checked_history(data["history"]), dict(data["drift"]), data.get("control")
        _check_columns(drift["per_column"], before.n_head)
        if control is not None:
            _checked_history(control.get("history") or [])
            _check_columns((control.get("drift") or {}).get("per_column", [0] * before.n_head), before.n_head)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise InputError(f"{path} is missing or has malformed field {exc}: not a finished surgery report") from exc
    if (after.n_layer, after.n_head) != (before.n_layer, before.n_head):
        raise InputError(f"{path}: the diagnoses before and after have different shapes")
    model = (data.get("base_model") or {}).get("ref") or before.model
    return FigureInputs(_model_name(model), before, after, history, data.get("ppl") or {}, drift, control)


def _checked_history(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluation points, each with an integer step."""
    for point in history:
        int(point["step"])
    return list(history)


def _check_columns(per_column: list[int], n_head: int) -> None:
    if len(per_column) != n_head:
        raise ValueError(f"'drift.per_column' ({len(per_column)} columns, not {n_head})")


def _model_name(ref: str) -> str:
    """A local model's directory name, or the hub id as given."""
    return Path(ref).name if Path(ref).is_absolute() else ref


# --- labels --------------------------------------------------------------------------------------
def head_labels(report: HeadReport) -> list[str]:
    """'H9\\n0.0039': head index over its ALiBi slope (every k-th head on wide models, the rest blank)."""
    k = math.ceil(report.n_head / 32)
    return [f"H{h}\n{s:.2g}" if h % k == 0 else "" for h, s in enumerate(report.slopes)]


def layer_labels(report: HeadReport) -> list[str]:
    k = math.ceil(report.n_layer / 32)
    return [f"L{l}" if l % k == 0 else "" for l in range(report.n_layer)]


def _head_axis(ax, report: HeadReport) -> None:
    ax.set_xticks(range(report.n_head), head_labels(report), fontsize=7)
    ax.set_xlabel("head (index, ALiBi slope)")


def _panel_size(report: HeadReport) -> tuple[float, float]:
    """Width and height in inches of one layer x head panel, growing with the model up to a page."""
    return min(max(0.5 * report.n_head + 2.5, 6.0), 24.0), min(max(0.3 * report.n_layer + 1.5, 2.5), 12.0)


# --- figures -------------------------------------------------------------------------------------
def bos_grid_figure(Figure, inputs: FigureInputs):
    """Layer x head BOS mass: before, after and after - before for a run; the one grid for a diagnosis."""
    panels = [("BOS mass" + (" before surgery" if inputs.after else ""), inputs.before.bos_mass, "viridis", 0.0, 1.0)]
    if inputs.after is not None:
        delta = inputs.after.bos_mass - inputs.before.bos_mass
        lim = max(float(np.abs(delta).max()), 0.05)
        panels += [("BOS mass after surgery", inputs.after.bos_mass, "viridis", 0.0, 1.0),
                   ("difference (after - before)", delta, "RdBu_r", -lim, lim)]
    width, height = _panel_size(inputs.before)
    fig = Figure(figsize=(width, height * len(panels)), layout="constrained")
    for ax, (title, grid, cmap, vmin, vmax) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
        image = ax.imshow(grid, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="Δ BOS mass" if vmin < 0 else "BOS mass")
        ax.set_yticks(range(inputs.before.n_layer), layer_labels(inputs.before), fontsize=7)
        ax.set_ylabel("layer")
        _head_axis(ax, inputs.before)
        ax.set_title(title)
    fig.suptitle(f"{inputs.model}: attention on the first token, {inputs.before.n_layer} layers x "
                 f"{inputs.before.n_head} heads")
    return fig


def bos_histogram_figure(Figure, inputs: FigureInputs):
    """How many heads put how much attention on the first token, with the sink and dead thresholds."""
    fig = Figure(figsize=(6.5, 4.0), layout="constrained")
    ax = fig.subplots()
    bins = np.linspace(0.0, 1.0, 21)
    for (label, report), colour in zip(_diagnoses(inputs), ("C1", "C0")):
        ax.hist(report.bos_mass.ravel(), bins=bins, histtype="step" if inputs.after else "bar", linewidth=1.5,
                color=colour, label=label)
    t = inputs.before.thresholds
    for value, name in ((t.sink, "sink"), (t.dead, "dead")):
        ax.axvline(value, color="0.3", linestyle=":", linewidth=1)
        ax.annotate(f"{name} > {value:g}", (value, 1), xycoords=("data", "axes fraction"), rotation=90,
                    ha="right", va="top", fontsize=8, color="0.3")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("BOS mass (mean attention on the first token)")
    ax.locator_params(axis="y", integer=True)
    ax.set_ylabel(f"heads (of {inputs.before.n_layer} x {inputs.before.n_head})")
    ax.set_title(f"{inputs.model}: BOS mass of every head")
    if inputs.after is not None:
        ax.legend()
    return fig


def sick_per_head_figure(Figure, inputs: FigureInputs):
    """Per head index: in how many layers that head is sick (BOS-sink or dead), with the band's cut-off."""
    report = inputs.before
    fig = Figure(figsize=(_panel_size(report)[0], 4.0), layout="constrained")
    ax = fig.subplots()
    _grouped_bars(ax, [(label or "sick", np.isin(r.classes, SICK).sum(axis=0), colour)
                       for (label, r), colour in zip(_diagnoses(inputs), ("C3", "C0"))])
    ax.axhline(report.thresholds.band_share * report.n_layer, color="0.3", linestyle=":", linewidth=1,
               label=f"band: sick in > {report.thresholds.band_share:.0%} of layers")
    _count_axes(ax, report, f"layers where sick (of {report.n_layer})")
    fig.suptitle(f"{inputs.model}: sick heads (BOS-sink or dead) per head index")
    return fig


def perplexity_figure(Figure, inputs: FigureInputs):
    """Held-out and training perplexity over the steps of the surgery (and of the control arm, dashed); a
    third panel for the tracked in-domain set (the paper's training PPL) when the run measured one."""
    arms = [("surgery", inputs.history or [], SURGERY_STYLE)]
    if inputs.control is not None:
        arms.append(("control", inputs.control.get("history") or [], CONTROL_STYLE))
    panels = [("heldout_ppl", "held-out", "heldout_before"), ("train_ppl", "training", None)]
    if any(p.get("tracked_ppl") is not None for p in inputs.history or []):
        panels.append(("tracked_ppl", "tracked in-domain set", "tracked_before"))
    fig = Figure(figsize=(5.5 * len(panels), 4.0), layout="constrained")
    for ax, (key, title, before) in zip(fig.subplots(1, len(panels)), panels):
        for label, history, style in arms:
            steps, values = ppl_series(history, key)
            ax.plot(steps, values, marker="o", markersize=3, label=label, zorder=3 if label == "surgery" else 2,
                    **style)
        if before and (inputs.ppl or {}).get(before) is not None:
            ax.axhline(inputs.ppl[before], color="0.3", linestyle=":", linewidth=1, label="before surgery")
        ax.set_xlabel("training step")
        ax.set_ylabel(f"{title} perplexity")
        ax.set_title(f"{title} perplexity")
        ax.legend(fontsize=8)
    fig.suptitle(f"{inputs.model}: perplexity during surgery")
    return fig


def drift_per_column_figure(Figure, inputs: FigureInputs):
    """Per head column: how many untouched heads moved their BOS mass by more than the drift threshold."""
    report, drift = inputs.before, inputs.drift
    fig = Figure(figsize=(_panel_size(report)[0], 4.0), layout="constrained")
    ax = fig.subplots()
    arms = [("surgery", drift["per_column"], "C0")]
    control_drift = (inputs.control or {}).get("drift") or {}
    if control_drift.get("per_column") is not None:
        arms.append(("control", control_drift["per_column"], "0.6"))
    _grouped_bars(ax, arms)
    _count_axes(ax, report, f"drifted untouched heads (of {report.n_layer} layers)")
    fig.suptitle(f"{inputs.model}: drift of untouched heads per head column\n|Δ BOS mass| > "
                 f"{drift.get('threshold', 0.05):g}: {drift.get('drifted', 0)} of {drift.get('untouched_heads', 0)} "
                 "untouched heads")
    return fig


def _diagnoses(inputs: FigureInputs) -> list[tuple[str | None, HeadReport]]:
    """(label, diagnosis): before and after surgery for a run, the one unlabelled diagnosis otherwise."""
    if inputs.after is None:
        return [(None, inputs.before)]
    return [("before surgery", inputs.before), ("after surgery", inputs.after)]


def _grouped_bars(ax, arms: list[tuple[str, Any, str]]) -> None:
    """One bar per head index for each (label, counts, colour) arm, side by side."""
    width = 0.8 / len(arms)
    for i, (label, counts, colour) in enumerate(arms):
        ax.bar(np.arange(len(counts)) + (i - (len(arms) - 1) / 2) * width, counts, width, color=colour, label=label)


def _count_axes(ax, report: HeadReport, ylabel: str) -> None:
    """Head labels below, whole layer counts up the side, the legend outside on the right."""
    _head_axis(ax, report)
    ax.set_xlim(-0.6, report.n_head - 0.4)
    ax.set_ylim(0, report.n_layer)
    ax.locator_params(axis="y", integer=True)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def ppl_series(history: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """Steps and finite values of `key`; a later pass's steps (which restart) continue after the last one."""
    steps, values, offset, last = [], [], 0, None
    for point in history:
        step = int(point["step"]) + offset
        if last is not None and step <= last:  # the next pass starts again from step 0
            offset = last
            step = int(point["step"]) + offset
        last = step
        value = point.get(key)
        if value is not None and math.isfinite(value):
            steps.append(step)
            values.append(float(value))
    return steps, values


# --- drawing and writing -------------------------------------------------------------------------
# file stem -> function(Figure class, inputs) drawing it; a diagnosis alone gives the first three
RUN_FIGURES = {"bos_grid": bos_grid_figure, "bos_histogram": bos_histogram_figure,
               "sick_per_head": sick_per_head_figure, "perplexity": perplexity_figure,
               "drift_per_column": drift_per_column_figure}
DIAGNOSIS_FIGURES = ("bos_grid", "bos_histogram", "sick_per_head")


def _matplotlib():
    """matplotlib, its Agg canvas and Figure class (no pyplot, no global backend), or a one-line error naming
    the extra."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise InputError(MISSING) from exc
    return matplotlib, FigureCanvasAgg, Figure


def build_figures(inputs: FigureInputs) -> dict[str, Any]:
    """Every figure the inputs allow, by file stem (matplotlib Figure objects, not yet saved)."""
    _, canvas, Figure = _matplotlib()
    names = RUN_FIGURES if inputs.after is not None else DIAGNOSIS_FIGURES
    figures = {name: RUN_FIGURES[name](Figure, inputs) for name in names}
    for fig in figures.values():
        canvas(fig)
    return figures


def render(figures: dict[str, Any]) -> dict[str, bytes]:
    """Each figure as PNG and SVG bytes by file name (SVG text stays text, editable in a vector editor)."""
    matplotlib = _matplotlib()[0]
    out = {}
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        for name, fig in figures.items():
            for fmt in ("png", "svg"):
                buffer = io.BytesIO()
                fig.savefig(buffer, format=fmt, dpi=DPI)
                out[f"{name}.{fmt}"] = buffer.getvalue()
    return out


def write_figures(source: str | Path, out_dir: str | Path) -> list[Path]:
    """Draw the figures of `source` (run directory, report.json or diagnosis JSON) into the new `out_dir`."""
    out = check_output_dir(out_dir, what="--out")
    files = render(build_figures(load_inputs(source)))
    try:
        out.mkdir(parents=True)
    except OSError as exc:
        raise InputError(os_error_message(exc, out)) from exc
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
    return [out / name for name in files]
