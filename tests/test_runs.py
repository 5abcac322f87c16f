"""Runs: the append-only event log, in-process and detached runners, states, cancel, resume after SIGKILL,
one workflow for the CLI and the workbench, and diagnosis settings that hold for the whole job."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from conftest import PLANTED

from engine import runner
from engine.errors import InputError
from engine.eventlog import LOG_FILE, EventLog, LogReader, read_events, read_records
from engine.events import EvalMetrics, PhaseChanged, RunFinished, StepMetrics
from engine.model import load_model
from engine.operation import PATCH_FILE, REPORT_FILE
from engine.patch import load_patch
from engine.prompts import builtin_prompts
from engine.session import Session
from engine.workflow import JobInputs, create_run, open_run, start
from tui.app import dialog_job_inputs
from tui.entry import main as cli

SMALL = dict(seq_len=32, grad_accum=2, lr=1e-2, completions=0, eval_blocks=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(builtin_prompts() * 4))
    return path


def _launch(planted_dir, corpus, root, **inputs):
    loaded = load_model(str(planted_dir), device="cpu")
    job = JobInputs(**{"targets": "0.3,2.1", "corpus": str(corpus), **SMALL, **inputs}).build_job(loaded.adapter)
    return loaded, create_run(loaded, job, root=root, device="cpu")


def _patch(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_patch(run_dir / PATCH_FILE)[0]


# ------------------------------------------------------------------------------------------ event log
def test_event_log_numbers_lines_and_skips_one_cut_short_by_a_crash(tmp_path):
    with EventLog(tmp_path) as log:
        for i in range(3):
            log.emit(PhaseChanged("phase", str(i)))
    path = tmp_path / LOG_FILE
    with open(path, "a") as fh:
        fh.write('{"seq": 3, "kind": "step", "st')  # the writer died mid-line
    with pytest.warns(UserWarning, match="skipped 1 damaged line"):
        records = read_records(path)
    assert [r["seq"] for r in records] == [0, 1, 2] and all("time" in r for r in records)
    with EventLog(tmp_path) as log:  # a resumed runner continues the numbering on a fresh line
        log.emit(PhaseChanged("phase", "after"))
    with pytest.warns(UserWarning):
        events = read_events(path)
    assert [e.detail for e in events] == ["0", "1", "2", "after"]
    assert json.loads(path.read_text().splitlines()[-1])["seq"] == 3


def test_two_readers_following_a_growing_log_each_see_every_event(tmp_path):
    path = tmp_path / LOG_FILE
    readers, seen = [LogReader(path), LogReader(path)], [[], []]
    with EventLog(tmp_path) as log:
        for i in range(5):
            log.emit(PhaseChanged("p", str(i)))
            for reader, got in zip(readers, seen):
                got += [r["detail"] for r in reader.read_new()]
    with open(path, "a") as fh:  # half a line: left for the next read until it is complete
        fh.write('{"seq": 5, "time": 0, "kind": "phase", "phase": "p", ')
        fh.flush()
        assert readers[0].read_new() == []
        fh.write('"detail": "5"}\n')
    for reader, got in zip(readers, seen):
        got += [r["detail"] for r in reader.read_new()]
    assert seen[0] == seen[1] == [str(i) for i in range(6)]


# ------------------------------------------------------------------------------- in-process runs
def test_in_process_run_logs_everything_and_its_session_does_not_grow_with_steps(planted_dir, corpus, tmp_path):
    sizes = {}
    for steps in (2, 6):
        _, launch = _launch(planted_dir, corpus, tmp_path / "runs", steps=steps, eval_every=1)
        report = start(launch, detach=False)
        status = runner.run_state(launch.run_dir)
        assert (status.state, status.step, status.total_steps) == ("finished", steps, steps)
        events = read_events(launch.run_dir / LOG_FILE)
        assert [e.step for e in events if isinstance(e, StepMetrics)] == list(range(1, steps + 1))
        assert isinstance(events[-1], RunFinished) and report["recovery"]["targets"] == 2
        session = Session.load(launch.run_dir / "session.json")
        assert session.status == "finished" and len(session.eval_points()) == steps + 2  # before, 0, 1..steps
        sizes[steps] = (launch.run_dir / "session.json").stat().st_size
    # Three times the steps and evaluations: the session is the same size to within a few digits.
    assert abs(sizes[6] - sizes[2]) < 100, sizes
    with pytest.raises(InputError, match="finished; there is nothing to cancel"):
        runner.cancel(launch.run_dir)


def test_max_len_holds_before_during_and_after_so_a_run_that_trains_nothing_drifts_nothing(planted_dir, corpus,
                                                                                           tmp_path, capsys):
    """A head in the last layer, re-initialised with lr 0: its output stays zero and nothing downstream
    exists, so no untouched head may move; a 16-token diagnosis before vs a 512-token one after would."""
    code = cli(["operate", "--model", str(planted_dir), "--device", "cpu", "--targets", "2.0", "--corpus", str(corpus),
                "--steps", "2", "--eval-every", "1", "--seq-len", "32", "--grad-accum", "2", "--lr", "0",
                "--completions", "0", "--max-len", "16", "--out", str(tmp_path / "run")])
    assert code == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "run" / REPORT_FILE).read_text())
    assert report["job"]["diagnosis"]["max_len"] == 16
    assert report["drift"]["drifted"] == 0
    before = torch.tensor(report["diagnosis_before"]["bos_mass"])
    after = torch.tensor(report["diagnosis_after"]["bos_mass"])
    before[2, 0] = after[2, 0] = 0
    assert torch.allclose(before, after, atol=1e-5)
    points = Session.load(tmp_path / "run").eval_points()
    assert points[0].label == "before" and torch.allclose(torch.tensor(points[-1].bos_mass)[:2],
                                                          torch.tensor(points[0].bos_mass)[:2], atol=1e-5)


def test_the_workbench_dialog_and_the_cli_build_the_same_job(planted_dir, corpus):
    from tui.entry import build_parser

    loaded = load_model(str(planted_dir), device="cpu")
    for recipe in ("default", "paper"):
        fields = {"corpus": str(corpus), "steps": "7", "lr": "0.001", "seq_len": "64", "seed": "3", "recipe": recipe}
        from_dialog = dialog_job_inputs(fields, set(PLANTED), {(1, 1)}, None).build_job(loaded.adapter)
        args = build_parser().parse_args(["operate", "--targets", "0.3,2.1", "--frozen", "1.1", "--corpus", str(corpus),
                                          "--steps", "7", "--lr", "0.001", "--seq-len", "64", "--seed", "3",
                                          "--recipe", recipe])
        from_cli = JobInputs.from_namespace(args).build_job(loaded.adapter)
        assert from_dialog.to_dict() == from_cli.to_dict() and from_cli.train.recipe == recipe
        assert from_cli.train.eval_every == 1 and from_cli.diagnosis.max_len == 512  # one set of defaults
    assert from_cli.train.slice_dtype == "bf16" and from_cli.plans[0].init == "xavier_uniform_block"


def test_existing_outputs_are_refused_before_any_work(planted_dir, corpus, tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "notes.txt").write_text("mine")
    (tmp_path / "s.json").write_text("{}")
    base = ["operate", "--model", str(planted_dir), "--device", "cpu", "--targets", "0.3", "--corpus", str(corpus),
            "--steps", "1"]
    for extra, message in ((["--out", str(tmp_path / "old")], "already exists"),
                           (["--out", str(tmp_path / "new"), "--session", str(tmp_path / "s.json")], "already exists"),
                           (["--out", str(tmp_path / "old"), "--overwrite"], "not one (no run.json)"),
                           (["--targets", "0.3,,x"], "bad head spec"),
                           (["--export", str(tmp_path / "old")], "already exists")):
        assert cli(base + extra) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert (tmp_path / "old" / "notes.txt").read_text() == "mine" and (tmp_path / "s.json").read_text() == "{}"
    assert not (tmp_path / "new").exists() and not Path("runs").exists()


@pytest.mark.parametrize("where", ["files", "log"])
def test_a_full_disk_mid_run_fails_in_one_line_and_keeps_the_last_checkpoint(planted_dir, corpus, tmp_path,
                                                                              monkeypatch, capsys, where):
    """The disk fills after a few checkpoints: under the checkpoint and state files (atomic writes) or
    under the event log. Either way one line, exit 2, and the last checkpoint intact."""
    import engine.atomic as atomic
    import engine.eventlog as eventlog

    _, launch = _launch(planted_dir, corpus, tmp_path / "runs", steps=6, eval_every=2)
    calls = {"n": 0}

    def full_after(limit, real):
        def write(*args):
            calls["n"] += 1
            if calls["n"] > limit:
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(*args)
        return write

    if where == "files":
        monkeypatch.setattr(atomic.os, "fsync", full_after(6, atomic.os.fsync))
    else:
        monkeypatch.setattr(eventlog.EventLog, "_append", full_after(25, eventlog.EventLog._append))
    assert cli(["resume", str(launch.run_dir)]) == 2
    err = capsys.readouterr().err
    assert "no space left" in err.lower() and len(err.strip().splitlines()) == 1, err
    monkeypatch.undo()
    status = runner.run_state(launch.run_dir)
    assert status.state in ("failed", "dead")  # a full log cannot record its own failure: it reads as dead
    assert status.state == "failed" or where == "log"
    best = launch.run_dir / "checkpoints" / "pass-1" / "best.safetensors"
    tensors, meta = load_patch(best)  # intact: its checksum holds
    assert meta["step"] >= 2 and not [p for p in launch.run_dir.rglob("*") if p.name.endswith(".tmp")]
    assert runner.session_state(Session.load(launch.run_dir)) == ("failed" if where == "files" else "interrupted")
    assert cli(["resume", str(launch.run_dir)]) == 0  # space again: the run goes on from its last state
    assert runner.run_state(launch.run_dir).state == "finished"


# ---------------------------------------------------------------------------------- detached runs
def _wait(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _last_step(run_dir: Path) -> int:
    steps = [r["step"] for r in read_records(run_dir / LOG_FILE, warn=False) if r["kind"] == "step"]
    return steps[-1] if steps else 0


def test_a_detached_run_outlives_a_hangup_and_after_sigkill_resumes_to_the_same_patch(planted_dir, corpus, tmp_path,
                                                                                     capsys):
    """`operate --detach` from a login shell; the shell's whole process group hangs up; the run goes on.
    Then its runner is killed mid-run, `runs` says dead, and `resume` finishes it with the patch an
    uninterrupted run makes."""
    import subprocess
    import sys

    run_dir = tmp_path / "runs" / "killed"
    operate = [sys.executable, "-m", "tui.entry", "operate", "--model", str(planted_dir), "--device", "cpu",
               "--targets", "0.3,2.1", "--corpus", str(corpus), "--steps", "40", "--eval-every", "4",
               "--seq-len", "32", "--grad-accum", "2", "--lr", "1e-2", "--completions", "0", "--eval-blocks", "4", "--detach",
               "--out", str(run_dir)]
    shell = subprocess.Popen(["bash", "-c", f"{subprocess.list2cmdline(operate)} && sleep 60"],
                             start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    _wait(lambda: runner.is_live(run_dir) and _last_step(run_dir) >= 1, what="the first step")
    os.killpg(shell.pid, signal.SIGHUP)  # the terminal closed: its whole process group hangs up
    shell.wait(timeout=30)
    assert "started in the background" in shell.stdout.read()
    pid = int((run_dir / runner.LOCK_FILE).read_text())
    assert os.getsid(pid) not in (os.getsid(0), shell.pid)  # the runner has a process session of its own
    step = _last_step(run_dir)
    _wait(lambda: _last_step(run_dir) > step, what="a step after the hangup")
    _wait(lambda: _last_step(run_dir) >= 9, what="a saved state")
    os.kill(pid, signal.SIGKILL)
    _wait(lambda: not runner.is_live(run_dir), what="the lock to go with the process")
    status = runner.run_state(run_dir)
    assert status.state == "dead" and status.step < 40, "the run finished before it could be killed"
    launch = open_run(run_dir)
    session = Session.load(launch.run_dir)
    assert session.status == "running" and runner.session_state(session) == "interrupted"
    assert cli(["runs", str(tmp_path / "runs")]) == 0
    assert "dead" in capsys.readouterr().out
    with pytest.raises(InputError, match="is dead; there is nothing to cancel: continue it with head-surgeon resume"):
        runner.cancel(launch.run_dir)

    assert cli(["resume", str(launch.run_dir)]) == 0
    assert runner.run_state(launch.run_dir).state == "finished"
    _, whole = _launch(planted_dir, corpus, tmp_path / "runs", steps=40, eval_every=4)
    start(whole, detach=False)
    a, b = _patch(whole.run_dir), _patch(launch.run_dir)
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    points = [p for p in open_run(launch.run_dir).session.eval_points() if p.label == "pass-1"]
    assert [p.step for p in points][-1] == 40


def test_cancel_stops_a_detached_run_at_a_step_and_skips_the_after_evaluation(planted_dir, corpus, tmp_path):
    """(That a cancelled run resumes to the same patch: test_operate.test_cancelled_run_resumes_to_the_same_patch.)"""
    _, launch = _launch(planted_dir, corpus, tmp_path / "runs", steps=5000, eval_every=2500)
    start(launch, detach=True)
    _wait(lambda: _last_step(launch.run_dir) >= 2, what="the first steps")
    assert "stop at its next step" in runner.cancel(launch.run_dir)
    _wait(lambda: not runner.is_live(launch.run_dir), what="the runner to stop")
    status = runner.run_state(launch.run_dir)
    assert status.state == "cancelled" and 2 <= status.step < 5000
    assert not (launch.run_dir / REPORT_FILE).exists()  # the after-evaluation was skipped
    events = read_events(launch.run_dir / LOG_FILE)
    assert not any(isinstance(e, PhaseChanged) and e.phase == "evaluate" for e in events)
    assert any(isinstance(e, EvalMetrics) and e.label == "before" for e in events)
    assert isinstance(events[-1], RunFinished) and events[-1].cancelled


def test_a_cancel_sent_the_moment_a_detached_run_starts_is_not_lost(planted_dir, corpus, tmp_path):
    _, launch = _launch(planted_dir, corpus, tmp_path / "runs", steps=5000, eval_every=2500)
    start(launch, detach=True)  # returns once the runner holds the lock, before its imports and model load
    runner.cancel(launch.run_dir)
    _wait(lambda: not runner.is_live(launch.run_dir), what="the runner to stop")
    status = runner.run_state(launch.run_dir)
    assert status.state == "cancelled" and status.step < 5, status
    assert not (launch.run_dir / runner.CANCEL_FILE).exists()  # consumed: a resume starts clean


def test_a_cancel_during_the_diagnosis_before_records_no_before_point(planted_dir, corpus, tmp_path):
    from engine.events import ListSink
    from engine.operation import run_job

    loaded, launch = _launch(planted_dir, corpus, tmp_path / "runs", steps=4)
    sink = ListSink()
    job = JobInputs(targets="0.3", corpus=str(corpus), **SMALL, steps=4).build_job(loaded.adapter)
    report = run_job(loaded, job, tmp_path / "r", sink=sink, cancelled=lambda: True)
    assert report["cancelled"] and not sink.of(EvalMetrics) and not sink.of(StepMetrics)
    assert sink.of(RunFinished)[0].cancelled


def test_overwrite_never_replaces_a_live_run_or_the_session_being_replayed(planted_dir, corpus, tmp_path, capsys):
    _, launch = _launch(planted_dir, corpus, tmp_path / "runs", steps=5000, eval_every=2500)
    start(launch, detach=True)
    try:
        assert cli(["operate", "--model", str(planted_dir), "--device", "cpu", "--targets", "0.3", "--corpus",
                    str(corpus), "--out", str(launch.run_dir), "--overwrite"]) == 2
        assert "is running: cancel it" in capsys.readouterr().err
        assert runner.is_live(launch.run_dir) and (launch.run_dir / "run.json").is_file()
    finally:
        runner.cancel(launch.run_dir)
        _wait(lambda: not runner.is_live(launch.run_dir), what="the runner to stop")
    assert cli(["replay", str(launch.run_dir / "session.json"), "--out", str(launch.run_dir), "--overwrite"]) == 2
    assert "holds the session being replayed" in capsys.readouterr().err
    # A finished or cancelled run directory is replaced only once the new run is set up.
    assert cli(["operate", "--model", str(planted_dir), "--device", "cpu", "--targets", "0.3", "--corpus",
                str(corpus), "--steps", "1", "--seq-len", "32", "--completions", "0", "--out", str(launch.run_dir),
                "--overwrite"]) == 0
    assert runner.run_state(launch.run_dir).state == "finished" and runner.run_state(launch.run_dir).step == 1
    assert not [p for p in launch.run_dir.parent.iterdir() if ".replaced-" in p.name]


def test_ctrl_c_stops_an_in_process_operate_at_a_step_boundary_within_seconds(planted_dir, corpus, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "tui.entry", "operate", "--model", str(planted_dir), "--device",
                             "cpu", "--targets", "0.3", "--corpus", str(corpus), "--steps", "5000", "--seq-len", "32",
                             "--grad-accum", "2", "--completions", "0", "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait(lambda: (out / LOG_FILE).is_file() and _last_step(out) >= 1, what="the first step")
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - started < 10 and proc.returncode == 130, stderr
    said = "".join(stdout.split())  # rich wraps long lines at the pipe's 80 columns
    assert "stoppingatthenextstep" in said and f"head-surgeonresume{out}" in said
    status = runner.run_state(out)
    assert status.state == "cancelled" and 1 <= status.step < 5000 and not (out / REPORT_FILE).exists()


def test_run_history_after_resuming_the_second_pass_keeps_the_first_and_one_before_point():
    from engine.events import HeadRecovery, Resumed, RunStarted
    from engine.runview import RunHistory

    def point(label, step):
        return EvalMetrics(step, 1.0, 2.7, 10.0 - step, {}, [[0.5]], [[0.1]], [[1.0]], [[0.2]], label=label)

    def steps(first, last, t0=0.0):
        return [StepMetrics(s, 4, 1.0 / s, 1e-3, 1.0, 100.0, t0 + (s - first + 1), 0) for s in range(first, last + 1)]

    history = RunHistory()
    events = [RunStarted(1), point("before", 0), PhaseChanged("pass-1"), point("pass-1", 0), *steps(1, 4),
              point("pass-1", 4), HeadRecovery(4, 1, 1, 1), PhaseChanged("pass-2"), point("pass-2", 0), *steps(1, 3),
              # the runner died in pass 2 after its state at step 2; a resume measures the base again
              RunStarted(2, resume=True), point("before", 0), PhaseChanged("pass-1", "already done"),
              Resumed("pass-2", 2), PhaseChanged("pass-2"), *steps(3, 4)]
    for e in events:
        history.apply(e)
    assert [(p.label, p.step) for p in history.points] == [("before", 0), ("pass-1", 0), ("pass-1", 4), ("pass-2", 0)]
    assert [(name, s) for name, s, _ in history.losses] == [("pass-1", s) for s in (1, 2, 3, 4)] + \
        [("pass-2", s) for s in (1, 2, 3, 4)]
    assert history.recoveries[("pass-1", 4)].woken == 1
    assert history.segment_start == 2 and history.eta_s() == 0.0  # this segment ran steps 3-4 of 4


def test_reading_a_log_from_its_end_gives_every_record_newest_first(tmp_path):
    from engine.eventlog import records_from_the_end

    with EventLog(tmp_path) as log:
        for i in range(300):
            log.emit(PhaseChanged("p", "x" * (i % 97)))  # lines of many lengths across small chunks
    with open(tmp_path / LOG_FILE, "a") as fh:
        fh.write('{"seq": 300, "kind": "ph')  # a line still being written is not a record
    got = [r["seq"] for r in records_from_the_end(tmp_path / LOG_FILE, chunk=64)]
    assert got == list(range(299, -1, -1))
