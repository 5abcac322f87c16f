"""Engine events and the sink protocol: the engine reports only through `sink.emit(event)`.

Every event is a dataclass with a `kind` tag and converts to a JSON-safe dict, so the TUI, the CLI's
progress printer and the session recorder all listen to the same stream.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Protocol


class Sink(Protocol):
    def emit(self, event: "Event") -> None: ...


class NullSink:
    def emit(self, event: "Event") -> None:
        pass


class ListSink:
    """Keeps every event (tests, session recording)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: "Event") -> None:
        self.events.append(event)

    def of(self, cls: type) -> list:
        return [e for e in self.events if isinstance(e, cls)]


class MultiSink:
    """Fans one event out to several sinks."""

    def __init__(self, *sinks: Sink) -> None:
        self.sinks = [s for s in sinks if s is not None]

    def emit(self, event: "Event") -> None:
        for sink in self.sinks:
            sink.emit(event)


@dataclass
class Event:
    kind = "event"

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **dataclasses.asdict(self)}


@dataclass
class DiagnosisProgress(Event):
    kind = "diagnosis_progress"
    done_prompts: int
    total_prompts: int
    tokens: int


@dataclass
class PhaseChanged(Event):
    kind = "phase"
    phase: str  # e.g. "diagnose", "pass-1", "evaluate", "done"
    detail: str = ""


@dataclass
class StepMetrics(Event):
    kind = "step"
    step: int
    total_steps: int
    loss: float
    lr: float
    grad_norm: float
    tokens_per_s: float
    elapsed_s: float
    epoch: int = 0


@dataclass
class EvalMetrics(Event):
    kind = "eval"
    step: int
    train_loss: float
    train_ppl: float
    heldout_ppl: float
    # per target head "L.H" -> {"bos_mass", "entropy", "local_mass", "contribution"}
    targets: dict[str, dict[str, float]] = field(default_factory=dict)
    # full grids (n_layer x n_head) of every head's statistics: the grid, detail pane and class counts at this point
    bos_mass: list[list[float]] = field(default_factory=list)
    contribution: list[list[float]] = field(default_factory=list)
    entropy: list[list[float]] = field(default_factory=list)
    local_mass: list[list[float]] = field(default_factory=list)
    label: str = ""  # "before": the model before the operation; else the pass, e.g. "pass-1"
    tracked_ppl: float | None = None  # perplexity of the tracked in-domain set (engine.tracked), when the job has one


@dataclass
class HeadRecovery(Event):
    kind = "recovery"
    step: int
    woken: int
    functional: int
    targets: int
    per_head: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class Checkpoint(Event):
    kind = "checkpoint"
    step: int
    path: str
    heldout_ppl: float
    best: bool


@dataclass
class Notice(Event):
    """Something the user should know before results come in (a warning, never a refusal)."""

    kind = "notice"
    message: str
    level: str = "warning"


@dataclass
class RunStarted(Event):
    """A runner took the run (fresh or resumed); `pid` is its process."""

    kind = "started"
    pid: int
    resume: bool = False


@dataclass
class Resumed(Event):
    """A pass continued from its saved state: events after `step` that were logged before are superseded."""

    kind = "resumed"
    pass_name: str
    step: int


@dataclass
class RunFinished(Event):
    kind = "finished"
    step: int
    best_step: int
    best_heldout_ppl: float
    cancelled: bool = False


@dataclass
class RunFailed(Event):
    kind = "failed"
    step: int
    message: str
    last_good_checkpoint: str | None = None


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (DiagnosisProgress, PhaseChanged, StepMetrics, EvalMetrics, HeadRecovery, Checkpoint, Notice, RunStarted,
                Resumed, RunFinished, RunFailed)
}


def json_safe(value):
    """NaN/inf floats become None (recursively) so files are strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def event_from_dict(data: dict[str, Any]) -> Event:
    """Rebuild an event recorded with `to_dict` (sessions replay their event stream through this)."""
    data = dict(data)
    cls = EVENT_TYPES.get(data.pop("kind", None))
    if cls is None:
        raise ValueError(f"unknown event kind in {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})
