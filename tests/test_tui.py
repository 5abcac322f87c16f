"""Drive the real workbench with Pilot on a tiny planted model; SVG snapshots of the main screens."""

from pathlib import Path

import pytest
from textual.geometry import Region

from conftest import PLANTED
from tui.app import HeadSurgeonApp
from tui.headgrid import CELL_W, LABEL_W, GridData, HeadGrid
from tui.screens import HelpScreen, PromptScreen
from tui_helpers import check_snapshot, screen_lines, wait_idle

SIZE = (80, 24)


@pytest.fixture(autouse=True)
def _in_a_fresh_directory(tmp_path, monkeypatch):
    """The workbench's default runs/ and sessions/ are relative: a developer's live runs in the checkout must not
    open their dialog here, and nothing here is written into the checkout."""
    monkeypatch.chdir(tmp_path)


async def test_diagnoses_on_open_and_marks_from_the_keyboard(planted_dir):
    app = HeadSurgeonApp(model_ref=str(planted_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        grid = app.query_one(HeadGrid)
        assert app.report is not None
        assert grid.data.classes[0][3] == "dead" and grid.data.classes[2][1] == "dead"
        await pilot.press("right", "l", "j")  # move to L1.H2
        assert grid.cursor == (1, 2)
        await pilot.press("space")
        assert grid.data.targets == {(1, 2)}
        await pilot.press("f")  # freezing a target moves it to frozen
        assert grid.data.targets == set() and grid.data.frozen == {(1, 2)}
        await pilot.press("c")  # whole column 2 as targets
        assert grid.data.targets == {(l, 2) for l in range(3)} and grid.data.frozen == set()
        await pilot.press("c")  # toggles off again
        assert grid.data.targets == set()
        await pilot.press("r")
        assert grid.data.targets == {(1, h) for h in range(4)}
        await pilot.press("x", "a")  # clear, then mark all sick
        assert grid.data.targets == set(PLANTED)
        assert "L1.H2" in str(app.query_one("#detail").render())


async def test_band_spec_dialog_marks_heads_and_reports_errors(planted_dir):
    app = HeadSurgeonApp(model_ref=str(planted_dir))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("b")
        await pilot.pause()
        assert isinstance(app.screen, PromptScreen)
        await pilot.press(*"1-2.2-3", "enter")
        await pilot.pause()
        assert app.grid.data.targets == {(1, 2), (1, 3), (2, 2), (2, 3)}
        await pilot.press("b", *"9.1", "enter")
        await pilot.pause()
        assert app.grid.data.targets == {(1, 2), (1, 3), (2, 2), (2, 3)}
        assert any("out of range" in n.message for n in app._notifications)


async def test_bad_model_path_is_a_notification_not_a_crash(tmp_path):
    app = HeadSurgeonApp(model_ref=str(tmp_path / "missing"))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_idle(app, pilot)
        assert app.loaded is None
        assert any("does not exist" in n.message for n in app._notifications)
        assert app.is_running


async def test_open_model_dialog_switches_models(planted_dir, tiny_dir):
    app = HeadSurgeonApp(model_ref=str(tiny_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        assert app.report.counts()["dead"] == 0
        await pilot.press("m")
        await pilot.pause()
        app.screen.query_one("Input").value = str(planted_dir)
        await pilot.press("enter")
        await wait_idle(app, pilot)
        assert app.report.counts()["dead"] == 2


async def test_help_lists_every_key_and_quit_is_clean(planted_dir):
    app = HeadSurgeonApp(model_ref=str(planted_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        for key in ("space", "`f`", "`r`", "`c`", "`d`", "`b`", "`a`", "`m`", "`q`", "`h`", "`o`", "`s`", "`L`", "`[`", "`]`"):
            assert key in app.screen.markdown
        await pilot.press("escape")
        await pilot.pause()
        await pilot.press("q")
        await pilot.pause()
    assert app.return_value == 0


async def test_grid_scrolls_a_bloom_176b_sized_grid():
    """70 layers x 112 heads in one Line-API widget: the cursor stays visible and rows render to width."""
    from textual.app import App

    class GridApp(App):
        def compose(self):
            yield HeadGrid()

    app = GridApp()
    async with app.run_test(size=(80, 24)) as pilot:
        grid = app.query_one(HeadGrid)
        classes = [["dead" if h >= 100 else "healthy" for h in range(112)] for _ in range(70)]
        grid.set_data(GridData(70, 112, [0.5] * 112, bos=[[h / 112 for h in range(112)]] * 70, classes=classes))
        grid.focus()
        await pilot.press("end", "pagedown", "pagedown", "pagedown", "pagedown", "pagedown", "pagedown", "pagedown")
        await pilot.pause()
        assert grid.cursor == (69, 111)
        assert grid.scroll_offset.x > 0 and grid.scroll_offset.y > 0
        last = grid.render_line(grid.size.height - 1)
        assert last.cell_length == grid.size.width
        assert last.text.startswith("L69") and "+" not in last.text
        assert len(list(grid.children)) == 0


async def test_snapshots_main_help_and_spec_dialog(planted_dir):
    app = HeadSurgeonApp(model_ref=str(planted_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        app.sub_title = "planted"  # the temp path differs between runs
        app.query_one("RichLog").clear()
        await pilot.press("space", "j", "f")
        await pilot.pause()
        check_snapshot(app, "main")
        await pilot.press("question_mark")
        await pilot.pause()
        await pilot.press("end")  # scrolled to its end: the last keys
        await pilot.pause()
        check_snapshot(app, "help")
        await pilot.press("escape", "b")
        await pilot.pause()
        check_snapshot(app, "spec_dialog")
        await pilot.press("escape", "o")  # the surgery dialog, its sham control box included
        await pilot.pause()
        check_snapshot(app, "surgery_dialog")


async def test_help_scrolls_from_the_keyboard_to_every_key_at_80x24(planted_dir):
    """Every binding's row of the generated help can be scrolled into view with pgdn / end, quit last."""
    from textual.binding import Binding

    app = HeadSurgeonApp(model_ref=str(planted_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        seen = list(screen_lines(app))
        body = app.screen.query_one("#help-body")
        for _ in range(40):  # page down through the whole help, keeping what was on screen
            await pilot.press("pagedown")
            await pilot.pause()
            seen += screen_lines(app)
            if body.scroll_y >= body.max_scroll_y:
                break
        await pilot.press("home", "end")
        await pilot.pause()
        bindings = [*HeadGrid.BINDINGS, *app.BINDINGS]

        def row(binding) -> tuple[str, str]:
            keys = ", ".join(app.get_key_display(Binding(k.strip(), "")) for k in binding.key.split(","))
            return keys, binding.description or binding.action

        def shown(lines, binding) -> bool:
            keys, description = row(binding)
            return any(f" {keys} " in line and f" {description} " in line for line in lines)

        assert shown(screen_lines(app), bindings[-1]) and row(bindings[-1])[1] == "quit"  # last row at the end
        missing = [row(b) for b in bindings if not shown(seen, b)]
        assert not missing, f"help rows never on screen: {missing}"
        assert body.max_scroll_y > 0 and body.scroll_y == body.max_scroll_y  # it scrolls, and end reached the end
        await pilot.press("home")
        await pilot.pause()
        assert body.scroll_y == 0


async def test_summary_keeps_five_rows_at_80x24_before_surgery(planted_dir):
    """The summary pane keeps at least five rows of text, all on screen (after a surgery: test_tui_runs)."""
    app = HeadSurgeonApp(model_ref=str(planted_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("a", "space")  # all sick heads marked, and the cursor's head too
        await pilot.pause()

        def check() -> None:
            summary = app.query_one("#summary")
            inner = summary.content_region
            assert inner.height >= 5, f"summary has {inner.height} rows of text"
            footer = app.query_one("Footer").region
            assert inner.y >= 0 and inner.bottom <= footer.y  # every row of it on screen
            assert summary.region.bottom <= app.query_one("#side").region.bottom  # not clipped by its column
            lines = [line[inner.x:inner.right] for line in screen_lines(app)[inner.y:inner.bottom]]
            rate = f"rate {100 * app.report.sink_rate()[1]:.0f}%"  # Gu et al.'s sink rate beside the last class
            for names, line in zip((("healthy", "sink"), ("dead", "low-ent"), ("posit", rate)), lines):
                assert all(name in line for name in names), line  # the class counts are its first rows, two a row

        check()


async def test_dialog_hints_wrap_inside_the_dialog_at_80_columns(planted_dir):
    """Long hints (spec prompt, open-model prompt, surgery dialog) wrap inside the dialog: every word on
    screen, nothing past the dialog's edge."""
    from textual.widgets import Label

    from tui.screens import SurgeryScreen

    app = HeadSurgeonApp(model_ref=str(planted_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)

        def check_hints() -> None:
            dialog = app.screen.query_one("#dialog").content_region
            lines = screen_lines(app)
            hints = list(app.screen.query(".hint").results(Label))
            assert hints
            for hint in hints:
                text = str(hint.render())
                region = hint.content_region
                assert region.x >= dialog.x and region.right <= dialog.right
                shown = " ".join(line[region.x:region.right] for line in lines[region.y:region.bottom])
                for word in text.split():
                    assert word in shown, f"{word!r} of hint {text!r} is cut: {shown!r}"

        for keys in (("b",), ("m",), ("a", "o")):
            await pilot.press(*keys)
            await pilot.pause()
            assert isinstance(app.screen, (PromptScreen, SurgeryScreen))
            check_hints()
            await pilot.press("escape")
            await pilot.pause()


async def test_prompt_prefill_is_kept_when_typing(planted_dir, tmp_path, monkeypatch):
    """The load-session prompt opens on `sessions/` and the open-model prompt on the current model, with
    the cursor at the end and nothing selected: typing extends the prefill instead of replacing it."""
    monkeypatch.chdir(tmp_path)
    app = HeadSurgeonApp(model_ref=str(planted_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("L")
        await pilot.pause()
        assert isinstance(app.screen, PromptScreen)
        await pilot.press(*"x.json")
        assert app.screen.query_one("#prompt-input").value == "sessions/x.json"
        await pilot.press("escape", "m")
        await pilot.pause()
        await pilot.press(*"-v2")
        assert app.screen.query_one("#prompt-input").value == str(planted_dir) + "-v2"
        await pilot.press("escape")


async def test_grid_cursor_stays_clear_of_scrollbars_at_60x15():
    """At 60x15 the last layer and head, reached from the keyboard, are drawn inside the visible part of
    the grid, not under a scrollbar, and back at the first head the labels still show."""
    from textual.app import App

    class GridApp(App):
        CSS = "HeadGrid { border: round $primary; }"

        def compose(self):
            yield HeadGrid()

    app = GridApp()
    async with app.run_test(size=(60, 15)) as pilot:
        grid = app.query_one(HeadGrid)
        n_layer, n_head = 70, 112
        classes = [["healthy"] * n_head for _ in range(n_layer)]
        grid.set_data(GridData(n_layer, n_head, [0.5] * n_head, bos=[[0.5] * n_head] * n_layer, classes=classes))
        grid.focus()
        await pilot.pause()

        def cursor_on_screen():
            layer, head = grid.cursor
            inner = grid.content_region
            x = inner.x + LABEL_W + head * CELL_W - grid.scroll_offset.x
            y = inner.y + 1 + layer - grid.scroll_offset.y
            cell = Region(x, y, CELL_W, 1)
            visible = grid.scrollable_content_region  # the content area less the scrollbars
            assert visible.contains_region(cell), f"cursor cell {cell} outside {visible}"
            line = screen_lines(app)[y]
            assert line[inner.x:].startswith(f"L{layer}")  # the row drawn there is the cursor's layer
            header = screen_lines(app)[inner.y]
            assert header[x:x + CELL_W].strip() == str(head)  # under its head's index

        await pilot.press("end", *["pagedown"] * 7)
        await pilot.pause()
        assert grid.cursor == (n_layer - 1, n_head - 1)
        cursor_on_screen()
        await pilot.press("up", "left", "left")
        await pilot.pause()
        cursor_on_screen()
        await pilot.press("home", *["pageup"] * 7)
        await pilot.pause()
        assert grid.cursor == (0, 0) and tuple(grid.scroll_offset) == (0, 0)
        cursor_on_screen()


async def test_readme_names_the_grid_colours_of_the_default_theme():
    """The README's colour for each class is the hue family the grid actually paints it in."""
    import colorsys
    import re

    from textual.app import App

    families = [(15, "red"), (45, "orange"), (70, "yellow"), (165, "green"), (190, "teal"), (255, "blue"),
                (330, "purple"), (360, "red")]

    def family(color) -> str:
        r, g, b = (c / 255 for c in color.triplet)
        hue = 360 * colorsys.rgb_to_hsv(r, g, b)[0]
        return next(name for limit, name in families if hue < limit)

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    sentence = " ".join(re.search(r"A cell's colour is its class(.*?)\. ", readme, re.S).group(1).split())

    class GridApp(App):
        def compose(self):
            yield HeadGrid()

    app = GridApp()
    async with app.run_test(size=SIZE):
        grid = app.query_one(HeadGrid)
        for name in ("healthy", "bos-sink", "dead", "low-entropy"):
            claimed = re.search(r"(\w+) " + re.escape(name), sentence, re.I)
            assert claimed, f"README names no colour for {name}: {sentence!r}"
            assert claimed.group(1).lower() == family(grid.class_style(name).bgcolor), (name, sentence)


def test_the_real_app_run_starts_draws_and_quits(planted_dir):
    """App.run() itself, as `head-surgeon` calls it (run_test bypasses it): headless, q quits with 0."""
    async def auto_pilot(pilot):
        await wait_idle(pilot.app, pilot)
        await pilot.press("q")

    app = HeadSurgeonApp(model_ref=str(planted_dir))
    app.run(headless=True, size=SIZE, auto_pilot=auto_pilot)
    assert app.return_value == 0 and app.report is not None


async def test_the_status_line_names_the_band_after_a_diagnosis(planted_dir):
    app = HeadSurgeonApp(model_ref=str(planted_dir))
    async with app.run_test(size=SIZE) as pilot:
        await wait_idle(app, pilot)
        status = str(app.query_one("#status").render())
        band = app.report.band()
        assert "sink rate" in status and (f"band H{band[0]}" in status if band else "band none" in status)
        assert "0." not in status.split("band")[1]
