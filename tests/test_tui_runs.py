"""The workbench on runs: surgery as a run it follows through the event log, two surgeries in a row from
the base weights, scrubbing from the model before the operation, loaded sessions never written, refusals
as notifications, dead runs resumed, detached runs left going or cancelled on quit."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import PLANTED

from engine import runner
from engine.operation import PATCH_FILE
from engine.patch import load_patch
from engine.prompts import builtin_prompts
from engine.session import Session
from tui.app import HeadSurgeonApp
from tui.entry import main as cli
from tui.screens import ChoiceScreen, ConfirmScreen, SurgeryScreen
from tui_helpers import check_snapshot, screen_lines, wait_idle

SIZE = (80, 24)
FIELDS = {"steps": "2", "lr": "0.01", "seq_len": "32"}


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """runs/ and sessions/ are created in the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text("\n\n".join(builtin_prompts() * 4))
    (tmp_path / "prompts.txt").write_text("\n".join(builtin_prompts()[:6]))  # a short diagnosis: faster runs
    return tmp_path


async def _operate(app, pilot, fields: dict[str, str]) -> None:
    """o, fill the dialog, enter; wait for the in-process run and read the rest of its log."""
    await pilot.press("o")
    await pilot.pause()
    assert isinstance(app.screen, SurgeryScreen)
    for name, value in fields.items():
        app.screen.query_one(f"#field-{name}").value = value
    await pilot.press("enter")
    await wait_idle(app, pilot, rounds=400)
    app._poll()
    app.clear_notifications()  # a toast would cover the side pane's last rows
    await pilot.pause()


async def _sick_marked_dialog(app, pilot) -> None:
    """The workbench loaded, every sick head marked (a) and the surgery dialog open (o)."""
    await wait_idle(app, pilot)
    await pilot.press("a", "o")
    await pilot.pause()


