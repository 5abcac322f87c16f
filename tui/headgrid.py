"""The layer x head grid: one scrolling Line-API widget, fast from 24x16 to 70x112 heads."""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.geometry import Region, Size, Spacing
from textual.message import Message
from textual.reactive import var
from textual.scroll_view import ScrollView
from textual.strip import Strip

CLASS_NAMES = ("healthy", "bos-sink", "dead", "low-entropy", "positional")
LABEL_W = 4  # "L69 "
CELL_W = 3  # mark + BOS mass as a two-digit percentage


@dataclass
class GridData:
    """What the grid shows: plain lists, no tensors. `classes`/`bos` are None before diagnosis."""

    n_layer: int
    n_head: int
    slopes: list[float]
    bos: list[list[float]] | None = None
    classes: list[list[str]] | None = None
    targets: set[tuple[int, int]] = field(default_factory=set)
    frozen: set[tuple[int, int]] = field(default_factory=set)


class HeadGrid(ScrollView, can_focus=True):
    """Rows are layers, columns heads; colour is the head's class, the number its BOS mass in percent
    (capped at 99), `+` marks targets and `=` frozen heads."""

    COMPONENT_CLASSES = {
        "headgrid--label", "headgrid--cursor", "headgrid--undiagnosed",
        *(f"headgrid--{name}" for name in CLASS_NAMES),
    }
    DEFAULT_CSS = """
    /* No horizontal scrollbar: the header row of head indices is the horizontal ruler, and a bar
       there would cover the last layer's row (and cost a row at 80x24). */
    HeadGrid { background: $surface; scrollbar-size-horizontal: 0; }
    HeadGrid > .headgrid--label { color: $text-muted; text-style: bold; }
    HeadGrid > .headgrid--cursor { background: $accent; color: $text; text-style: bold reverse; }
    HeadGrid > .headgrid--undiagnosed { color: $text-muted; }
    HeadGrid > .headgrid--healthy { background: $success-darken-2; color: $text; }
    HeadGrid > .headgrid--bos-sink { background: $warning-darken-1; color: $text; }
    HeadGrid > .headgrid--dead { background: $error-darken-1; color: $text; text-style: bold; }
    HeadGrid > .headgrid--low-entropy { background: $secondary-darken-1; color: $text; }
    HeadGrid > .headgrid--positional { background: #6a3d9a; color: $text; }  /* purple in every theme */
    """
    BINDINGS = [
        Binding("up,k", "move(-1,0)", "up", show=False),
        Binding("down,j", "move(1,0)", "down", show=False),
        Binding("left,h", "move(0,-1)", "left", show=False),
        Binding("right,l", "move(0,1)", "right", show=False),
        Binding("pageup", "move(-10,0)", "10 layers up", show=False),
        Binding("pagedown", "move(10,0)", "10 layers down", show=False),
        Binding("home", "move(0,-100000)", "first head", show=False),
        Binding("end", "move(0,100000)", "last head", show=False),
        Binding("space", "toggle_target", "target"),
        Binding("f", "toggle_frozen", "freeze"),
        Binding("r", "mark_layer", "layer"),
        Binding("c", "mark_column", "column"),
        Binding("n", "toggle_numbers", "numbers"),
    ]

    cursor: var[tuple[int, int]] = var((0, 0))
    show_numbers: var[bool] = var(True)

    class CursorMoved(Message):
        def __init__(self, layer: int, head: int) -> None:
            super().__init__()
            self.layer, self.head = layer, head

    class MarksChanged(Message):
        pass

    def __init__(self, data: GridData | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data = data or GridData(0, 0, [])
        self._styles: dict[str, Style] = {}

    # --- data --------------------------------------------------------------------------------------
    def set_data(self, data: GridData) -> None:
        self.data = data
        self.virtual_size = Size(LABEL_W + data.n_head * CELL_W, data.n_layer + 1)
        layer, head = self.cursor
        self.cursor = (min(layer, max(data.n_layer - 1, 0)), min(head, max(data.n_head - 1, 0)))
        self.refresh()

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._styles.clear()

    def class_style(self, name: str) -> Style:
        """The theme style of a component (`label`, `cursor`, or a class name such as `dead`)."""
        if name not in self._styles:
            self._styles[name] = self.get_component_rich_style(f"headgrid--{name}")
        return self._styles[name]

    # --- rendering ------------------------------------------------------------------------------------
    def _cell(self, layer: int, head: int) -> Segment:
        d = self.data
        mark = "+" if (layer, head) in d.targets else "=" if (layer, head) in d.frozen else " "
        if d.bos is None:
            text, style = mark + " ·", self.class_style("undiagnosed")
        else:
            value = d.bos[layer][head]
            body = f"{min(99, round(100 * value)):2d}" if self.show_numbers else "  "
            text, style = mark + body, self.class_style(d.classes[layer][head])
        if (layer, head) == self.cursor and self.has_focus:
            style = style + self.class_style("cursor")
        return Segment(text, style)

    def render_line(self, y: int) -> Strip:
        width = self.size.width
        d = self.data
        label = self.class_style("label")
        scroll_x, scroll_y = self.scroll_offset
        if y == 0:
            heads = "".join(f"{h}".rjust(CELL_W) for h in range(d.n_head))
            cells = Strip([Segment(heads, label)], len(heads))
            row_label = Segment("L\\H".ljust(LABEL_W), label)
        else:
            layer = y - 1 + scroll_y
            if layer >= d.n_layer:
                return Strip.blank(width, self.rich_style)
            segments = [self._cell(layer, h) for h in range(d.n_head)]
            cells = Strip(segments, d.n_head * CELL_W)
            row_label = Segment(f"L{layer}".ljust(LABEL_W), label)
        visible = cells.crop(scroll_x, scroll_x + max(width - LABEL_W, 0))
        line = Strip([row_label, *visible], LABEL_W + visible.cell_length)
        return line.extend_cell_length(width, self.rich_style)

    # --- cursor -------------------------------------------------------------------------------------
    def watch_cursor(self, old: tuple[int, int], new: tuple[int, int]) -> None:
        self._keep_visible(*new)
        self.refresh()
        self.post_message(self.CursorMoved(*new))

    def watch_show_numbers(self) -> None:
        self.refresh()

    def on_focus(self) -> None:
        self.refresh()

    def on_blur(self) -> None:
        self.refresh()

    def on_resize(self) -> None:
        self._keep_visible(*self.cursor)

    def cursor_region(self, layer: int, head: int) -> Region:
        """The cell of (layer, head) in virtual coordinates: the window onto them is
        `scrollable_content_region.at_offset(scroll_offset)`, the label column and header row pinned."""
        return Region(LABEL_W + head * CELL_W, 1 + layer, CELL_W, 1)

    def _keep_visible(self, layer: int, head: int) -> None:
        """Scroll the least needed to show the cell whole: inside the scrollable region (scrollbars
        excluded) and clear of the pinned header row and layer labels."""
        if not self.data.n_layer or not self.is_mounted:
            return
        self.scroll_to_region(self.cursor_region(layer, head), spacing=Spacing(1, 0, 0, LABEL_W),
                              animate=False, immediate=True)

    def action_move(self, dr: int, dc: int) -> None:
        if not self.data.n_layer:
            return
        layer, head = self.cursor
        self.cursor = (min(max(layer + dr, 0), self.data.n_layer - 1), min(max(head + dc, 0), self.data.n_head - 1))

    # --- marking ------------------------------------------------------------------------------------
    def _changed(self) -> None:
        self.refresh()
        self.post_message(self.MarksChanged())

    def toggle(self, which: str, heads: list[tuple[int, int]]) -> None:
        """Mark `heads` as `which` ("targets" or "frozen"), or unmark them if all already are."""
        marks = getattr(self.data, which)
        other = self.data.frozen if which == "targets" else self.data.targets
        if heads and all(h in marks for h in heads):
            marks.difference_update(heads)
        else:
            marks.update(heads)
            other.difference_update(heads)
        self._changed()

    def set_marks(self, targets: set | None = None, frozen: set | None = None) -> None:
        if targets is not None:
            self.data.targets = set(targets)
            self.data.frozen -= self.data.targets
        if frozen is not None:
            self.data.frozen = set(frozen) - self.data.targets
        self._changed()

    def action_toggle_target(self) -> None:
        self.toggle("targets", [self.cursor])

    def action_toggle_frozen(self) -> None:
        self.toggle("frozen", [self.cursor])

    def action_mark_layer(self) -> None:
        layer = self.cursor[0]
        self.toggle("targets", [(layer, h) for h in range(self.data.n_head)])

    def action_mark_column(self) -> None:
        head = self.cursor[1]
        self.toggle("targets", [(l, head) for l in range(self.data.n_layer)])

    def action_toggle_numbers(self) -> None:
        self.show_numbers = not self.show_numbers
