"""The paper's recipe and measurements: block Xavier, bf16 slices, capped warm-up, partial steps, early stopping,
the tracked in-domain set and class counts per pass."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open
from conftest import PLANTED

from engine.arch import adapter_for
from engine.corpus import PackedCorpus
from engine.errors import InputError
from engine.evaluate import prompt_loss
from engine.events import EvalMetrics, ListSink, Notice
from engine.model import load_model
from engine.operation import PATCH_FILE, run_job
from engine.patch import load_patch
from engine.prompts import builtin_prompts
from engine.recipe import DEFAULT, PAPER, differences, recipe
from engine.surgery import SurgeryPlan, init_head_weights
from engine.tracked import TrackedSet, track_blocks
from engine.train import STATE_FILE, SurgeryRun, TrainConfig, step_blocks
from engine.workflow import JobInputs
from helpers import run_in_process, tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(builtin_prompts() * 4))
    return path


def _inputs(corpus, **kw) -> JobInputs:
    values = dict(targets="0.3,2.1", corpus=str(corpus), steps=4, eval_every=1, seq_len=32, grad_accum=2, lr=1e-2,
                  completions=0, eval_blocks=4, track_blocks=4)
    values.update(kw)
    return JobInputs(**values)


def _run(planted_dir, inputs: JobInputs, out, resume: bool = False):
    loaded = load_model(str(planted_dir), device="cpu")
    job = inputs.build_job(loaded.adapter)
    job.evaluation.ablation_blocks = 2
    sink = ListSink()
    return loaded, run_job(loaded, job, out, sink=sink, resume=resume), sink


def test_block_xavier_draws_the_whole_qkv_block_as_nn_init_does():
    model = tiny_model(hidden=64, n_head=4)  # d = 16: block bound sqrt(6/112), per-projection bound sqrt(6/80)
    adapter = adapter_for(model)
    block = init_head_weights(SurgeryPlan([(0, 1)], init="xavier_uniform_block", seed=3), adapter)[(0, 1)]
    split = init_head_weights(SurgeryPlan([(0, 1)], init="xavier_uniform", seed=3), adapter)[(0, 1)]
    fan_in, fan_out = torch.nn.init._calculate_fan_in_and_fan_out(torch.empty(3 * adapter.head_dim, 64))
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    assert block.shape == split.shape == (3 * adapter.head_dim, 64)
    assert 0.98 * bound < float(block.abs().max()) <= bound
    assert float(split.abs().max()) > 1.1 * bound  # q, k and v drawn separately: a wider range
    assert torch.equal(block, init_head_weights(SurgeryPlan([(0, 1)], init="xavier_uniform_block", seed=3),
                                                adapter)[(0, 1)])


def test_the_paper_recipe_fills_what_is_not_given_and_a_given_setting_wins(corpus):
    config = _inputs(corpus, recipe="paper", eval_every=None, steps=None, epochs=3).train_config()
    assert (config.recipe, config.slice_dtype, config.keep_partial_step, config.patience, config.select_on) == \
        ("paper", "bf16", True, 6, "tracked")
    assert config.eval_every is None  # by epochs: each epoch's end
    assert [config.warmup_steps(t) for t in (40, 399, 1000)] == [10, 99, 100]  # min(100, total // 4)
    assert TrainConfig(steps=100).warmup_steps(100) == 5 and TrainConfig().recipe == "default"
    job = _inputs(corpus, recipe="paper").build_job(adapter_for(tiny_model()))
    assert job.plans[0].init == "xavier_uniform_block" and job.train.eval_every == 1
    given = _inputs(corpus, recipe="paper", patience=0, slice_dtype="fp32", init="xavier_normal")
    assert (given.train_config().patience, given.train_config().slice_dtype) == (None, "fp32")
    assert given.build_job(adapter_for(tiny_model())).plans[0].init == "xavier_normal"
    default = _inputs(corpus).train_config()
    assert (default.slice_dtype, default.patience, default.select_on, default.keep_partial_step) == \
        (DEFAULT.slice_dtype, None, "heldout", False)
    assert set(differences("paper")) >= {"init", "slice_dtype", "warmup", "keep_partial_step", "patience", "select_on"}
    assert differences("default") == {} and recipe(None) is DEFAULT and recipe("paper") is PAPER
    with pytest.raises(InputError, match="unknown recipe 'papr': use one of default, paper"):
        _inputs(corpus, recipe="papr").train_config()
    with pytest.raises(InputError, match="needs one"):
        TrainConfig(select_on="tracked", track_blocks=0)
    with pytest.raises(InputError, match="at least 1"):
        _inputs(corpus, eval_every=0).train_config()
    with pytest.raises(InputError, match="at least 1"):
        TrainConfig(eval_every=0)
    # a warm-up share given under the paper recipe is not capped by the recipe's 100 steps; a cap given is kept
    assert _inputs(corpus, recipe="paper", warmup_frac=0.5).train_config().warmup_steps(405) == 202
    assert _inputs(corpus, recipe="paper", warmup_frac=0.5, warmup_max_steps=10).train_config().warmup_steps(405) == 10


def test_the_dialog_switching_a_loaded_session_to_another_recipe_takes_that_recipe_whole(corpus):
    from tui.app import dialog_job_inputs

    adapter = adapter_for(tiny_model())
    fields = {"corpus": str(corpus), "steps": "5", "lr": "0.001", "seq_len": "32", "seed": "0"}
    for old, new in (("paper", "default"), ("default", "paper")):
        base = JobInputs.from_job(_inputs(corpus, recipe=old).build_job(adapter).to_dict())
        switched = dialog_job_inputs({**fields, "recipe": new}, [(0, 3)], [], None, base).build_job(adapter)
        fresh = dialog_job_inputs({**fields, "recipe": new}, [(0, 3)], [], None).build_job(adapter)
        keys = ("recipe", "slice_dtype", "select_on", "patience", "warmup_frac", "warmup_max_steps", "keep_partial_step")
        assert {k: switched.train.__dict__[k] for k in keys} == {k: fresh.train.__dict__[k] for k in keys}
        assert switched.plans[0].init == fresh.plans[0].init == recipe(new).init
        kept = dialog_job_inputs({**fields, "recipe": old}, [(0, 3)], [], None, base).build_job(adapter)
        assert kept.train.slice_dtype == recipe(old).slice_dtype  # the same recipe keeps the session's settings


def test_a_recorded_paper_job_gives_back_the_same_inputs(corpus):
    inputs = _inputs(corpus, recipe="paper", patience=0, track_blocks=3)
    job = inputs.build_job(adapter_for(tiny_model()))
    again = JobInputs.from_job(job.to_dict()).build_job(adapter_for(tiny_model()))
    assert again.to_dict() == job.to_dict() and again.train.patience is None


def test_the_cli_recipe_flag_builds_the_same_job_as_the_inputs(planted_dir, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    done = run_in_process(capsys, "operate", "--model", planted_dir, "--device", "cpu", "--targets", "0.3",
                          "--corpus", corpus, "--recipe", "paper", "--steps", "2", "--seq-len", "32",
                          "--grad-accum", "2", "--eval-blocks", "2", "--track-blocks", "2", "--completions", "0",
                          "--no-keep-partial-step", "--out", out)
    assert done.returncode == 0, done.stderr
    import json

    report = json.loads((out / "report.json").read_text())
    train = report["job"]["train"]
    assert report["recipe"]["name"] == "paper" and "slice_dtype" in report["recipe"]["differs_from_default"]
    assert (train["slice_dtype"], train["select_on"], train["keep_partial_step"]) == ("bf16", "tracked", False)
    assert report["job"]["plans"][0]["init"] == "xavier_uniform_block"
    assert report["passes"][0]["selected_on"] == "tracked"
    bad = run_in_process(capsys, "operate", "--model", planted_dir, "--targets", "0.3", "--corpus", corpus,
                         "--track-texts", tmp_path / "missing.txt", "--out", tmp_path / "run2")
    assert bad.returncode != 0 and "track texts file" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run2").exists()


def test_an_epochs_partial_last_step_is_kept_and_every_block_trains_once():
    kept, dropped = TrainConfig(epochs=1, grad_accum=8, keep_partial_step=True), TrainConfig(epochs=1, grad_accum=8)
    assert (kept.steps_per_epoch(20), dropped.steps_per_epoch(20)) == (3, 2)
    blocks = torch.cat([step_blocks(kept, 20, s) for s in range(3)])
    assert len(step_blocks(kept, 20, 2)) == 4 and sorted(blocks.tolist()) == list(range(20))
    assert sorted(torch.cat([step_blocks(kept, 20, s) for s in range(3, 6)]).tolist()) == list(range(20))


def test_the_tracked_set_is_fixed_evenly_spaced_training_blocks():
    train = torch.arange(10).view(10, 1).repeat(1, 4)
    corpus = PackedCorpus(train, train[:1], 4, True, "t")
    assert track_blocks(corpus, 4)[:, 0].tolist() == [0, 3, 6, 9]
    assert len(track_blocks(corpus, 50)) == 10


def test_paper_recipe_trains_bf16_slices_selects_on_the_tracked_set_and_counts_classes(planted_dir, corpus, tmp_path):
    loaded, report, sink = _run(planted_dir, _inputs(corpus, recipe="paper", patience=0, control="sham"), tmp_path)
    tensors, _ = load_patch(tmp_path / PATCH_FILE)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}  # the slices trained in bf16
    with safe_open(str(tmp_path / "checkpoints" / "pass-1" / STATE_FILE), framework="pt") as fh:
        moments = [fh.get_tensor(k) for k in fh.keys() if k.startswith("opt.")]
    assert moments and {t.dtype for t in moments} == {torch.bfloat16}  # and so did AdamW's moments
    history = report["history"]
    assert all(p["tracked_ppl"] is not None and p["tracked_ppl"] > 1 for p in history)
    best = min((p for p in history if p["step"] > 0), key=lambda p: p["tracked_ppl"])
    assert report["passes"][0]["best_step"] == best["step"] and report["passes"][0]["selected_on"] == "tracked"
    assert report["passes"][0]["best_heldout_ppl"] == pytest.approx(best["heldout_ppl"])
    ppl = report["ppl"]
    assert ppl["tracked_before"] > 1 and ppl["tracked_after"] == pytest.approx(best["tracked_ppl"], rel=1e-4)
    # the sham arm's step 0 is the base model with the targets' slices rounded to bf16 (this model is fp32), and
    # the run says so
    assert report["control"]["history"][0]["tracked_ppl"] == pytest.approx(ppl["tracked_before"], rel=1e-3)
    assert any("rounded to bf16" in e.message for e in sink.of(Notice))
    assert [e.tracked_ppl for e in sink.of(EvalMetrics) if e.label == "pass-1"] == [p["tracked_ppl"] for p in history]
    counts = report["class_counts"]
    assert set(counts) == {"before", "pass-1", "after"} and "class_counts" in report["control"]
    assert counts["pass-1"] == counts["after"]  # the model pass 1 leaves is the model after, on the same prompts
    assert counts["before"]["paper"]["dead"] >= 2 and sum(counts["after"]["paper"].values()) == 3 * 4
    assert report["passes"][0]["class_counts"] == counts["pass-1"]


def test_early_stopping_ends_a_pass_that_stops_improving(planted_dir, corpus, tmp_path):
    # lr 0: every point after the re-initialisation measures the same perplexity, so none improves on step 1
    loaded, report, sink = _run(planted_dir, _inputs(corpus, steps=10, lr=0.0, patience=2), tmp_path)
    passed = report["passes"][0]
    assert passed["stopped_early"] and passed["steps_done"] == 3 and passed["best_step"] == 1
    assert [p["step"] for p in report["history"]] == [0, 1, 2, 3]
    assert any("early stop at step 3" in e.message for e in sink.of(Notice))
    # patience reached exactly at the last step is the end of the pass, not an early stop
    _, last, _ = _run(planted_dir, _inputs(corpus, steps=3, lr=0.0, patience=2), tmp_path / "last")
    assert last["passes"][0]["steps_done"] == 3 and not last["passes"][0]["stopped_early"]


def test_a_pass_interrupted_after_running_out_of_patience_trains_no_further_on_resume(planted_dir, corpus, tmp_path):
    loaded = load_model(str(planted_dir), device="cpu")
    job = _inputs(corpus, steps=10, lr=0.0, patience=2).build_job(loaded.adapter)
    job.evaluation.ablation_blocks = 2
    run = tmp_path / "run"
    original = SurgeryRun._out_of_patience

    def dies_on_stopping(self):  # the process dies between the stop and the pass's done marker
        if original(self):
            raise KeyboardInterrupt
        return False

    SurgeryRun._out_of_patience = dies_on_stopping
    try:
        with pytest.raises(KeyboardInterrupt):
            run_job(loaded, job, run)
    finally:
        SurgeryRun._out_of_patience = original
    _, resumed, _ = _run(planted_dir, _inputs(corpus, steps=10, lr=0.0, patience=2), run, resume=True)
    passed = resumed["passes"][0]
    assert passed["stopped_early"] and passed["steps_done"] == 3 and passed["best_step"] == 1


def test_the_kept_checkpoint_follows_the_selection_perplexity(planted_dir, corpus, tmp_path, monkeypatch):
    # the tracked set's loss (before, steps 0-4, after): lowest at step 1, while held-out falls on
    values = iter([2.0, 2.0, 1.0, 1.5, 1.5, 1.5, 1.0])  # and after: the kept step 1
    monkeypatch.setattr(TrackedSet, "loss", lambda self, model, batch_size=8: next(values))
    loaded, report, _ = _run(planted_dir, _inputs(corpus, select_on="tracked"), tmp_path)
    history, passed = report["history"], report["passes"][0]
    heldout_best = min((p for p in history if p["step"] > 0), key=lambda p: p["heldout_ppl"])["step"]
    assert heldout_best != 1  # the two perplexities disagree, so the test tells them apart
    assert passed["best_step"] == 1 and passed["best_selection_ppl"] == pytest.approx(math.exp(1.0))
    assert passed["best_heldout_ppl"] == pytest.approx(history[1]["heldout_ppl"])


def test_track_texts_measure_the_given_file(planted_dir, corpus, tmp_path):
    texts = tmp_path / "track.txt"
    texts.write_text("def f(x):\n    return x + 1\nThe cat sat on the mat and looked at the door.\n")
    loaded, report, _ = _run(planted_dir, _inputs(corpus, steps=1, track_texts=str(texts)), tmp_path / "run")
    assert report["tracked_set"].startswith("3 texts of ")
    base = load_model(str(planted_dir), device="cpu")
    ids = [base.tokenizer(t, truncation=True, max_length=32)["input_ids"] for t in texts.read_text().splitlines()]
    expected = math.exp(prompt_loss(base.model, ids, base.tokenizer.pad_token_id))
    assert report["ppl"]["tracked_before"] == pytest.approx(expected, rel=1e-4)
