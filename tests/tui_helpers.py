import os
from pathlib import Path

import pytest
from textual.worker import WorkerCancelled


async def wait_idle(app, pilot, rounds: int = 20) -> None:
    """Wait until no worker is running (workers may start further workers through messages)."""
    for _ in range(rounds):
        try:
            await app.workers.wait_for_complete()
        except WorkerCancelled:
            pass
        await pilot.pause()
        if not any(w.is_running for w in app.workers):
            await pilot.pause()
            if not any(w.is_running for w in app.workers):
                return
    raise AssertionError("workers still running")


def screen_lines(app) -> list[str]:
    """What the terminal shows right now, as plain text, one string per row (scrollbars and all)."""
    return [strip.text for strip in app.screen._compositor.render_strips()]


SNAPSHOTS = Path(__file__).parent / "snapshots"


def check_snapshot(app, name: str) -> None:
    """Compare the screen's SVG with the stored one; HEAD_SURGEON_UPDATE_SNAPSHOTS=1 rewrites it."""
    svg = app.export_screenshot(title="head-surgeon")
    path = SNAPSHOTS / f"{name}.svg"
    if os.environ.get("HEAD_SURGEON_UPDATE_SNAPSHOTS") or not path.exists():
        path.write_text(svg)
        if not os.environ.get("HEAD_SURGEON_UPDATE_SNAPSHOTS"):
            pytest.fail(f"snapshot {path.name} was missing and has been written: re-run")
    assert svg == path.read_text(), f"screen differs from {path}: inspect it, then HEAD_SURGEON_UPDATE_SNAPSHOTS=1"
