"""The bundled organism and the organism command."""

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.corpus import CorpusSpec
from engine.diagnosis import diagnose
from engine.model import BUNDLED_MODEL_DIR, load_model
from organism.data import prepare_data
from organism.recipe import OrganismConfig
from organism.train import train_organism
from engine.prompts import builtin_prompts


def test_bundled_organism_is_the_default_and_loads():
    loaded = load_model(None)
    assert loaded.ref == str(BUNDLED_MODEL_DIR.resolve())
    assert loaded.adapter.n_head >= 16
    size = sum(p.stat().st_size for p in BUNDLED_MODEL_DIR.iterdir())
    assert size <= 16 * 2**20


def test_bundled_organism_has_the_low_slope_band():
    report = diagnose(load_model(None), builtin_prompts())
    bos = report.bos_mass
    half = report.n_head // 2
    assert bos[:, half:].mean() >= 3 * bos[:, :half].mean()
    sick_columns = {h for _, h in report.sick() if report.classes[_, h] != "low-entropy"}
    assert sick_columns and min(sick_columns) >= half  # every BOS sink is a low-slope head


def _tiny_corpus(tmp_path: Path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(builtin_prompts()):
        (corpus / f"doc{i:02d}.txt").write_text(text * 3)
    return corpus


def test_organism_command_end_to_end_is_deterministic(tmp_path):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "data"
    meta = prepare_data(CorpusSpec(str(_tiny_corpus(tmp_path))), data, vocab_size=300, heldout_frac=0.1)
    assert meta["tokens"] > 4 * 512
    config = OrganismConfig(layers=2, heads=4, hidden=32, seq_len=32, batch_size=4, steps=6, warmup=2, eval_blocks=4)
    records = [train_organism(config, data, tmp_path / f"run{i}") for i in range(2)]
    assert records[0]["steps_done"] == 6 and np.isfinite(records[0]["heldout_ppl"])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "run0")
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "run1")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))
    assert json.loads((tmp_path / "run0" / "organism.json").read_text())["config"]["seed"] == 0
    tok = load_model(str(tmp_path / "run0")).tokenizer
    assert tok("x")["input_ids"][0] == tok.bos_token_id


def test_band_probes_record_the_trajectory_without_changing_the_run(tmp_path):
    data = tmp_path / "data"
    prepare_data(CorpusSpec(str(_tiny_corpus(tmp_path))), data, vocab_size=300, heldout_frac=0.1)
    config = OrganismConfig(layers=2, heads=4, hidden=32, seq_len=32, batch_size=4, steps=7, warmup=2, eval_blocks=4)
    plain = train_organism(config, data, None)
    probed = train_organism(config, data, None, probe_every=3)
    assert "trajectory" not in plain
    assert [p["step"] for p in probed["trajectory"]] == [3, 6]  # the final diagnosis covers step 7
    for point in probed["trajectory"]:
        assert 0.0 <= point["mean_bos_upper_half"] <= point["max_bos"] <= 1.0
        assert 0 <= point["heads_over_0.5"] <= 8 and np.isfinite(point["train_loss"])
    # probing is read-only: same training, same final diagnosis
    assert probed["bos_mass"] == plain["bos_mass"] and probed["heldout_ppl"] == plain["heldout_ppl"]


def test_compiled_blocks_pretrain_the_same_model(tmp_path):
    from torch._dynamo.utils import counters

    data = tmp_path / "data"
    prepare_data(CorpusSpec(str(_tiny_corpus(tmp_path))), data, vocab_size=300, heldout_frac=0.1)
    config = OrganismConfig(layers=2, heads=4, hidden=32, seq_len=32, batch_size=4, steps=7, warmup=2, eval_blocks=4)
    plain = train_organism(config, data, None, probe_every=3)
    counters.clear()
    compiled = train_organism(config, data, None, probe_every=3, compile_blocks=True)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # really compiled, in one piece
    assert np.allclose(compiled["bos_mass"], plain["bos_mass"], atol=1e-4)
    assert abs(compiled["heldout_ppl"] - plain["heldout_ppl"]) < 1e-3 * plain["heldout_ppl"]
    assert [p["step"] for p in compiled["trajectory"]] == [3, 6]  # probes (eager) between compiled segments


