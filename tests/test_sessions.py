"""Sessions: small files that point at their run's log, refusal without loss, replay of the shipped example
(schema 1, still readable) and of a session the CLI wrote."""

import json
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from engine.operation import PATCH_FILE
from engine.patch import load_patch
from engine.prompts import builtin_prompts
from engine.session import Session
from engine.train import TrainConfig
from tui.entry import main

EXAMPLE = Path(__file__).resolve().parents[1] / "sessions" / "examples" / "organism-band-sinks.json"


def cli(*args):
    """The real entry point in a subprocess (one test per command uses it; the rest run in-process)."""
    return subprocess.run([sys.executable, "-m", "tui.entry", *map(str, args)], capture_output=True, text=True)


def test_replaying_the_organism_example_reproduces_its_recorded_run(tmp_path):
    before = (EXAMPLE.read_bytes(), EXAMPLE.stat().st_mtime_ns)
    done = cli("replay", EXAMPLE, "--device", "cpu", "--out", tmp_path / "replay")
    assert done.returncode == 0, done.stderr
    assert (EXAMPLE.read_bytes(), EXAMPLE.stat().st_mtime_ns) == before  # a loaded session is never written
    replay = Session.load(tmp_path / "replay" / "session.json")
    original = Session.load(EXAMPLE)
    assert replay.status == "finished" and replay.derived_from == str(EXAMPLE.resolve())
    assert replay.job["plans"] == original.job["plans"]
    # every recorded training setting as recorded; settings newer than the session at their defaults
    defaults = asdict(TrainConfig(steps=1))
    recorded = dict(original.job["train"])
    if "gradient_checkpointing" in recorded:  # recorded before the modes: True ran full checkpointing
        recorded.update(checkpointing="full" if recorded["gradient_checkpointing"] else "none",
                        gradient_checkpointing=None)
    assert replay.job["train"] == {**{k: v for k, v in defaults.items() if k not in ("steps", "epochs")}, **recorded}
    assert replay.job["train"]["recipe"] == "default" and "recipe" not in original.job["train"]
    assert [a["action"] for a in replay.actions][-2:] == ["diagnose", "replay"]
    ours = [p for p in replay.eval_points() if p.label != "before"]
    theirs = original.eval_points()
    assert [p.step for p in ours] == [p.step for p in theirs] == [0, 2, 4]
    for a, b in zip(ours, theirs, strict=True):
        assert a.heldout_ppl == pytest.approx(b.heldout_ppl, rel=1e-4)
        np.testing.assert_allclose(a.bos_mass, b.bos_mass, atol=1e-4)
    report = json.loads((tmp_path / "replay" / "report.json").read_text())
    # Nine BOS-sink heads of the bundled organism (L1, L2 and L5, all in H9-H15) wake in four steps.
    rec = report["recovery"]
    assert rec["woken"] == rec["targets"] == 9 and all(e["bos_mass_before"] > 0.5 for e in rec["per_head"].values())
    assert [p["step"] for p in report["history"]] == [0, 2, 4] and "Recovery: woken 9" in done.stdout


def test_operate_session_replays_to_the_same_patch(planted_dir, tmp_path):
    corpus = tmp_path / "text.txt"
    corpus.write_text("\n\n".join(builtin_prompts() * 4))
    common = ["--device", "cpu"]
    code = main(["operate", "--model", str(planted_dir), *common, "--targets", "sick", "--corpus", str(corpus),
                 "--steps", "3", "--seq-len", "32", "--grad-accum", "2", "--eval-every", "1", "--lr", "1e-2",
                 "--completions", "0", "--out", str(tmp_path / "run"), "--session", str(tmp_path / "s.json")])
    assert code == 0
    session = Session.load(tmp_path / "s.json")
    assert session.status == "finished" and session.run_path() == (tmp_path / "run").resolve()
    assert session.job["plans"][0]["targets"] == "0.3,2.1"  # 'sick' resolved and recorded
    assert "events" not in json.loads((tmp_path / "s.json").read_text())  # the log lives in the run directory
    assert main(["replay", str(tmp_path / "s.json"), *common, "--out", str(tmp_path / "replay")]) == 0
    a, _ = load_patch(tmp_path / "run" / PATCH_FILE)
    b, _ = load_patch(tmp_path / "replay" / PATCH_FILE)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


@pytest.mark.parametrize("damage,message,commands", [
    (lambda text: text[: len(text) // 2], "truncated or corrupt", ("replay", "resume")),
    (lambda text: text.replace('"schema_version": 1', '"schema_version": 99'), "schema_version 99", ("replay", "resume")),
    (lambda text: text.replace('"weights_hash": "sha256:', '"weights_hash": "sha256:00'), "content hash differs",
     ("replay",)),  # (resume stops earlier: the example records no run directory)
    (lambda text: text, "has no run to continue", ("resume",)),
    (lambda text: "[1, 2, 3]", "not a head-surgeon session", ("replay", "resume")),
])
def test_bad_sessions_are_refused_in_one_line_and_left_untouched(tmp_path, damage, message, commands, capsys):
    path = tmp_path / "bad.json"
    path.write_text(damage(EXAMPLE.read_text()))
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    for command in commands:
        argv = [command, str(path)] + (["--device", "cpu", "--out", str(tmp_path / "out")] if command == "replay" else [])
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["bloom-1b7-two-pass", "bloom-1b7-h5-extension"])
def test_the_shipped_bloom_1b7_plans_resolve_against_a_diagnosis_of_that_shape(name):
    """The paper's plans are kept as words (`5-22.9-15&sick`): they resolve against a diagnosis of a
    24 x 16 model, target only its sick heads inside the band and freeze the rest of the band."""
    from transformers import BloomConfig

    from engine.arch import adapter_for
    from engine.operation import SurgeryJob
    from engine.report import HeadReport

    session = Session.load(EXAMPLE.parent / f"{name}.json")
    adapter = adapter_for(BloomConfig(n_layer=24, n_head=16, hidden_size=64))
    bos = np.zeros((24, 16))
    bos[5:23, 12:16] = 0.97  # dead heads inside both bands' layers
    bos[10, 5] = 0.7
    flat = np.full((24, 16), 2.0)
    report = HeadReport("bloom-1b7", 24, 16, adapter.slopes, bos, flat, np.full((24, 16), 0.1), np.full((24, 16), 0.2))
    job = SurgeryJob.from_dict(session.job, adapter, report=report)
    first = job.plans[0]
    band_sick = {(l, h) for l in range(5, 23) for h in range(9, 16) if report.classes[l, h] in ("bos-sink", "dead")}
    assert band_sick <= set(first.targets) and all(5 <= l <= 22 for l, _ in first.targets + first.frozen)
    assert not set(first.targets) & set(first.frozen)
    if name == "bloom-1b7-two-pass":  # pass 2 waits for pass 1's best checkpoint, as the paper built it
        assert len(job.plans) == 1 and job.deferred["targets"] == "sick,!5-22.9-15"
    else:  # the paper's extension: the band's sinks and all 18 H5 heads of layers 5-22, from stock, one pass
        assert {(l, 5) for l in range(5, 23)} <= set(first.targets) and job.deferred is None
