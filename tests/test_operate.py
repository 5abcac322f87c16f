"""A whole surgery job on tiny models: history, checkpoints, patch round trip, errors, NaN, cancel, resume."""

import json

import pytest
import torch
from conftest import PLANTED
from transformers import AutoModelForCausalLM

from engine.corpus import CorpusSpec
from engine.errors import InputError
from engine.evaluate import EvalSettings
from engine.events import Checkpoint, EvalMetrics, HeadRecovery, ListSink, RunFailed, StepMetrics
from engine.model import load_model
from engine.operation import PATCH_FILE, REPORT_FILE, SurgeryJob, run_job
from engine.patch import apply_head_tensors, load_patch
from engine.prompts import builtin_prompts
from engine.surgery import SurgeryPlan
from engine.train import TrainConfig, TrainingDiverged
from helpers import run_in_process


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(builtin_prompts() * 4))
    return path


def _job(corpus_file, steps=4, **train):
    config = dict(steps=steps, seq_len=32, grad_accum=2, eval_every=2, eval_blocks=4, lr=1e-2, seed=0)
    config.update(train)
    return SurgeryJob([SurgeryPlan(PLANTED, frozen=[(0, 2)], seed=0)], CorpusSpec(str(corpus_file)),
                      TrainConfig(**config), EvalSettings(completion_prompts=1, max_new_tokens=4, ablation_blocks=2))


def _run(planted_dir, corpus_file, out, **kw):
    loaded = load_model(str(planted_dir), device="cpu")
    sink = ListSink()
    report = run_job(loaded, kw.pop("job", None) or _job(corpus_file), out, sink=sink, **kw)
    return loaded, report, sink