def test_data_parallel_pretraining_matches_one_process(tmp_path):
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    data = tmp_path / "data"
    prepare_data(CorpusSpec(str(_tiny_corpus(tmp_path))), data, vocab_size=300, heldout_frac=0.1)
    recipe = dict(layers=2, heads=4, hidden=32, seq_len=32, batch_size=4, steps=5, warmup=2, lr=1e-2)
    single = train_organism(OrganismConfig(**recipe), data, tmp_path / "single")
    half = train_organism(OrganismConfig(**{**recipe, "batch_size": 2}), data, tmp_path / "half")
    cli = ["--layers", "2", "--heads", "4", "--hidden", "32", "--seq-len", "32", "--batch-size", "4", "--steps", "5",
           "--warmup", "2", "--weight-decay", "0.1", "--lr", "1e-2", "--device", "cpu"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                    "-m", "organism", "--out", str(tmp_path / "ddp"), "--data", str(data), *cli],
                   check=True, cwd=Path(__file__).resolve().parents[1], capture_output=True, timeout=300)
    record = json.loads((tmp_path / "ddp" / "organism.json").read_text())
    # ranks never prepare data (they would all write the same files): one line says what to do instead
    env = {**os.environ, "WORLD_SIZE": "2"}
    refused = subprocess.run([sys.executable, "-m", "organism", "--out", str(tmp_path / "x"), *cli],
                             cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, env=env)
    assert refused.returncode == 2 and "--prepare-only first" in refused.stderr and "Traceback" not in refused.stderr
    assert record["device"] == "2 x cpu" and record["steps_done"] == 5
    a, b, c = (AutoModelForCausalLM.from_pretrained(tmp_path / run).state_dict() for run in ("single", "ddp", "half"))
    gap = max(float((b[k].float() - a[k].float()).abs().max()) for k in a)
    wrong = max(float((c[k].float() - a[k].float()).abs().max()) for k in a)
    # two ranks with two rows each train like one process with four rows (the saved bf16 weights differ by at
    # most a rounding step), and not like one process with two rows
    assert gap <= 2e-3 and wrong >= 0.02
    assert abs(record["heldout_ppl"] / single["heldout_ppl"] - 1) < 1e-4
    assert abs(half["heldout_ppl"] / single["heldout_ppl"] - 1) > 1e-4


def test_python_packages_corpus_is_the_stdlib_plus_installed_sources():
    from engine.corpus import _python_corpus, python_source_files

    stdlib, everything = python_source_files(), python_source_files(installed=True)
    assert set(stdlib) < set(everything)
    assert not any("site-packages" in f for f in stdlib)
    assert any(f.endswith("/torch/__init__.py") for f in everything)
    assert _python_corpus("python-packages/torch") == ("torch", True)
    assert _python_corpus("python-stdlib/json") == ("json", False)
    assert _python_corpus("./python-packages") is None


def test_tokenizer_sample_is_evenly_spread_and_bounded():
    from organism.data import tokenizer_sample

    texts = [f"{i:04d}" * 25 for i in range(100)]  # 100 chars each
    assert tokenizer_sample(texts, 10**6) == texts
    sample = tokenizer_sample(texts, 2_500)
    assert sample == texts[::4] and sum(map(len, sample)) <= 2_500


def test_budgeted_steps_fit_the_budget_and_never_exceed_the_plan():
    from organism.train import budgeted_steps

    config = OrganismConfig(steps=10_000)
    assert budgeted_steps(config, 100, 10.0, 20.0, 110.0) == 100 + 2_000
    assert budgeted_steps(config, 100, 10.0, 1_000.0, 110.0) == 10_000
    assert budgeted_steps(config, 100, 200.0, 20.0, 110.0) == 101  # already over budget: stop next step


