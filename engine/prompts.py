"""Diagnostic prompts: the built-in set, or a user's `.jsonl` / `.txt` file."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import InputError

BUILTIN_PROMPTS_FILE = Path(__file__).parent / "prompts" / "diagnostic.jsonl"


def builtin_prompts() -> list[str]:
    """The project's own diagnostic set: prose, code, markup and several languages."""
    return load_prompts(BUILTIN_PROMPTS_FILE)


def load_prompts(path: str | Path | None, what: str = "prompts file") -> list[str]:
    """Read prompts: `.jsonl` with one {"text": ...} object a line, or `.txt` with one prompt a line
    (`what` names the file in errors)."""
    if path is None:
        return builtin_prompts()
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} does not exist: pass a .jsonl or .txt file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise InputError(f"{what} {str(path)!r} is not UTF-8 text: re-save it as UTF-8") from exc
    if path.suffix == ".jsonl":
        prompts = [_jsonl_text(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    elif path.suffix == ".txt":
        prompts = [line for line in lines if line.strip()]
    else:
        raise InputError(f"{what} {str(path)!r} has an unknown extension: use .jsonl or .txt")
    if not prompts:
        raise InputError(f"{what} {str(path)!r} holds no prompts: add at least one non-empty line")
    return prompts


def _jsonl_text(path: Path, lineno: int, line: str) -> str:
    where = f"{path}:{lineno}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InputError(f"{where}: not valid JSON ({exc.msg}): write one {{\"text\": ...}} object per line") from exc
    if not isinstance(record, dict) or not isinstance(record.get("text"), str) or not record["text"].strip():
        raise InputError(f"{where}: expected an object with a non-empty string field \"text\"")
    return record["text"]