def test_job_writes_history_recovery_patch_and_report(planted_dir, corpus_file, tmp_path):
    loaded, report, sink = _run(planted_dir, corpus_file, tmp_path)
    assert [p["step"] for p in report["history"]] == [0, 2, 4]
    assert set(report["history"][-1]["targets"]) == {"0.3", "2.1"}
    rec = report["recovery"]
    assert rec["targets"] == 2 and rec["woken"] == 2  # the planted heads put > 0.99 on BOS before
    assert all(e["bos_mass_before"] > 0.95 > e["bos_mass"] for e in rec["per_head"].values())
    assert report["drift"]["untouched_heads"] == 3 * 4 - 2
    assert len(report["mlp_dormancy"]["after"]) == 3 and len(report["completions"]["after"]) == 1
    assert len(report["mlp_weight_dormancy"]["before"]) == 3 and len(report["mlp_weight_dormancy"]["after"]) == 3
    assert json.loads((tmp_path / REPORT_FILE).read_text())["schema_version"] == 1
    steps = sink.of(StepMetrics)
    assert [e.step for e in steps] == [1, 2, 3, 4] and all(e.loss > 0 for e in steps)
    points = sink.of(EvalMetrics)  # the model before the operation first, then every evaluation of the pass
    assert [(p.label, p.step) for p in points] == [("before", 0), ("pass-1", 0), ("pass-1", 2), ("pass-1", 4)]
    assert points[0].bos_mass[0][3] > 0.95 and points[0].heldout_ppl == pytest.approx(report["ppl"]["heldout_before"])
    assert len(sink.of(HeadRecovery)) == 3
    assert any(e.best for e in sink.of(Checkpoint))
    # The patch holds only the targets' slices and names its base model and plan.
    tensors, meta = load_patch(tmp_path / PATCH_FILE)
    assert sorted(tensors) == sorted(f"layer.{l}.head.{h}.{part}" for l, h in PLANTED
                                     for part in ("qkv_weight", "qkv_bias", "dense_weight"))
    assert meta["base_model"]["weights_hash"].startswith("sha256:")
    assert meta["job"]["plans"][0]["targets"] == "0.3,2.1"
    # Patch round trip: stock base + patch equals the model the job left behind, bit for bit.
    fresh = load_model(str(planted_dir), device="cpu")
    apply_head_tensors(fresh.model, fresh.adapter, tensors)
    for (name, a), b in zip(fresh.model.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_second_pass_starts_from_the_first_pass_best_checkpoint(planted_dir, corpus_file, tmp_path):
    first, second = SurgeryPlan([PLANTED[0]], seed=0), SurgeryPlan([PLANTED[1]], seed=1)
    job = _job(corpus_file)
    job.plans = [first, second]
    loaded, report, _ = _run(planted_dir, corpus_file, tmp_path, job=job)
    assert [p["plan"]["targets"] for p in report["passes"]] == ["0.3", "2.1"]
    best1, meta1 = load_patch(report["passes"][0]["best_checkpoint"])
    assert meta1["pass"] == "pass-1"
    # Pass 2 trained on top of pass 1's best slices: the final model holds them unchanged.
    qkv = loaded.adapter.qkv(loaded.model, 0)
    assert torch.equal(qkv.weight[loaded.adapter.qkv_rows(3)], best1["layer.0.head.3.qkv_weight"])
    tensors, _ = load_patch(tmp_path / PATCH_FILE)
    assert {k.rsplit(".", 1)[0] for k in tensors} == {"layer.0.head.3", "layer.2.head.1"}
    assert report["recovery"]["targets"] == 2 and len(report["history"]) == 6


def test_cli_apply_exports_a_loadable_model_and_refuses_other_weights(planted_dir, tiny_dir, corpus_file, tmp_path,
                                                                       capsys):
    loaded, _, _ = _run(planted_dir, corpus_file, tmp_path / "run")
    patch = tmp_path / "run" / PATCH_FILE

    def apply(model, patch_file, out):
        return run_in_process(capsys, "apply", "--model", model, "--patch", patch_file, "--out", out)

    done = apply(planted_dir, patch, tmp_path / "exp")
    assert done.returncode == 0, done.stderr
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exp")
    for (name, a), b in zip(exported.state_dict().items(), loaded.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    bad = apply(tiny_dir, patch, tmp_path / "exp2")
    assert bad.returncode == 2 and "content hash differs" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "exp2").exists()
    again = apply(planted_dir, patch, tmp_path / "exp")  # an existing --out, as operate: refused before loading
    assert again.returncode == 2 and "already exists" in again.stderr
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(patch.read_bytes()[:100])
    bad = apply(planted_dir, corrupt, tmp_path / "exp3")
    assert bad.returncode == 2 and "damaged" in bad.stderr


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(planted_dir, corpus_file, tmp_path):
    loaded = load_model(str(planted_dir), device="cpu")
    calls = {"n": 0}

    def poison(module, args, output):  # the final layer norm returns NaN once training is under way
        calls["n"] += module.training
        return output * float("nan") if calls["n"] > 6 else output

    loaded.model.transformer.ln_f.register_forward_hook(poison)
    sink = ListSink()
    job = _job(corpus_file, steps=12, eval_every=1)
    with pytest.raises(TrainingDiverged, match="loss became nan"):
        run_job(loaded, job, tmp_path, sink=sink)
    failed = sink.of(RunFailed)
    assert len(failed) == 1 and failed[0].last_good_checkpoint
    tensors, meta = load_patch(failed[0].last_good_checkpoint)
    assert meta["step"] >= 1 and all(torch.isfinite(t).all() for t in tensors.values())


PAPER_TRAIN = dict(slice_dtype="bf16", select_on="tracked", track_blocks=4, patience=4, keep_partial_step=True,
                   warmup_frac=0.25, warmup_max_steps=100, recipe="paper")


@pytest.mark.parametrize("recipe", [{}, PAPER_TRAIN], ids=["default", "paper"])
def test_cancelled_run_resumes_to_the_same_patch(planted_dir, corpus_file, tmp_path, recipe):
    job = lambda: _job(corpus_file, steps=6, eval_every=1, **recipe)  # noqa: E731
    _, full, _ = _run(planted_dir, corpus_file, tmp_path / "full", job=job())
    steps = {"n": 0}

    class CountingSink(ListSink):
        def emit(self, event):
            super().emit(event)
            if isinstance(event, StepMetrics):
                steps["n"] += 1

    loaded = load_model(str(planted_dir), device="cpu")
    part = run_job(loaded, job(), tmp_path / "part", sink=CountingSink(),
                   cancelled=lambda: steps["n"] >= 3)
    assert part["cancelled"] and part["passes"][0]["steps_done"] == 3
    _, resumed, _ = _run(planted_dir, corpus_file, tmp_path / "part", job=job(), resume=True)
    assert not resumed["cancelled"]
    assert [p["step"] for p in resumed["history"]] == [p["step"] for p in full["history"]]
    a, _ = load_patch(tmp_path / "full" / PATCH_FILE)
    b, _ = load_patch(tmp_path / "part" / PATCH_FILE)
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert resumed["passes"][0]["best_step"] == full["passes"][0]["best_step"]


def test_corpus_errors_are_one_line(planted_dir, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    for source, message in ((str(tmp_path / "missing.txt"), "does not exist"), (str(empty), "is empty")):
        done = run_in_process(capsys, "operate", "--model", planted_dir, "--device", "cpu", "--targets", "0.3",
                              "--corpus", source, "--steps", "1", "--out", tmp_path / "out")
        assert done.returncode == 2, done.stderr
        assert message in done.stderr and "Traceback" not in done.stderr
    with pytest.raises(InputError, match="not both"):
        TrainConfig(steps=1, epochs=1)


def test_the_patch_is_the_kept_checkpoint_when_later_steps_are_worse(planted_dir, corpus_file, tmp_path):
    """A learning rate that overshoots: held-out perplexity is best at an early point, and the patch (and the
    model the job leaves) must be that checkpoint, not the last step's slices."""
    job = _job(corpus_file, steps=6, eval_every=1, lr=3.0, warmup_frac=0.0)
    loaded, report, _ = _run(planted_dir, corpus_file, tmp_path, job=job)
    best = report["passes"][0]["best_step"]
    assert 0 < best < 6, "the test needs a kept checkpoint before the last step"
    kept, _ = load_patch(tmp_path / "checkpoints" / "pass-1" / "best.safetensors")
    last, _ = load_patch(tmp_path / "checkpoints" / "pass-1" / "step-6.safetensors")
    patch, _ = load_patch(tmp_path / PATCH_FILE)
    assert all(torch.equal(patch[k], kept[k]) for k in kept)
    assert not all(torch.equal(patch[k], last[k]) for k in last)
