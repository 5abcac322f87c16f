"""Sessions: one small JSON file that records a piece of work so it can be studied, resumed or replayed.

A session holds the base model's identity, the diagnosis settings, the surgery job, the marks, an ordered
action log, the diagnosis before the run, where it came from, and the run directory (as a path relative
to the session file). It refers to the run's event log (`RUN_DIR/events.jsonl`) instead of embedding the
stream, so saving one costs the same after 10 steps as after 10,000. Saving is atomic; loading never
modifies the file. Schema 1 files (events embedded) still load, read-only, with their events.
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
from .events import EvalMetrics, Event, event_from_dict
from .eventlog import LOG_FILE, read_events

SESSION_SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)
SESSION_FORMAT = "head-surgeon-session"
SESSION_FILE = "session.json"


@dataclass
class Session:
    """A saved piece of work; `path` is where it lives (not stored in the file)."""

    model: dict[str, Any]
    diagnosis: dict[str, Any] = field(default_factory=dict)  # DiagnosisSettings.to_dict()
    job: dict[str, Any] | None = None  # SurgeryJob.to_dict()
    actions: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] | None = None  # the diagnosis before the run (HeadReport.to_json)
    marks: dict[str, str] = field(default_factory=lambda: {"targets": "", "frozen": ""})
    run_dir: str | None = None  # relative to the session file's folder
    status: str = "new"  # new | running | finished | cancelled | failed (a dead runner reads as interrupted)
    derived_from: str | None = None  # the session this one was started from (replay, a loaded session)
    world: dict[str, Any] | None = None  # how its run is spread: world_size and backend (engine.distributed)
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    path: Path | None = None
    legacy_events: list[dict[str, Any]] | None = None  # schema 1 only: the stream it embedded

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

    def events(self) -> list[Event]:
        """The run's events, read from its log (or, for a schema 1 file, the stream it embedded)."""
        if self.legacy_events is not None:
            return [event_from_dict(e) for e in self.legacy_events]
        run = self.run_path()
        return read_events(run / LOG_FILE) if run is not None and (run / LOG_FILE).is_file() else []

    def eval_points(self) -> list[EvalMetrics]:
        """Recorded evaluation points, in order (what the workbench scrubs through)."""
        return [e for e in self.events() if isinstance(e, EvalMetrics)]

    def to_json(self) -> dict[str, Any]:
        return {"format": SESSION_FORMAT, "schema_version": SESSION_SCHEMA_VERSION, "model": self.model,
                "diagnosis": self.diagnosis, "job": self.job, "marks": self.marks, "actions": self.actions,
                "report": self.report, "run_dir": self.run_dir, "status": self.status,
                "derived_from": self.derived_from, "world": self.world, "created": self.created,
                "updated": self.updated}

    def save(self, path: str | Path | None = None) -> Path:
        """Write atomically (temp file + rename); a crash leaves the previous version intact.
        A schema 1 session is never rewritten: save it under a new path as a derived session instead."""
        if self.legacy_events is not None:
            raise InputError(f"session {self.path} is in the old format and is kept as it is: save a new session")
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

    def derive(self) -> "Session":
        """A new, unsaved session that continues this one's work and says where it came from."""
        return Session(model=dict(self.model), diagnosis=dict(self.diagnosis), job=self.job, report=self.report,
                       marks=dict(self.marks), actions=list(self.actions),
                       derived_from=str(self.path.resolve()) if self.path else self.derived_from)

    @classmethod
    def load(cls, path: str | Path) -> "Session":
        path = Path(path)
        if path.is_dir() and (path / SESSION_FILE).is_file():  # a run directory stands for its session
            path = path / SESSION_FILE
        if not path.is_file():
            raise InputError(f"session {str(path)!r} does not exist: pass a file saved by head-surgeon")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"session {str(path)!r} is truncated or corrupt ({exc}); the file was left as it is") from exc
        except OSError as exc:
            raise InputError(f"cannot read session {str(path)!r}: {exc.strerror}") from exc
        if not isinstance(data, dict) or data.get("format") != SESSION_FORMAT:
            raise InputError(f"{str(path)!r} is not a head-surgeon session file")
        version = data.get("schema_version")
        if version not in READABLE_SCHEMAS:
            raise InputError(f"session {str(path)!r} has schema_version {version!r}; this head-surgeon reads "
                             f"{', '.join(map(str, READABLE_SCHEMAS))}: open it with a matching version")
        try:
            session = cls(model=dict(data["model"]), diagnosis=dict(data.get("diagnosis") or {}), job=data.get("job"),
                          actions=list(data.get("actions") or []), report=data.get("report"),
                          marks=dict(data.get("marks") or {"targets": "", "frozen": ""}),
                          run_dir=data.get("run_dir"), status=str(data.get("status", "new")),
                          derived_from=data.get("derived_from"), world=data.get("world"),
                          created=float(data.get("created", 0)), updated=float(data.get("updated", 0)), path=path,
                          legacy_events=list(data.get("events") or []) if version == 1 else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"session {str(path)!r} is missing or has a malformed field ({exc})") from exc
        return session


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
