"""The frozen-prefix cache: later epochs skip the frozen layers below the lowest target, with the same patch."""

from __future__ import annotations

import pytest
import torch

from engine.arch import adapter_for
from engine.events import ListSink
from engine.model import load_model
from engine.operation import PATCH_FILE, run_job
from engine.patch import load_patch
from engine.prefix_cache import PrefixCache, prefix_dropout
from engine.prompts import builtin_prompts
from engine.workflow import JobInputs
from helpers import plant_collapse, save_model, tiny_family_model, tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(builtin_prompts()[:12]))
    return path


def _run(planted_dir, corpus, out, micro_batch=1, **kw):
    loaded = load_model(str(planted_dir), device="cpu")
    job = JobInputs(targets="2.1,2.3", corpus=str(corpus), epochs=3, seq_len=32, grad_accum=2, lr=1e-2, completions=0,
                    eval_blocks=2, eval_every=1000, track_blocks=2, micro_batch=micro_batch).build_job(loaded.adapter)
    job.evaluation.ablation_blocks = 2
    job.train.checkpointing = "none"  # auto's memory probe (engine.saved_memory) would add its forwards to the count
    for name, value in kw.items():
        setattr(job.train, name, value)
    calls = {"n": 0}
    first = loaded.adapter.blocks(loaded.model)[0]
    handle = first.register_forward_hook(lambda m, a, o: calls.__setitem__("n", calls["n"] + 1) if m.training else None)
    try:
        report = run_job(loaded, job, out, sink=ListSink())
    finally:
        handle.remove()
    return report, calls["n"]


def _same_patch(a_dir, b_dir) -> bool:
    a, _ = load_patch(a_dir / PATCH_FILE)
    b, _ = load_patch(b_dir / PATCH_FILE)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_later_epochs_skip_the_frozen_prefix_and_give_the_same_patch(planted_dir, corpus, tmp_path):
    cached, prefix_calls = _run(planted_dir, corpus, tmp_path / "cached")
    plain, plain_calls = _run(planted_dir, corpus, tmp_path / "plain", prefix_cache_gb=0.0)
    info = cached["passes"][0]["prefix_cache"]
    assert plain["passes"][0]["prefix_cache"] is None
    assert info["layers_skipped"] == 2 and 0 < info["blocks_kept"] <= cached["corpus"]["train_blocks"]
    # a block is computed on its first visit and served on every later one, and layer 0 runs (one block a
    # micro-batch) only for the computed visits
    visits = 2 * cached["passes"][0]["steps_done"]  # grad accum 2 micro-batches of one block a step
    assert info["block_visits_computed"] == info["blocks_kept"]
    assert info["block_visits_computed"] + info["block_visits_served"] == visits
    assert info["block_visits_served"] > visits / 2
    assert prefix_calls == info["block_visits_computed"] and plain_calls == visits
    assert _same_patch(tmp_path / "cached", tmp_path / "plain")
    assert [p["heldout_ppl"] for p in cached["history"]] == [p["heldout_ppl"] for p in plain["history"]]


@pytest.mark.parametrize("family", ["mpt", "falcon"])
def test_the_cache_gives_the_same_patch_for_every_family(family, corpus, tmp_path):
    model = tiny_family_model(family)
    plant_collapse(model, [(2, 1)])
    directory = save_model(model, tmp_path / family)
    cached, _ = _run(directory, corpus, tmp_path / "cached")
    _run(directory, corpus, tmp_path / "plain", prefix_cache_gb=0.0)
    assert cached["passes"][0]["prefix_cache"]["block_visits_served"] > 0
    assert _same_patch(tmp_path / "cached", tmp_path / "plain")


@pytest.mark.parametrize("setting", [{"micro_batch": 2}, {"prefix_cache_where": "host"}], ids=["micro-batch-2", "host"])
def test_the_cache_gives_the_same_patch_with_micro_batches_and_in_host_memory(planted_dir, corpus, tmp_path, setting):
    cached, _ = _run(planted_dir, corpus, tmp_path / "cached", **setting)
    plain_setting = {**setting, "prefix_cache_gb": 0.0}
    _run(planted_dir, corpus, tmp_path / "plain", **plain_setting)
    assert cached["passes"][0]["prefix_cache"]["block_visits_served"] > 0
    assert _same_patch(tmp_path / "cached", tmp_path / "plain")


def test_the_budget_bounds_what_is_kept_and_the_rest_is_computed(planted_dir, corpus, tmp_path):
    block_bytes = 32 * 32 * 4  # seq len x hidden x fp32
    report, _ = _run(planted_dir, corpus, tmp_path / "small", prefix_cache_gb=3.5 * block_bytes / 2**30)
    info = report["passes"][0]["prefix_cache"]
    assert info["blocks_kept"] == 3 and info["bytes"] == 3 * block_bytes


def test_no_cache_where_it_would_not_be_exact_or_never_read():
    model = tiny_model()
    adapter = adapter_for(model)
    kw = dict(budget_gb=1.0, where="device", steps_per_epoch=5)
    assert PrefixCache.for_run(model, adapter, 1, total_steps=10, **kw) is not None
    assert PrefixCache.for_run(model, adapter, 0, total_steps=10, **kw) is None  # nothing below layer 0
    assert PrefixCache.for_run(model, adapter, 1, total_steps=5, **kw) is None  # one epoch: nothing is read back
    model.config.hidden_dropout = 0.1
    assert prefix_dropout(model.config) == 0.1
    assert PrefixCache.for_run(model, adapter, 1, total_steps=10, **kw) is None  # dropout: the prefix is not fixed


def test_the_cli_flags_reach_the_training_settings_and_a_recorded_job_keeps_them():
    from tui.entry import build_parser

    args = build_parser().parse_args(["operate", "--targets", "1.1", "--prefix-cache-gb", "0.5",
                                      "--prefix-cache-where", "host"])
    train = JobInputs.from_namespace(args).train_config()
    assert (train.prefix_cache_gb, train.prefix_cache_where) == (0.5, "host")
    job = JobInputs.from_namespace(args).build_job(adapter_for(tiny_model()))
    again = JobInputs.from_job(job.to_dict()).train_config()
    assert (again.prefix_cache_gb, again.prefix_cache_where) == (0.5, "host")
