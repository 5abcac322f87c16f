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
from helpers import tiny_model


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(builtin_prompts()[:12]))
    return path


def _run(planted_dir, corpus, out, **kw):
    loaded = load_model(str(planted_dir), device="cpu")
    job = JobInputs(targets="2.1,2.3", corpus=str(corpus), epochs=3, seq_len=32, grad_accum=2, lr=1e-2, completions=0,
                    eval_blocks=2, eval_every=1000, track_blocks=2).build_job(loaded.adapter)
    job.evaluation.ablation_blocks = 2
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


def test_later_epochs_skip_the_frozen_prefix_and_give_the_same_patch(planted_dir, corpus, tmp_path):
    cached, prefix_calls = _run(planted_dir, corpus, tmp_path / "cached")
    plain, plain_calls = _run(planted_dir, corpus, tmp_path / "plain", prefix_cache_gb=0.0)
    info = cached["passes"][0]["prefix_cache"]
    n_train = cached["corpus"]["train_blocks"]
    assert plain["passes"][0]["prefix_cache"] is None
    assert info["layers_skipped"] == 2 and info["blocks_kept"] == n_train > 0
    # a block is computed on its first visit and served on every later one, and layer 0 runs (one block a
    # micro-batch) only for the computed visits
    visits = 3 * cached["passes"][0]["steps_done"] // 3 * 2  # 3 epochs x steps x grad accum 2
    assert info["block_visits_computed"] == info["blocks_kept"]
    assert info["block_visits_computed"] + info["block_visits_served"] == visits
    assert info["block_visits_served"] > visits / 2
    assert prefix_calls == info["block_visits_computed"] and plain_calls == visits
    a, _ = load_patch(tmp_path / "cached" / PATCH_FILE)
    b, _ = load_patch(tmp_path / "plain" / PATCH_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p["heldout_ppl"] for p in cached["history"]] == [p["heldout_ppl"] for p in plain["history"]]


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
