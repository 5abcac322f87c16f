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
