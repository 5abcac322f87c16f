"""Diagnosis and surgery spread over processes (torchrun, gloo on CPU): the same results as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.distributed import World, spread
from engine.patch import load_patch
from engine.prompts import builtin_prompts
from helpers import run_in_process

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}


def test_spread_gives_every_rank_as_many_passes_and_each_item_once(monkeypatch):
    items = list(range(5))
    seen, passes = [], []
    for rank in range(2):
        monkeypatch.setattr("engine.distributed.world", lambda rank=rank: World(rank, 2, rank, "gloo"))
        pairs = list(spread(items))
        passes.append(len(pairs))
        seen += [item for item, real in pairs if real]
        assert [i for i, real in pairs if real] == items[rank::2]  # round-robin
    assert passes == [3, 3] and sorted(seen) == items  # rank 1 runs one filler pass, dropped


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(builtin_prompts() * 4))
    return path


OPERATE = ("--device", "cpu", "--targets", "0.3,2.1", "--steps", "3", "--seq-len", "32", "--grad-accum", "3",
           "--lr", "1e-2", "--eval-every", "2", "--eval-blocks", "3", "--track-blocks", "2", "--completions", "0",
           "--control", "sham")


def test_operate_over_two_processes_gives_the_single_process_patch(planted_dir, corpus, tmp_path, capsys):
    """`operate --nproc 2`: it starts `torchrun --nproc-per-node 2 -m engine.cli operate ...` itself. The
    diagnosis before the surgery is spread over the two ranks too (its statistics are compared below)."""
    one = tmp_path / "one"
    done = run_in_process(capsys, "operate", "--model", planted_dir, "--corpus", corpus, *OPERATE, "--out", one)
    assert done.returncode == 0, done.stderr
    two = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "engine.cli", "operate", "--model", str(planted_dir), "--corpus",
                           str(corpus), *OPERATE, "--nproc", "2", "--out", str(two)], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("patch and report written to") == 1  # rank 0 alone prints
    for name in ("patch.safetensors", "control.safetensors"):
        a, meta_a = load_patch(one / name)
        b, meta_b = load_patch(two / name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key, (a[key] - b[key]).abs().max())  # to the last bit
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert (r1["world_size"], r1["backend"]) == (1, None) and (r2["world_size"], r2["backend"]) == (2, "gloo")
    for p1, p2 in zip(r1["passes"], r2["passes"], strict=True):
        assert p1["best_step"] == p2["best_step"]
        assert np.allclose([h["heldout_ppl"] for h in p1["history"]], [h["heldout_ppl"] for h in p2["history"]],
                           rtol=1e-5)
        # 3 steps x 3 blocks: rank 0 trains blocks 0 and 2 of each step, rank 1 block 1
        assert p1["blocks_per_rank"] is None and p2["blocks_per_rank"] == [6, 3]
        # what a layer keeps, measured under FSDP2 (its gathered weights not counted), as in one process
        assert p2["checkpointing"]["estimate"] == "measured"
        assert p1["checkpointing"]["kept_bytes"] == p2["checkpointing"]["kept_bytes"]
    assert np.allclose(r1["diagnosis_before"]["bos_mass"], r2["diagnosis_before"]["bos_mass"], atol=1e-6)
    session = json.loads((two / "session.json").read_text())
    assert session["world"] == {"world_size": 2, "backend": "gloo"}
    assert json.loads((two / "run.json").read_text())["model"]["nproc"] == 2  # resume goes over 2 processes too
    events = [json.loads(line) for line in (two / "events.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events].count("started") == 1  # one writer: rank 0
    assert [e["seq"] for e in events] == list(range(len(events)))
    assert not [p for p in two.rglob("*.tmp")]


def test_commands_that_run_in_one_process_refuse_torchrun(monkeypatch):
    from engine.cli import _join_torchrun, build_parser
    from engine.errors import InputError

    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; the refusal comes before joining any group
    with pytest.raises(InputError, match="head-surgeon runs does not run under torchrun: start it without"):
        _join_torchrun(build_parser().parse_args(["runs"]))


def test_bench_nproc_runs_the_spread_loop_and_reports_each_rank(tmp_path, capsys):
    """`bench --nproc 1`: the loop `--nproc N` runs on every rank (the one-GPU baseline), in this process; the
    multi-rank pieces it shares with operate (the gradient slots, spread, the sharded random model) are tested
    over two processes above and in test_sharded_load."""
    out = tmp_path / "bench.json"
    done = run_in_process(capsys, "bench", "--tiny", "--nproc", "1", "--device", "cpu", "--json", out)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["world_size"], result["backend"], result["grad_accum"]) == (1, None, 2)
    assert result["diagnosis"]["tokens_per_s"] > 0 and result["surgery"]["tokens_per_s"] > 0
    assert "tiny shape over 1 process(es)" in done.stdout
    done = run_in_process(capsys, "bench", "--shape", "bloom-176b", "--nproc", "1")
    assert done.returncode == 2 and "does not fit one GPU: give --nproc N" in done.stderr


def test_scaling_against_a_one_process_baseline_and_its_refusals():
    from engine.bench_distributed import scaling
    from engine.errors import InputError

    base = {"shape": "bloom-7b1", "batch": 8, "seq_len": 512, "grad_accum": 8, "dtype": "bfloat16", "world_size": 1,
            "diagnosis": {"tokens_per_s": 100.0}, "surgery": {"tokens_per_s": 50.0}}
    two = {**base, "world_size": 2, "diagnosis": {"tokens_per_s": 190.0}, "surgery": {"tokens_per_s": 85.0}}
    assert scaling(two, base) == {"baseline_world_size": 1, "diagnosis": 1.9, "surgery": 1.7, "goal": 1.8}
    with pytest.raises(InputError, match="the baseline must be a bench --nproc run of the same"):
        scaling(two, {**base, "seq_len": 1024})
    with pytest.raises(InputError, match="on fewer processes"):
        scaling(base, two)


@pytest.mark.parametrize("exact", [True, False])
def test_gradient_slots_add_up_as_autograd_accumulates(monkeypatch, exact):
    """MicroGradients in one process: with a slot per micro-batch the sum is autograd's to the bit; above the
    size limit one slot holds the running sum (equal to rounding)."""
    from engine import train

    if not exact:
        monkeypatch.setattr(train, "EXACT_SLOTS_BYTES", 0)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(5, 3))
    xs = [torch.randn(4, 5) for _ in range(3)]
    for x in xs:  # one process: autograd accumulates
        (x @ w).square().mean().div(3).backward()
    expected, w.grad = w.grad.clone(), None
    slots = train.MicroGradients([w], 3)
    assert slots.exact is exact
    for k, x in enumerate(xs):
        loss = (x @ w).square().mean()
        (loss / 3).backward()
        slots.keep(k, float(loss.detach()))
        w.grad = None
    total, micro = slots.sum_over_ranks()
    with torch.no_grad():
        losses = [float((x @ w).square().mean()) for x in xs]
    assert micro == 3 and total == pytest.approx(sum(losses), rel=1e-6)
    assert torch.equal(w.grad, expected) if exact else torch.allclose(w.grad, expected, atol=1e-6)


TORCHRUN_STDERR = """W1201 20:19:04.570000 31283 site-packages/torch/distributed/run.py:874]
W1201 20:19:04.570000 31283 site-packages/torch/distributed/run.py:874] *****************************************
W1201 20:19:04.570000 31283 site-packages/torch/distributed/run.py:874] Setting OMP_NUM_THREADS environment variable
head-surgeon: error (rank 1): layer 9 in '9.3' is out of range: the model has 6 layers (0-5)
head-surgeon: error: layer 9 in '9.3' is out of range: the model has 6 layers (0-5)
E1201 20:34:03.766000 5054 site-packages/torch/distributed/elastic/multiprocessing/api.py:1002] failed (exitcode: 2)
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
  exitcode  : 2 (pid: 5105)