def _patch(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_patch(run_dir / PATCH_FILE)[0]


def _summary_on_screen(app) -> list[str]:
    summary = app.query_one("#summary")
    inner = summary.content_region
    assert inner.bottom <= app.query_one("Footer").region.y
    text = str(summary.render()).rstrip("\n").splitlines()
    rows = sum(max(1, -(-len(line) // inner.width)) for line in text)  # wrapped lines take several rows
    assert rows <= inner.height, f"summary needs {rows} rows and has {inner.height}: {text}"
    return [line[inner.x:inner.right] for line in screen_lines(app)[inner.y:inner.bottom]]


async def test_two_surgeries_in_a_row_each_start_from_the_base_and_replay_to_the_same_patch(planted_dir, workdir):
    app = HeadSurgeonApp(model_ref=str(planted_dir), detach=False, prompts_path=str(workdir / "prompts.txt"))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("a", "right", "right", "right")  # all sick heads marked; the cursor on L0.H3
        await _operate(app, pilot, {"corpus": str(workdir / "corpus.txt"), **FIELDS})
        first = app.attached.run_dir
        assert app.run_state == "finished" and (first / PATCH_FILE).is_file()
        assert app.recovery["woken"] == 2 and app.recovery["targets"] == 2
        assert len(app.losses) == 2 and len(app.ppls) >= 3  # before, and each evaluation
        assert app.grid.data.classes[0][3] != "dead"  # the planted head woke up and the grid recoloured
        assert "(was 1.00)" in str(app.query_one("#detail").render())
        shown = "\n".join(_summary_on_screen(app))
        assert "targets 2" in shown and "woken 2 / functional" in shown and "drift" in shown  # all on screen
        app.sub_title = "planted"
        app.query_one("#log").clear()
        check_snapshot(app, "after_surgery")

        # The first evaluation point is the model before the operation: grid, detail and summary agree.
        await pilot.press(*"[" * 10)
        status = str(app.query_one("#status").render())
        assert "evaluation point 1/" in status and "before the operation" in status
        assert app.grid.data.classes[0][3] == "dead" and "BOS     1.000" in str(app.query_one("#detail").render())
        assert "dead 2" in str(app.query_one("#summary").render())
        check_snapshot(app, "scrubbed_before")
        await pilot.press(*"]" * 10)
        assert app.grid.data.classes[0][3] != "dead"

        # A second surgery in the same workbench starts from the base weights again, not from the first's.
        await _operate(app, pilot, {})
        second = app.attached.run_dir
        assert second != first and app.run_state == "finished"
        assert Session.load(second).derived_from is None  # started from the base, not stacked on the first
    a, b = _patch(first), _patch(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert cli(["replay", str(second / "session.json"), "--device", "cpu", "--out", str(workdir / "replay")]) == 0
    c = _patch(workdir / "replay")
    assert all(torch.allclose(b[k], c[k], atol=1e-6) for k in b)


async def test_a_loaded_session_is_never_written_and_work_from_it_goes_into_a_new_one(planted_dir, workdir):
    assert cli(["operate", "--model", str(planted_dir), "--device", "cpu", "--targets", "sick", "--corpus",
                str(workdir / "corpus.txt"), "--steps", "2", "--seq-len", "32", "--grad-accum", "2",
                "--completions", "0", "--session", str(workdir / "mine.json")]) == 0
    mine = workdir / "mine.json"
    before = (mine.read_bytes(), mine.stat().st_mtime_ns)
    app = HeadSurgeonApp(model_ref=str(planted_dir), detach=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("L")
        await pilot.pause()
        app.screen.query_one("#prompt-input").value = str(mine)
        await pilot.press("enter")
        await pilot.pause()
        assert app.grid.data.targets == set(PLANTED) and app.run_state == "finished" and len(app.losses) == 2
        assert app.surgery_defaults["steps"] == 2  # o re-runs the recorded settings
        await pilot.press("s")  # saving never overwrites the loaded file
        await pilot.pause()
        saved = app.session.path
        assert saved != mine and saved.parent.name == "sessions" and Session.load(saved).derived_from == str(mine)
        await _operate(app, pilot, {"seq_len": "32"})
        new = Session.load(app.attached.run_dir)
        assert new.derived_from == str(saved.resolve()) and app.run_state == "finished"
    assert (mine.read_bytes(), mine.stat().st_mtime_ns) == before


async def test_a_session_for_other_weights_is_refused_with_a_notification(planted_dir, tiny_dir, workdir):
    assert cli(["operate", "--model", str(planted_dir), "--device", "cpu", "--targets", "0.3", "--corpus",
                str(workdir / "corpus.txt"), "--steps", "1", "--seq-len", "32", "--completions", "0",
                "--out", str(workdir / "run")]) == 0
    app = HeadSurgeonApp(model_ref=str(tiny_dir), detach=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("L")
        await pilot.pause()
        app.screen.query_one("#prompt-input").value = str(workdir / "run")
        await pilot.press("enter")
        await pilot.pause()
        assert app.session is None and app.attached is None
        assert any("other weights" in n.message for n in app._notifications)


async def test_places_that_cannot_be_written_are_notifications_not_crashes(planted_dir, workdir):
    (workdir / "file").write_text("not a directory")
    app = HeadSurgeonApp(model_ref=str(planted_dir), detach=False, runs_root=workdir / "file" / "runs",
                         sessions_root=workdir / "file" / "sessions")
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_idle(app, pilot)
        await pilot.press("s")
        await pilot.pause()
        await pilot.press("a", "o")
        await pilot.pause()
        app.screen.query_one("#field-corpus").value = str(workdir / "corpus.txt")
        await pilot.press("enter")
        await wait_idle(app, pilot)
        messages = [n.message for n in app._notifications]
        assert sum("file" in m for m in messages) >= 2, messages
        assert app.is_running and app.attached is None
        await pilot.press("o")  # an empty corpus field is refused before anything is written
        await pilot.pause()
        app.screen.query_one("#field-corpus").value = str(workdir / "missing.txt")
        await pilot.press("enter")
        await pilot.pause()
        assert any("does not exist" in n.message for n in app._notifications)
    assert not (workdir / "runs").exists()


async def test_a_dead_run_shows_dead_and_r_resumes_it(planted_dir, workdir):
    from engine.workflow import JobInputs, create_run, start
    from engine.model import load_model

    class Killed:
        def emit(self, event):
            if getattr(event, "kind", "") == "step" and event.step == 3:
                raise KeyboardInterrupt  # the process died here: no terminal event, lock released

    loaded = load_model(str(planted_dir), device="cpu")
    job = JobInputs(targets="0.3,2.1", corpus=str(workdir / "corpus.txt"), steps=6, eval_every=2, seq_len=32,
                    grad_accum=2, lr=1e-2, completions=0).build_job(loaded.adapter)
    launch = create_run(loaded, job, device="cpu")
    with pytest.raises(KeyboardInterrupt):
        start(launch, detach=False, sink=Killed())
    assert runner.run_state(launch.run_dir).state == "dead"
    app = HeadSurgeonApp(attach=str(launch.run_dir), detach=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_idle(app, pilot)
        await pilot.pause()
        assert app.run_state == "dead" and "R resumes" in str(app.query_one("#status").render())
        assert app.history.step == 3
        await pilot.press("R")
        await wait_idle(app, pilot, rounds=400)
        app._poll()
        assert app.run_state == "finished" and app.history.step == 6
    assert runner.run_state(launch.run_dir).state == "finished"


async def test_quit_leaves_a_detached_run_going_a_new_workbench_attaches_and_cancels_it(planted_dir, workdir):
    app = HeadSurgeonApp(model_ref=str(planted_dir))  # detached runs, as a user gets them
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await _sick_marked_dialog(app, pilot)
        app.screen.query_one("#field-corpus").value = str(workdir / "corpus.txt")
        app.screen.query_one("#field-steps").value = "5000"
        app.screen.query_one("#field-seq_len").value = "32"
        await pilot.press("enter")
        await wait_idle(app, pilot)
        run_dir = app.attached.run_dir
        deadline = time.monotonic() + 60
        while app.history.step < 1 and time.monotonic() < deadline:  # the workbench streams its steps
            await pilot.pause(0.1)
        assert app.history.step >= 1 and app.run_state == "running"
        await pilot.press("q")
        await pilot.pause()
        assert isinstance(app.screen, ChoiceScreen)
        started = time.monotonic()
        await pilot.press("l")
    try:
        assert time.monotonic() - started < 5
        assert runner.run_state(run_dir).state == "running"  # left going

        app = HeadSurgeonApp(model_ref=str(planted_dir))
        async with app.run_test(size=SIZE, notifications=True) as pilot:
            await wait_idle(app, pilot)
            assert isinstance(app.screen, ConfirmScreen)  # offers to attach to the live run
            await pilot.press("y")
            await pilot.pause(0.5)
            assert app.attached.run_dir.resolve() == run_dir.resolve() and app.history.step >= 1
            assert "runner" in "\n".join(line.text for line in app.query_one("#log").lines)  # the log pane too
            await pilot.press("q")
            await pilot.pause()
            await pilot.press("c")
        deadline = time.monotonic() + 60
        while runner.is_live(run_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.run_state(run_dir).state == "cancelled"
    finally:
        if runner.is_live(run_dir):  # never leave a 5000-step runner behind a failed assertion
            os.kill(int((run_dir / runner.LOCK_FILE).read_text()), signal.SIGKILL)


async def test_attaching_to_a_run_started_without_a_diagnosis_rebuilds_the_grid_from_its_log(planted_dir, workdir):
    """`operate --detach` with explicit heads records no diagnosis in its session: the grid, scrubbing and
    the detail pane come from the run's own "before" point and evaluations."""
    assert cli(["operate", "--model", str(planted_dir), "--device", "cpu", "--targets", "0.3,2.1", "--corpus",
                str(workdir / "corpus.txt"), "--steps", "2", "--seq-len", "32", "--grad-accum", "2", "--completions",
                "0", "--out", str(workdir / "run")]) == 0
    session = Session.load(workdir / "run")
    session.report = None  # as a detached run leaves it
    session.save()
    app = HeadSurgeonApp(attach=str(workdir / "run"), detach=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_idle(app, pilot)
        await pilot.pause()
        assert app.run_state == "finished" and app.report is not None
        await pilot.press(*"[" * 5)
        assert app.grid.data.classes[0][3] == "dead" and "before the operation" in str(app.query_one("#status").render())
        assert "not diagnosed" not in str(app.query_one("#detail").render())


async def test_attaching_with_other_weights_is_refused(planted_dir, tiny_dir, workdir):
    assert cli(["operate", "--model", str(planted_dir), "--device", "cpu", "--targets", "0.3", "--corpus",
                str(workdir / "corpus.txt"), "--steps", "1", "--seq-len", "32", "--completions", "0",
                "--out", str(workdir / "run")]) == 0
    app = HeadSurgeonApp(model_ref=str(tiny_dir), attach=str(workdir / "run"), detach=False)
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await wait_idle(app, pilot)
        assert app.attached is None and any("other weights" in n.message for n in app._notifications)


async def test_a_sham_control_from_the_dialog_draws_its_curve_and_the_verdict(planted_dir, workdir):
    app = HeadSurgeonApp(model_ref=str(planted_dir), detach=False, prompts_path=str(workdir / "prompts.txt"))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await _sick_marked_dialog(app, pilot)
        app.screen.query_one("#field-control").value = True
        await _operate(app, pilot, {"corpus": str(workdir / "corpus.txt"), "steps": "2", "lr": "0.01", "seq_len": "32"})
        assert app.run_state == "finished" and app.verdict is not None
        report = __import__("json").loads((app.attached.run_dir / "report.json").read_text())
        assert report["job"]["control"] == "sham" and report["control"]["arm"] == "sham"
        assert len(app.control_ppls) == 3 and len(app.ppls) == 4  # sham: steps 0-2; surgery: before + steps 0-2
        assert app.query_one("#control-row").display
        shown = "\n".join(_summary_on_screen(app))
        assert "vs sham" in shown and "woken 2 / functional" in shown
        assert "(sham " in str(app.query_one("#status").render())


async def test_a_run_over_two_gpus_from_the_dialog_starts_torchrun_detached_and_is_followed(planted_dir, workdir):
    """GPUs 2 in the dialog: the workbench launches torchrun itself (here two CPU processes, gloo); rank 0 alone
    writes the events, and the workbench follows them like any other run's."""
    app = HeadSurgeonApp(model_ref=str(planted_dir), detach=False, prompts_path=str(workdir / "prompts.txt"))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await _sick_marked_dialog(app, pilot)
        for name, value in {"corpus": str(workdir / "corpus.txt"), **FIELDS, "nproc": "2"}.items():
            app.screen.query_one(f"#field-{name}").value = value
        await pilot.press("enter")
        await wait_idle(app, pilot)
        run_dir = app.attached.run_dir
        deadline = time.monotonic() + 240
        while app.run_state != "finished" and time.monotonic() < deadline:
            await pilot.pause(0.2)
        assert app.run_state == "finished", (run_dir / runner.RUNNER_LOG).read_text()[-2000:]
        assert app.recovery["targets"] == 2 and len(app.losses) == 2
        assert app.surgery_defaults["nproc"] == "2"
    report = json.loads((run_dir / "report.json").read_text())
    assert (report["world_size"], report["backend"]) == (2, "gloo")
    assert Session.load(run_dir / "session.json").world == {"world_size": 2, "backend": "gloo"}
    assert runner.RunSpec.load(run_dir).model["nproc"] == 2
    kinds = [json.loads(line)["kind"] for line in (run_dir / "events.jsonl").read_text().splitlines()]
    assert kinds.count("started") == 1 and kinds[-1] == "finished"


async def test_a_bad_gpu_count_in_the_dialog_is_a_notification(planted_dir, workdir):
    app = HeadSurgeonApp(model_ref=str(planted_dir), detach=False, prompts_path=str(workdir / "prompts.txt"))
    async with app.run_test(size=SIZE, notifications=True) as pilot:
        await _sick_marked_dialog(app, pilot)
        app.screen.query_one("#field-nproc").value = "two"
        await pilot.press("enter")
        await pilot.pause()
        assert app.attached is None
        assert any("GPUs must be a whole number" in n.message for n in app._notifications)
        assert app.surgery_defaults["nproc"] == "two"  # the dialog opens again as typed, to be corrected
