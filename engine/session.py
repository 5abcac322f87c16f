"""Sessions: one JSON file that records a whole piece of work so it can be studied, resumed or replayed.

A session holds the base model's identity, diagnosis settings, the surgery job (plans, training, corpus,
evaluation), an ordered action log, the recorded event stream (metrics over time, per-head statistics) and
the run directory (patch, report, checkpoints) as a path relative to the session file. Saving is atomic;
a `SessionRecorder` sink autosaves at every evaluation and checkpoint. Loading never modifies the file.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import InputError
from .events import Checkpoint, EvalMetrics, Event, HeadRecovery, RunFailed, RunFinished, json_safe

SESSION_SCHEMA_VERSION = 1
SESSION_FORMAT = "head-surgeon-session"
DEFAULT_DIR = Path("sessions")
AUTOSAVE_EVENTS = (EvalMetrics, HeadRecovery, Checkpoint, RunFinished, RunFailed)


@dataclass
class Session:
    """A saved piece of work; `path` is where it lives (not stored in the file)."""

    model: dict[str, Any]
    diagnosis: dict[str, Any] = field(default_factory=dict)  # settings: batch_size, max_len, thresholds
    job: dict[str, Any] | None = None  # SurgeryJob.to_dict()
    actions: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] | None = None  # the latest diagnosis (HeadReport.to_json)
    marks: dict[str, str] = field(default_factory=lambda: {"targets": "", "frozen": ""})
    run_dir: str | None = None  # relative to the session file's folder
    status: str = "new"  # new | running | finished | cancelled | failed
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    path: Path | None = None

    def log(self, action: str, **details: Any) -> None:
        self.actions.append({"action": action, "time": round(time.time(), 3), **details})

    def run_path(self) -> Path | None:
        if self.run_dir is None:
            return None
        base = self.path.parent if self.path else Path.cwd()
        return (base / self.run_dir).resolve()

    def set_run_dir(self, run_dir: str | Path) -> None:
        base = (self.path.parent if self.path else Path.cwd()).resolve()
        self.run_dir = os.path.relpath(Path(run_dir).resolve(), base)

    def eval_points(self) -> list[dict[str, Any]]:
        """Recorded evaluation points, in order (what the workbench scrubs through)."""
        return [e for e in self.events if e.get("kind") == EvalMetrics.kind]

    def to_json(self) -> dict[str, Any]:
        return {"format": SESSION_FORMAT, "schema_version": SESSION_SCHEMA_VERSION, "model": self.model,
                "diagnosis": self.diagnosis, "job": self.job, "marks": self.marks, "actions": self.actions,
                "events": self.events, "report": self.report, "run_dir": self.run_dir, "status": self.status,
                "created": self.created, "updated": self.updated}

    def save(self, path: str | Path | None = None) -> Path:
        """Write atomically (temp file + rename); a crash leaves the previous version intact."""
        if path is not None:
            old_run = self.run_path()
            self.path = Path(path)
            if old_run is not None:
                self.set_run_dir(old_run)
        if self.path is None:
            raise InputError("the session has no file yet: give a path to save it to")
        self.updated = time.time()
        atomic_write_text(self.path, json.dumps(self.to_json(), indent=1, allow_nan=False, default=_jsonable))
        return self.path

    @classmethod
    def load(cls, path: str | Path) -> "Session":
        path = Path(path)
        if not path.is_file():
            raise InputError(f"session {str(path)!r} does not exist: pass a file saved by head-surgeon")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"session {str(path)!r} is truncated or corrupt ({exc}); the file was left as it is") from exc
        if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
            raise InputError(f"{str(path)!r} is not a head-surgeon session file")
        version = data.get("schema_version")
        if version != SESSION_SCHEMA_VERSION:
            raise InputError(f"session {str(path)!r} has schema_version {version!r}; this head-surgeon reads "
                             f"{SESSION_SCHEMA_VERSION}: open it with a matching version")
        try:
            session = cls(model=dict(data["model"]), diagnosis=dict(data.get("diagnosis") or {}), job=data.get("job"),
                          actions=list(data.get("actions") or []), events=list(data.get("events") or []),
                          report=data.get("report"), marks=dict(data.get("marks") or {"targets": "", "frozen": ""}),
                          run_dir=data.get("run_dir"), status=str(data.get("status", "new")),
                          created=float(data.get("created", 0)), updated=float(data.get("updated", 0)), path=path)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"session {str(path)!r} is missing or has a malformed field ({exc})") from exc
        return session


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


class SessionRecorder:
    """A sink that appends every event to the session and autosaves at evaluations and checkpoints."""

    def __init__(self, session: Session, autosave: bool = True):
        self.session, self.autosave = session, autosave

    def emit(self, event: Event) -> None:
        self.session.events.append(json_safe(event.to_dict()))
        if isinstance(event, RunFinished):
            self.session.status = "cancelled" if event.cancelled else "finished"
        elif isinstance(event, RunFailed):
            self.session.status = "failed"
        if self.autosave and self.session.path is not None and isinstance(event, AUTOSAVE_EVENTS):
            self.session.save()


def default_session_path(name: str) -> Path:
    """sessions/NAME.json in the working directory, numbered if it exists."""
    DEFAULT_DIR.mkdir(exist_ok=True)
    path = DEFAULT_DIR / f"{name}.json"
    n = 2
    while path.exists():
        path = DEFAULT_DIR / f"{name}-{n}.json"
        n += 1
    return path