def test_disable_alibi_zeroes_the_bias_on_every_path():
    """The no-ALiBi control must lose the slopes in training (no attention mask, fast kernels) as well as
    in diagnosis (padded batches): newer transformers build the bias without `build_alibi_tensor` there."""
    from transformers import BloomConfig, BloomForCausalLM

    from engine.arch import adapter_for
    from engine.diagnosis import run_statistics
    from engine.fastpath import fast_kernels
    from organism.recipe import disable_alibi

    def uniform_attention_model(alibi: bool):
        torch.manual_seed(0)
        model = BloomForCausalLM(BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)).eval()
        for block in model.transformer.h:  # zero queries and keys: scores are the ALiBi bias alone
            qkv = block.self_attention.query_key_value
            qkv.weight.data.view(4, 3, 8, 32)[:, :2] = 0
            qkv.bias.data.view(4, 3, 8)[:, :2] = 0
        if not alibi:
            disable_alibi(model)
        return model

    prompts = [list(range(1, 17)), list(range(1, 11))]
    with_alibi = uniform_attention_model(True)
    with_slopes = run_statistics(with_alibi, adapter_for(with_alibi), prompts, batch_size=2)[0]["bos_mass"]
    model = uniform_attention_model(False)
    without = run_statistics(model, adapter_for(model), prompts, batch_size=2)[0]["bos_mass"]
    assert np.ptp(with_slopes[0]) > 0.05  # steep heads look near the diagonal, shallow ones reach key 0
    assert np.allclose(without, without[0, 0], atol=1e-6)  # every head attends uniformly

    seen = []
    attention = adapter_for(model).attention(model, 1)
    attention.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["alibi"]), with_kwargs=True)
    ids = torch.tensor([prompts[0]])
    with torch.no_grad():
        model(input_ids=ids)
        with fast_kernels(model, adapter_for(model)):
            model(input_ids=ids)
    assert len(seen) == 2 and all(not a.any() for a in seen)


def test_a_stopped_run_resumes_from_its_state(tmp_path):
    from engine.errors import InputError

    data = tmp_path / "data"
    prepare_data(CorpusSpec(str(_tiny_corpus(tmp_path))), data, vocab_size=300, heldout_frac=0.1)
    config = OrganismConfig(layers=2, heads=4, hidden=32, seq_len=32, batch_size=4, steps=8, warmup=2, eval_blocks=4,
                            lr=1e-2)  # large steps: a resume without its batches or moments shows at once
    whole = train_organism(config, data, None, probe_every=3)
    state = tmp_path / "state.safetensors"
    calls = iter(range(100))
    first = train_organism(config, data, None, probe_every=3, state=state, cancelled=lambda: next(calls) >= 5)
    assert first["steps_done"] == 5 and first["stopped_early"] and state.is_file()
    second = train_organism(config, data, tmp_path / "out", probe_every=3, state=state)
    assert second["steps_done"] == 8 and not second["stopped_early"] and second["sessions"] == 2
    assert [p["step"] for p in second["trajectory"]] == [3, 6]
    # equal to the uninterrupted run up to the bf16 rounding of the stored AdamW moments (fresh moments or
    # other batches move the loss by >= 0.017 and the perplexity by >= 0.6% here)
    assert abs(second["final_train_loss"] - whole["final_train_loss"]) < 1e-3
    assert abs(second["heldout_ppl"] - whole["heldout_ppl"]) < 1e-3 * whole["heldout_ppl"]
    with pytest.raises(InputError, match=r"lr 0.01 \(saved\) vs 0.001"):
        train_organism(replace(config, lr=1e-3), data, None, state=state)


def test_add_parser_registers_the_organism_subcommand():
    import argparse

    from organism.cli import add_parser, cmd_organism

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["organism", "--out", "o", "--steps", "7", "--no-alibi"])
    assert args.func is cmd_organism and (args.out, args.steps, args.no_alibi, args.lr) == ("o", 7, True, 6e-4)


def test_cli_refuses_a_time_budget_on_a_resumable_run(tmp_path):
    import subprocess
    import sys

    data = tmp_path / "data"
    prepare_data(CorpusSpec(str(_tiny_corpus(tmp_path))), data, vocab_size=300, heldout_frac=0.1)
    done = subprocess.run([sys.executable, "-m", "organism", "--out", str(tmp_path / "o"), "--data",
                           str(data), "--state", str(tmp_path / "s.safetensors"), "--time-budget", "5"],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, check=False)
    assert done.returncode == 2 and "--time-budget resizes the run" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "s.safetensors").exists()