"""


def test_a_relaunch_shows_one_error_line_of_ours_and_holds_back_torchruns_traceback():
    """What `--nproc N` shows of torchrun's stderr (as torchrun 2.13 writes it): every rank met the bad
    input; the user sees rank 0's line and status 2, not one line per rank or torchrun's traceback."""
    from engine.cli import TorchrunStderr

    relay = TorchrunStderr()
    shown = "".join(relay.feed(line) for line in TORCHRUN_STDERR.splitlines(keepends=True))
    assert shown == ""
    assert relay.outcome(1) == ("head-surgeon: error: layer 9 in '9.3' is out of range: the model has 6 layers "
                                "(0-5)\n", 2)
    assert relay.outcome(0) == ("", 0)
    # a rank's own output and traceback go through; torchrun's account is shown when nothing of ours says why
    relay = TorchrunStderr()
    assert relay.feed("[rank1]: ValueError: boom\n") == "[rank1]: ValueError: boom\n"
    for line in TORCHRUN_STDERR.splitlines(keepends=True)[5:]:
        relay.feed(line)
    message, code = relay.outcome(1)
    assert code == 1 and "ChildFailedError" in message and "exitcode  : 2" in message
    # a cancel: every rank left with 130
    relay = TorchrunStderr()
    for line in ("Traceback (most recent call last):\n", "  exitcode  : 130 (pid: 1)\n", "  exitcode  : 130 (pid: 2)\n"):
        relay.feed(line)
    assert relay.outcome(1) == ("", 130)
