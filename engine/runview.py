"""A run's history folded from its events: curves, evaluation points, recovery, phase and outcome.

Viewers (the workbench, tests) feed it every event of a log in order, live or after the fact, and read
the same state either way. A `Resumed` event supersedes what was logged after the step it resumed from.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .events import (Checkpoint, EvalMetrics, Event, HeadRecovery, PhaseChanged, Resumed, RunFailed, RunFinished,
                     RunStarted, StepMetrics)
from .report import HeadReport

CONTROL_PREFIX = "control-"  # the sham control arm's passes: control-pass-1, ... (engine.operation names them)


@dataclass
class RunHistory:
    losses: list[tuple[str, int, float]] = field(default_factory=list)  # (pass, step, loss), every optimizer step
    points: list[EvalMetrics] = field(default_factory=list)  # the "before" point first, then each evaluation
    recoveries: dict[tuple[str, int], HeadRecovery] = field(default_factory=dict)  # (pass, step) -> recovery
    phase: str = ""
    detail: str = ""
    step: int = 0
    total_steps: int = 0
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0
    best_checkpoint: str | None = None
    outcome: str | None = None  # None while going; "finished", "cancelled" or "failed"
    message: str = ""
    pid: int | None = None
    segment_start: int | None = None  # the step before this process segment's first step (for the ETA)

    def apply(self, event: Event) -> None:
        if isinstance(event, StepMetrics):
            if self.segment_start is None:
                self.segment_start = event.step - 1
            self.losses.append((self.phase, event.step, event.loss))
            self.step, self.total_steps = event.step, event.total_steps
            self.tokens_per_s, self.elapsed_s = event.tokens_per_s, event.elapsed_s
        elif isinstance(event, EvalMetrics):
            if event.label == "before":  # a resumed run measures the same base again: keep one
                self.points = [p for p in self.points if p.label != "before"]
                self.points.insert(0, event)
            else:
                self.points.append(event)
        elif isinstance(event, HeadRecovery):
            self.recoveries[(self.phase, event.step)] = event
        elif isinstance(event, PhaseChanged):
            if event.phase != self.phase:
                self.segment_start = None
            self.phase, self.detail = event.phase, event.detail
        elif isinstance(event, Checkpoint) and event.best:
            self.best_checkpoint = event.path
        elif isinstance(event, Resumed):
            name, k = event.pass_name, event.step
            self.phase, self.step, self.segment_start = name, k, None
            self.losses = [x for x in self.losses if x[0] != name or x[1] <= k]
            self.points = [p for p in self.points if p.label != name or p.step <= k]
            self.recoveries = {key: r for key, r in self.recoveries.items() if key[0] != name or key[1] <= k}
        elif isinstance(event, RunStarted):
            self.pid, self.outcome, self.message, self.segment_start = event.pid, None, "", None
        elif isinstance(event, RunFinished):
            self.outcome = "cancelled" if event.cancelled else "finished"
        elif isinstance(event, RunFailed):
            self.outcome, self.message = "failed", event.message

    def recovery_at(self, point: EvalMetrics) -> HeadRecovery | None:
        return self.recoveries.get((point.label, point.step))

    def latest_recovery(self, skip_prefix: str | None = None) -> HeadRecovery | None:
        """The newest recovery, leaving out passes whose name starts with `skip_prefix` (a control arm)."""
        keep = [r for (phase, _), r in self.recoveries.items() if not (skip_prefix and phase.startswith(skip_prefix))]
        return keep[-1] if keep else None

    @property
    def loss_values(self) -> list[float]:
        return [v for _, _, v in self.losses if v is not None]

    @property
    def heldout_ppls(self) -> list[float]:
        return [p.heldout_ppl for p in self.points if p.heldout_ppl is not None]

    def eta_s(self) -> float | None:
        """Seconds left in the current pass at this process segment's step rate."""
        done = self.step - (self.segment_start or 0)
        if self.segment_start is None or done <= 0 or not self.total_steps or not self.elapsed_s:
            return None
        return self.elapsed_s / done * (self.total_steps - self.step)


def point_report(point: EvalMetrics, like: HeadReport) -> HeadReport:
    """The head statistics of an evaluation point as a report (shape, slopes and thresholds from `like`;
    grids a point did not record, as in old sessions, are taken from `like` too)."""
    import numpy as np

    def grid(name: str) -> np.ndarray:
        values = getattr(point, name)
        return np.asarray(values, dtype=float) if values else getattr(like, name)

    return HeadReport(model=like.model, n_layer=like.n_layer, n_head=like.n_head, slopes=like.slopes,
                      bos_mass=grid("bos_mass"), entropy=grid("entropy"), local_mass=grid("local_mass"),
                      contribution=grid("contribution"), thresholds=like.thresholds)
