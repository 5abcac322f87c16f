"""Sessions: atomic save and autosave, refusal without loss, resume after a crash, replay of the example."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PLANTED

from engine.corpus import CorpusSpec
from engine.diagnosis import diagnose
from engine.evaluate import EvalSettings
from engine.events import EvalMetrics, MultiSink
from engine.model import load_model, model_identity
from engine.operation import PATCH_FILE, SurgeryJob, run_job
from engine.patch import load_patch
from engine.prompts import builtin_prompts
from engine.session import Session, SessionRecorder
from engine.surgery import SurgeryPlan
from engine.train import TrainConfig

EXAMPLE = Path(__file__).resolve().parents[1] / "sessions" / "examples" / "organism-band-sinks.json"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "engine.cli", *map(str, args)], capture_output=True, text=True)


def test_replaying_the_organism_example_reproduces_its_recorded_run(tmp_path):
    done = cli("replay", EXAMPLE, "--device", "cpu", "--out", tmp_path / "replay")
    assert done.returncode == 0, done.stderr
    replay = Session.load(tmp_path / "replay" / "session.json")
    original = Session.load(EXAMPLE)
    assert replay.status == "finished" and replay.job == original.job
    assert [a["action"] for a in replay.actions] == ["replay", "diagnose", "operate"]
    ours, theirs = replay.eval_points(), original.eval_points()
    assert [p["step"] for p in ours] == [p["step"] for p in theirs] == [0, 2, 4]
    for a, b in zip(ours, theirs, strict=True):
        assert a["heldout_ppl"] == pytest.approx(b["heldout_ppl"], rel=1e-4)
        np.testing.assert_allclose(a["bos_mass"], b["bos_mass"], atol=1e-4)
    report = json.loads((tmp_path / "replay" / "report.json").read_text())
    assert report["recovery"]["woken"] == report["recovery"]["targets"] == 9


def test_operate_session_replays_to_the_same_patch(planted_dir, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(builtin_prompts() * 4))
    common = ["--device", "cpu"]
    done = cli("operate", "--model", planted_dir, *common, "--targets", "sick", "--corpus", corpus, "--steps", "3",
               "--seq-len", "32", "--grad-accum", "2", "--eval-every", "1", "--lr", "1e-2", "--completions", "0",
               "--out", tmp_path / "run", "--session", tmp_path / "s.json")
    assert done.returncode == 0, done.stderr
    session = Session.load(tmp_path / "s.json")
    assert session.status == "finished" and session.run_path() == (tmp_path / "run").resolve()
    assert session.job["plans"][0]["targets"] == "0.3,2.1"  # 'sick' resolved and recorded
    done = cli("replay", tmp_path / "s.json", *common, "--out", tmp_path / "replay")
    assert done.returncode == 0, done.stderr
    a, _ = load_patch(tmp_path / "run" / PATCH_FILE)
    b, _ = load_patch(tmp_path / "replay" / PATCH_FILE)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


@pytest.mark.parametrize("damage,message,commands", [
    (lambda text: text[: len(text) // 2], "truncated or corrupt", ("replay", "resume")),
    (lambda text: text.replace('"schema_version": 1', '"schema_version": 99'), "schema_version 99", ("replay", "resume")),
    (lambda text: text.replace('"weights_hash": "sha256:', '"weights_hash": "sha256:00'), "content hash differs",
     ("replay",)),  # (resume stops earlier: the example records no run directory)
    (lambda text: "[1, 2, 3]", "not a head-surgeon session", ("replay", "resume")),
])
def test_bad_sessions_are_refused_in_one_line_and_left_untouched(tmp_path, damage, message, commands):
    path = tmp_path / "bad.json"
    path.write_text(damage(EXAMPLE.read_text()))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    for command in commands:
        done = cli(command, path, "--device", "cpu", "--out", tmp_path / "out") if command == "replay" else \
            cli(command, path, "--device", "cpu")
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert not (tmp_path / "out").exists()


class Crash(Exception):
    pass


class CrashAfterEvals:
    """Simulates a killed process: raises once the run has evaluated `n` times."""

    def __init__(self, n):
        self.n, self.seen = n, 0

    def emit(self, event):
        if isinstance(event, EvalMetrics):
            self.seen += 1
            if self.seen > self.n:
                raise Crash()


def _job(corpus):
    return SurgeryJob([SurgeryPlan(PLANTED, seed=0)], CorpusSpec(str(corpus)),
                      TrainConfig(steps=6, seq_len=32, grad_accum=2, eval_every=1, eval_blocks=4, lr=1e-2),
                      EvalSettings(completion_prompts=0, ablation_blocks=2))


def test_a_crash_mid_run_leaves_a_loadable_session_that_resumes_to_the_same_patch(planted_dir, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(builtin_prompts() * 4))
    full = load_model(str(planted_dir), device="cpu")
    run_job(full, _job(corpus), tmp_path / "full", prompts=builtin_prompts())

    loaded = load_model(str(planted_dir), device="cpu")
    baseline = diagnose(loaded, builtin_prompts())
    session = Session(model=model_identity(loaded), job=_job(corpus).to_dict(), report=baseline.to_json(),
                      path=tmp_path / "s.json")
    session.set_run_dir(tmp_path / "run")
    session.status = "running"
    session.save()
    with pytest.raises(Crash):
        run_job(loaded, _job(corpus), tmp_path / "run", prompts=builtin_prompts(), baseline=baseline,
                sink=MultiSink(SessionRecorder(session), CrashAfterEvals(3)))
    saved = Session.load(tmp_path / "s.json")  # autosaved at each evaluation before the crash
    assert saved.status == "running" and [p["step"] for p in saved.eval_points()] == [0, 1, 2, 3]

    done = cli("resume", tmp_path / "s.json", "--device", "cpu")
    assert done.returncode == 0, done.stderr
    resumed = Session.load(tmp_path / "s.json")
    assert resumed.status == "finished" and resumed.eval_points()[-1]["step"] == 6
    a, _ = load_patch(tmp_path / "full" / PATCH_FILE)
    b, _ = load_patch(tmp_path / "run" / PATCH_FILE)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
