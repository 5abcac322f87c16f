"""The TUI's engine sink: engine events become Textual messages (thread-safe `post_message`)."""

from __future__ import annotations

from textual.message import Message

from engine.events import DiagnosisProgress


class EngineEvent(Message):
    """An engine event (a dataclass from engine.events), delivered on the UI thread."""

    def __init__(self, event) -> None:
        super().__init__()
        self.event = event

    def can_replace(self, message: Message) -> bool:
        # progress events of the same kind coalesce when the UI falls behind
        return isinstance(message, EngineEvent) and type(message.event) is type(self.event) and \
            isinstance(self.event, DiagnosisProgress)


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


class RunCreated(Message):
    """A run directory was set up (or is being resumed): the workbench attaches to it."""

    def __init__(self, launch, resume: bool) -> None:
        super().__init__()
        self.launch, self.resume = launch, resume


class RunLaunched(Message):
    """A detached runner holds its run (the engine's workflow.Launch, with its pid)."""

    def __init__(self, launch) -> None:
        super().__init__()
        self.launch = launch
