"""Activation checkpointing chosen by memory: the plan, the layers it switches, and the same patch in every mode."""

from __future__ import annotations

import json

import pytest
import torch

from engine.arch import adapter_for
from engine.arch import base_model
from engine.checkpointing import apply_checkpointing, layer_bytes, optimizer_bytes, plan_checkpointing
from engine.fastpath import fast_kernels
from engine.saved_memory import LayerBytes, SavedBytes, measure_saved_bytes
from engine.surgery import SurgeryPlan, operate
from engine.errors import InputError
from engine.patch import load_patch
from engine.prompts import builtin_prompts
from engine.train import TrainConfig
from engine.workflow import JobInputs
from helpers import run_in_process, tiny_family_model, tiny_model

GiB, MiB = 2**30, 2**20


def _plan(mode: str, free: int, lowest: int = 4, saved: SavedBytes | None = None, transient: int = 0):
    return plan_checkpointing(mode, n_layer=24, lowest=lowest, hidden=2048, tokens=4096, dtype=torch.bfloat16,
                              free=free, saved=saved, transient=transient)


def test_auto_keeps_as_many_top_layers_as_free_memory_holds():
    per_layer = layer_bytes(2048, 4096, torch.bfloat16)
    assert per_layer == 20 * 2048 * 4096 * 2
    inputs = 2048 * 4096 * 2  # what a checkpointed layer keeps: its input
    assert _plan("auto", 100 * GiB).mode == "none" and _plan("auto", 100 * GiB).checkpointed == []
    assert _plan("auto", 0).mode == "full" and _plan("auto", 0).checkpointed == list(range(4, 24))
    # five layers' activations, the other fifteen's inputs, and one layer more for backward to work in
    room = 5 * per_layer + 15 * inputs + per_layer
    five = _plan("auto", room * 5 // 4)  # exactly the room for five (0.8 x free)
    assert five.mode == "selective" and five.checkpointed == list(range(4, 19))  # the top five keep theirs
    assert five.asked == "auto" and five.layer_gib == round(per_layer / GiB, 4) and five.estimate == "formula"
    assert five.kept_bytes == room
    assert _plan("auto", room * 5 // 4 - 1).checkpointed == list(range(4, 20))  # a byte short of five: four


def test_a_measured_plan_keeps_what_fits_of_each_layers_own_bytes():
    # measured for one 512-token sequence and for two; the plan is for micro-batches of 8 sequences (4096 tokens)
    one = LayerBytes([0] * 4 + [100 * MiB] * 19 + [170 * MiB], shared=8 * MiB, outside=4 * MiB)
    two = LayerBytes([0] * 4 + [200 * MiB] * 19 + [330 * MiB], shared=16 * MiB, outside=8 * MiB)
    saved = SavedBytes(one, two, seq_len=512)  # the top layer holds a target: 10 MiB of slices, whatever the batch
    eight = saved.for_tokens(4096)
    assert eight.per_layer[23] == 10 * MiB + 8 * 160 * MiB and eight.per_layer[4] == 800 * MiB
    assert eight.shared == 64 * MiB and eight.outside == 32 * MiB and eight.per_layer[3] == 0
    inputs = 2048 * 4096 * 2  # what a checkpointed layer keeps: its input
    always = eight.shared + eight.outside
    working = eight.per_layer[23]  # backward's one layer more: the largest
    room = always + eight.per_layer[23] + 800 * MiB + 18 * inputs + working  # the top two, the other 18's inputs
    plan = _plan("auto", room * 5 // 4, saved=saved)
    assert plan.estimate == "measured" and plan.checkpointed == list(range(4, 22)) and plan.mode == "selective"
    assert plan.layer_gib == round(eight.per_layer[23] / GiB, 4) and plan.kept_bytes == room
    assert _plan("auto", room * 5 // 4 - 1, saved=saved).checkpointed == list(range(4, 23))
    assert _plan("auto", 100 * GiB, saved=saved).mode == "none"
    assert _plan("selective", 100 * GiB, saved=saved).checkpointed == [4]
    # the loss's chunks are freed before any layer backpropagates: backward's working layer reuses them
    loss, kept_two = 2 * working, room - working
    with_loss = _plan("auto", kept_two * 5 // 4 + loss, saved=saved, transient=loss)
    assert with_loss.checkpointed == list(range(4, 22)) and with_loss.kept_bytes == kept_two
    assert _plan("auto", kept_two * 5 // 4 + loss - 1, saved=saved, transient=loss).checkpointed == list(range(4, 23))
    # the shared and outside bytes are kept whatever the plan: without room for them too, everything recomputes
    assert _plan("auto", (always + 20 * inputs + working) * 5 // 4 - 1, saved=saved).mode == "full"
    assert SavedBytes.from_dict(saved.to_dict()) == saved


def _graph_saved_bytes(model, ids, slices) -> int:
    """An independent count of what one forward keeps for backward: the autograd graph walked from the output,
    every node's saved tensors read back, one count per storage, the storages of the model's parameters and
    buffers and of the trained slices left out."""
    held = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), *slices.parameters())}
    out = base_model(model)(input_ids=ids, use_cache=False).last_hidden_state
    storages, stack, visited = {}, [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in visited:
            continue
        visited.add(node)
        values = [getattr(node, name) for name in dir(node) if name.startswith("_saved_")]
        values += list(getattr(node, "saved_tensors", ()))  # a custom autograd.Function's (BLOOM's eager GeLU)
        for value in values:
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack += [next_node for next_node, _ in node.next_functions]
    return sum(size for key, size in storages.items() if key not in held)


@pytest.mark.parametrize("family,fast", [("bloom", True), ("bloom", False), ("mpt", True), ("falcon", True)])
def test_measured_bytes_equal_what_the_autograd_graph_keeps(family, fast):
    model = tiny_family_model(family, n_layer=4)
    adapter = adapter_for(model)
    slices = operate(model, adapter, SurgeryPlan([(1, 0), (1, 2), (3, 1)]))
    ids = torch.randint(0, 100, (1, 16))
    with fast_kernels(model, adapter, fast):
        saved = measure_saved_bytes(model, adapter, ids[:1])
        model.train()
        one = _graph_saved_bytes(model, ids[:1], slices)
        two = _graph_saved_bytes(model, torch.cat([ids[:1], ids[:1]]), slices)
    assert saved.seq_len == 16 and saved.one.total() == one and saved.two.total() == two
    for measured in (saved.one, saved.two):
        assert measured.per_layer[0] == 0 and all(b > 0 for b in measured.per_layer[1:])  # below the lowest: nothing
        assert measured.per_layer[3] > measured.per_layer[2]  # a target layer keeps its slices' inputs too
        assert measured.outside > 0  # the final norm's input
    # a non-target layer's activations grow with the batch, nothing else: two sequences keep twice as much
    assert saved.two.per_layer[2] == 2 * saved.one.per_layer[2]
    with fast_kernels(model, adapter, fast):
        model.train()
        four = _graph_saved_bytes(model, ids[:1].repeat(4, 1), slices)
    assert saved.for_tokens(4 * 16).total() == four  # the line through one and two sequences, at four


def test_the_probe_leaves_the_random_state_and_the_mode_as_they_were():
    model = tiny_model(n_layer=2)
    for block in model.transformer.h:  # BLOOM's modules keep their own copies of the dropout setting
        block.self_attention.hidden_dropout = block.mlp.hidden_dropout = 0.5
    adapter = adapter_for(model)
    operate(model, adapter, SurgeryPlan([(0, 1)]))
    block = torch.randint(0, 100, (1, 16))
    state = torch.get_rng_state()
    model.train()
    model.transformer(input_ids=block)
    assert not torch.equal(torch.get_rng_state(), state)  # a forward in train mode draws for its dropout
    model.eval()
    state = torch.get_rng_state()
    saved = measure_saved_bytes(model, adapter, block)
    assert torch.equal(torch.get_rng_state(), state) and not model.training
    assert saved.one.per_layer[0] > 0


def test_the_probe_refuses_layers_already_checkpointed():
    model = tiny_model(n_layer=2)
    adapter = adapter_for(model)
    apply_checkpointing(model, adapter, plan_checkpointing("full", n_layer=2, lowest=0, hidden=32, tokens=16,
                                                           dtype=torch.float32, free=0))
    with pytest.raises(RuntimeError, match="before checkpointing is switched on"):
        measure_saved_bytes(model, adapter, torch.randint(0, 100, (1, 16)))


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
    # auto on a machine with room for the top layer's activations as measured, and the others' inputs: selective
    measured, held = [], []

    def spy(*args):
        measured.append(measure_saved_bytes(*args))
        return measured[-1]

    def optimizer_spy(params):  # the slices' gradients and AdamW moments: held, reserved before the plan
        held.append(optimizer_bytes(params))
        return held[-1]

    def on_a_small_machine(*args, **kw):  # the free memory a plan from the measurement sees
        planned.append(kw)
        if kw["saved"] is not None:
            kept = kw["saved"].for_tokens(32)  # micro-batches of one 32-token block
            # the top layer's activations and layers 0 and 1's inputs; backward's working layer fits in the
            # loss's chunks, freed by then (a 320-word head in fp32 and 1024-token chunks: 12 bytes a logit in place)
            loss = 12 * 1024 * 320
            assert max(kept.per_layer) < loss
            room = kept.shared + kept.outside + kept.per_layer[2] + 2 * 32 * 32 * 4
            kw = {**kw, "free": int(room / 0.8) + 1 + loss + held[-1]}
        return plan_checkpointing(*args, **kw)

    monkeypatch.setattr("engine.checkpointing.measure_saved_bytes", spy)
    monkeypatch.setattr("engine.train.optimizer_bytes", optimizer_spy)
    planned = []
    monkeypatch.setattr("engine.checkpointing.plan_checkpointing", on_a_small_machine)
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
    assert ran["auto"] == {**ran["auto"], "mode": "selective", "asked": "auto", "checkpointed": [0, 1],
                           "estimate": "measured"}
    assert ran["full"]["estimate"] == ran["none"]["estimate"] == "formula" and len(measured) == 1  # auto only
    # targets 0.3 and 1.1 of a 32-wide, 4-head model: 24 q/k/v rows of 32 weights and a bias, 8 columns of 32
    assert held[-1] == 3 * 2 * (24 * 32 + 24 + 32 * 8) * 4
    assert all(kw["reserve"] == held[-1] and kw["transient"] == 12 * 1024 * 320 for kw in planned)  # no prefix cache
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
