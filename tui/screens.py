"""Modal screens: help, open model, head-spec entry, quit confirmation."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Checkbox, Input, Label, Markdown


class HelpScreen(ModalScreen[None]):
    """Every key, from the bindings (app.help_markdown), in a body that scrolls from the keyboard: the
    body has focus, so up/down/pgup/pgdn/home/end (and j/k) scroll it at any terminal size."""

    BINDINGS = [
        Binding("escape,q,question_mark", "dismiss", "close"),
        Binding("j", "scroll(1)", "scroll down", show=False),
        Binding("k", "scroll(-1)", "scroll up", show=False),
    ]

    def __init__(self, markdown: str) -> None:
        super().__init__()
        self.markdown = markdown

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="help"):
            with VerticalScroll(id="help-body"):
                yield Markdown(self.markdown)
            yield Label("↑ ↓ pgup pgdn home end scroll · esc closes", classes="hint")

    def on_mount(self) -> None:
        self.query_one("#help-body").focus()

    def action_scroll(self, lines: int) -> None:
        self.query_one("#help-body").scroll_relative(y=lines, animate=False)


class PromptScreen(ModalScreen[str | None]):
    """One line of input (model ref, head spec); returns the text or None when cancelled."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]

    def __init__(self, title: str, placeholder: str, value: str = "", hint: str = "") -> None:
        super().__init__()
        self.title_text, self.placeholder, self.value, self.hint = title, placeholder, value, hint

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.title_text, classes="title")
            # The prefill ("sessions/", the current model) is a start to type on, not a value to replace:
            # no select-all on focus, so the cursor sits at its end.
            yield Input(value=self.value, placeholder=self.placeholder, id="prompt-input", select_on_focus=False)
            if self.hint:
                yield Label(self.hint, classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.dismiss(event.value.strip() or None)

    def action_cancel(self) -> None:
        self.dismiss(None)


class ConfirmScreen(ModalScreen[bool]):
    BINDINGS = [Binding("escape,n", "answer(False)", "no"), Binding("y", "answer(True)", "yes")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, classes="title")
            yield Button("Yes (y)", id="yes", variant="error")
            yield Button("No (n)", id="no", variant="primary")

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class SurgeryScreen(ModalScreen[dict | None]):
    """The surgery dialog: corpus, steps, learning rate, seq len, seed, recipe, GPUs. Returns the raw fields
    (or None)."""

    BINDINGS = [Binding("escape", "cancel", "cancel")]
    FIELDS = (("corpus", "corpus"), ("steps", "steps"), ("lr", "learning rate"), ("seq_len", "seq len"), ("seed", "seed"),
              ("recipe", "recipe"), ("nproc", "GPUs"))

    def __init__(self, summary: str, defaults: dict) -> None:
        super().__init__()
        self.summary, self.defaults = summary, defaults

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog", classes="surgery"):
            yield Label("Surgery", classes="title")
            yield Label(self.summary, classes="hint")
            for name, label in self.FIELDS:
                with Horizontal(classes="field"):
                    yield Label(label)
                    yield Input(value=str(self.defaults.get(name, "")), placeholder=label, id=f"field-{name}")
            yield Checkbox("also run a sham control arm (no re-init)",
                           bool(self.defaults.get("control")), id="field-control")
            yield Label("corpus: file, folder, .jsonl, .parquet, hub dataset, python-stdlib/PKG\n"
                        "recipe: default or paper (README) · GPUs over 1: torchrun, detached\n"
                        "enter starts · esc cancels · tab: next field · space ticks the box", classes="hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        fields = {name: self.query_one(f"#field-{name}", Input).value.strip() for name, _ in self.FIELDS}
        self.dismiss({**fields, "control": self.query_one("#field-control", Checkbox).value})

    def action_cancel(self) -> None:
        self.dismiss(None)


class ChoiceScreen(ModalScreen[str | None]):
    """A question with a few one-key answers; returns the chosen key, or None on escape."""

    BINDINGS = [Binding("escape", "choose(None)", "stay")]

    def __init__(self, question: str, choices: dict[str, str]) -> None:
        super().__init__()
        self.question, self.choices = question, choices

    def compose(self) -> ComposeResult:
        with Vertical(id="dialog"):
            yield Label(self.question, classes="title")
            for key, label in self.choices.items():
                yield Button(f"{label} ({key})", id=f"choice-{key}")
            yield Label("esc: stay", classes="hint")

    def on_key(self, event) -> None:
        if event.key in self.choices:
            event.stop()
            self.dismiss(event.key)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id.removeprefix("choice-"))

    def action_choose(self, key: str | None) -> None:
        self.dismiss(key)
