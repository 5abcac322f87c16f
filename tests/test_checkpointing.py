"""Activation checkpointing chosen by memory: the plan, the layers it switches, and the same patch in every mode."""

from __future__ import annotations

import json

import pytest
import torch

from engine.arch import adapter_for
from engine.checkpointing import apply_checkpointing, layer_bytes, plan_checkpointing
from engine.errors import InputError
from engine.patch import load_patch
from engine.prompts import builtin_prompts
from engine.train import TrainConfig
from engine.workflow import JobInputs
from helpers import run_in_process, tiny_model

GiB = 2**30


def _plan(mode: str, free: int, lowest: int = 4):
    return plan_checkpointing(mode, n_layer=24, lowest=lowest, hidden=2048, tokens=4096, dtype=torch.bfloat16,
                              free=free)


def test_auto_keeps_as_many_top_layers_as_free_memory_holds():
    per_layer = layer_bytes(2048, 4096, torch.bfloat16)
    assert per_layer == 20 * 2048 * 4096 * 2
    assert _plan("auto", 100 * GiB).mode == "none" and _plan("auto", 100 * GiB).checkpointed == []
    assert _plan("auto", 0).mode == "full" and _plan("auto", 0).checkpointed == list(range(4, 24))
    five = _plan("auto", int(5 * per_layer / 0.8) + 1)  # room for five layers' activations
    assert five.mode == "selective" and five.checkpointed == list(range(4, 19))  # the top five keep theirs
    assert five.asked == "auto" and five.layer_gib == round(per_layer / GiB, 4)


def test_explicit_modes_are_what_they_say_and_a_bad_one_is_refused():
    assert _plan("full", 100 * GiB).checkpointed == list(range(4, 24))
    assert _plan("none", 0).checkpointed == []
    assert _plan("selective", 100 * GiB).checkpointed == [4]  # recomputes at least one layer
    assert _plan("selective", 0).mode == "full"
    with pytest.raises(InputError, match="checkpointing must be one of"):
        _plan("some", 0)
    with pytest.raises(InputError, match="checkpointing must be one of"):
        TrainConfig(checkpointing="partial")


def test_recorded_jobs_from_before_the_modes_keep_what_they_ran():
    assert TrainConfig(gradient_checkpointing=True).checkpointing == "full"
    assert TrainConfig(gradient_checkpointing=False).checkpointing == "none"
    job = {"plans": [{"targets": "0.1"}], "train": {"gradient_checkpointing": False}}
    assert JobInputs.from_job(job).checkpointing == "none"
    assert JobInputs.from_job({"plans": [{"targets": "0.1"}], "train": {}}).checkpointing == "auto"


def test_selective_switches_only_the_planned_layers():
    model = tiny_model(n_layer=4)
    adapter = adapter_for(model)
    plan = plan_checkpointing("full", n_layer=4, lowest=1, hidden=32, tokens=64, dtype=torch.float32, free=0)
    plan.checkpointed, plan.mode = [1, 2], "selective"
    apply_checkpointing(model, adapter, plan)
    assert [block.gradient_checkpointing for block in adapter.blocks(model)] == [False, True, True, False]


def test_every_mode_gives_the_same_patch_and_the_report_says_which_ran(planted_dir, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(builtin_prompts() * 4))
    # auto on a machine with room for one layer's activations: selective
    monkeypatch.setattr("engine.train.free_bytes", lambda device: int(1.5 * layer_bytes(32, 32, torch.float32) / 0.8)
                        + 2 * 1024 * 320 * 4)  # the loss's reserve: 2 fp32 chunks of logits
    patches, ran = {}, {}
    for mode in ("full", "auto", "none"):
        out = tmp_path / mode
        done = run_in_process(capsys, "operate", "--model", planted_dir, "--device", "cpu", "--targets", "0.3,1.1",
                              "--corpus", corpus, "--steps", "2", "--seq-len", "32", "--grad-accum", "2", "--lr",
                              "1e-2", "--eval-blocks", "2", "--track-blocks", "0", "--completions", "0",
                              "--prefix-cache-gb", "0", "--checkpointing", mode, "--out", out)
        assert done.returncode == 0, done.stderr
        patches[mode] = load_patch(out / "patch.safetensors")[0]
        ran[mode] = json.loads((out / "report.json").read_text())["passes"][0]["checkpointing"]
    assert ran["full"]["checkpointed"] == [0, 1, 2] and ran["none"]["checkpointed"] == []
    assert ran["auto"] == {**ran["auto"], "mode": "selective", "asked": "auto", "checkpointed": [0, 1]}
    for mode in ("auto", "none"):
        assert all(torch.equal(patches["full"][k], patches[mode][k]) for k in patches["full"]), mode


def test_loss_chunk_tokens_reaches_the_training_and_is_recorded():
    from engine.cli import build_parser

    args = build_parser().parse_args(["operate", "--targets", "0.1", "--loss-chunk-tokens", "256"])
    inputs = JobInputs.from_namespace(args)
    config = inputs.train_config()
    assert config.loss_chunk_tokens == 256
    job = {"plans": [{"targets": "0.1"}], "train": {"loss_chunk_tokens": 256}}
    assert JobInputs.from_job(job).train_config().loss_chunk_tokens == 256
    with pytest.raises(InputError, match="loss chunks at least 1 token"):
        TrainConfig(loss_chunk_tokens=0)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["operate", "--targets", "0.1", "--checkpointing", "full", "--no-checkpointing"])
