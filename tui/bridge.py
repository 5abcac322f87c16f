"""The TUI's engine sink: engine events become Textual messages (thread-safe `post_message`)."""

from __future__ import annotations

from textual.message import Message


class EngineEvent(Message):
    """An engine event (a dataclass from engine.events), delivered on the UI thread."""

    def __init__(self, event) -> None:
        super().__init__()
        self.event = event

    def can_replace(self, message: Message) -> bool:
        # progress events of the same kind coalesce when the UI falls behind
        return isinstance(message, EngineEvent) and type(message.event) is type(self.event) and \
            type(self.event).__name__ in ("DiagnosisProgress", "StepMetrics")


class ModelLoaded(Message):
    def __init__(self, loaded) -> None:
        super().__init__()
        self.loaded = loaded


class ReportReady(Message):
    def __init__(self, report) -> None:
        super().__init__()
        self.report = report


class WorkFailed(Message):
    def __init__(self, what: str, message: str) -> None:
        super().__init__()
        self.what, self.message = what, message


class MessageSink:
    """`emit(event)` from any thread posts an EngineEvent to `target`."""

    def __init__(self, target) -> None:
        self.target = target

    def emit(self, event) -> None:
        self.target.post_message(EngineEvent(event))


class SurgeryDone(Message):
    """A surgery job finished; `report` is the engine's report dict (JSON-safe)."""

    def __init__(self, report: dict, out_dir: str) -> None:
        super().__init__()
        self.report, self.out_dir = report, out_dir
