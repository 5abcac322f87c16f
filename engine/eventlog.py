"""A run's event log: `RUN_DIR/events.jsonl`, one JSON object a line, appended and flushed as it happens.

Each line is an event's `to_dict()` plus `seq` (0, 1, 2, ... across resumes) and `time` (Unix seconds).
It is the one record of a run's progress; viewers rebuild everything from it and follow it live. A line
cut short by a crash is skipped on reading with one warning, and nothing after or before it is lost.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError
from .events import Event, event_from_dict, json_safe

LOG_FILE = "events.jsonl"


class EventLog:
    """A sink that appends every event to `run_dir/events.jsonl` (created if absent, continued if present)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOG_FILE
        existing = read_records(self.path, warn=False) if self.path.is_file() else []
        self.seq = existing[-1]["seq"] + 1 if existing else 0
        self._fh = open(self.path, "a", encoding="utf-8")
        if self._fh.tell() and not _ends_with_newline(self.path):  # a crash cut the last line: start a fresh one
            self._fh.write("\n")

    def emit(self, event: Event) -> None:
        record = {"seq": self.seq, "time": round(time.time(), 3), **json_safe(event.to_dict())}
        try:
            self._append(json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n")
        except OSError as exc:  # a full or read-only disk: one line, the log so far intact
            from .preflight import os_error_message

            raise InputError(os_error_message(exc, self.path)) from exc
        self.seq += 1

    def _append(self, line: str) -> None:
        self._fh.write(line)
        self._fh.flush()

    def close(self) -> None:
        if not self._fh.closed:
            self._fh.close()

    def __enter__(self) -> "EventLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _parse(line: bytes) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and "kind" in record else None


def read_records(path: str | Path, *, warn: bool = True) -> list[dict[str, Any]]:
    """Every complete record in the log; unreadable lines are skipped with one warning."""
    reader = LogReader(path)
    records = reader.read_new(final=True)
    if warn and reader.skipped:
        warnings.warn(f"{path}: skipped {reader.skipped} damaged line(s) (a crash mid-write); the rest was read",
                      stacklevel=2)
    return records


def records_from_the_end(path: str | Path, chunk: int = 1 << 16) -> Iterator[dict[str, Any]]:
    """The log's complete records, newest first, reading only as far back as the caller iterates (a
    state or a summary usually needs the last few lines of a log that may hold gigabytes of grids)."""
    with open(path, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - chunk)
            fh.seek(start)
            data = fh.read(end - start) + tail
            end = start
            lines = data.split(b"\n")
            tail = lines.pop(0) if start > 0 else b""  # maybe cut: joined with the chunk before it
            for line in reversed(lines):
                record = _parse(line) if line.strip() else None
                if record is not None:
                    yield record


def read_events(path: str | Path) -> list[Event]:
    """The log as typed events (`engine.events` dataclasses), in order."""
    return [event_from_dict(r) for r in read_records(path)]


class LogReader:
    """Follows a log as it grows: each `read_new()` returns the records appended since the last call.

    An incomplete last line (the writer is mid-write) is left for the next call; with `final=True` (the
    writer is gone) it counts as damaged and is skipped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.offset = 0
        self.skipped = 0

    def read_new(self, final: bool = False) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        records = []
        for line, complete in _lines(data):
            if not complete and not final:
                break
            self.offset += len(line) + (1 if complete else 0)
            if not line.strip():
                continue
            record = _parse(line)
            if record is None:
                self.skipped += 1
            else:
                records.append(record)
        return records


def _lines(data: bytes) -> Iterator[tuple[bytes, bool]]:
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        if end < 0:
            yield data[start:], False
            return
        yield data[start:end], True
        start = end + 1
