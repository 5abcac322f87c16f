"""Measures of a repair: corpus perplexity (`evaluate`), MLP weight dormancy, the drift summary, export dtype."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.arch import adapter_for
from engine.corpus import CorpusSpec
from engine.diagnosis import tokenize_prompts
from engine.evaluate import EvalSettings, drift, mean_loss, mlp_unit_strengths, mlp_weight_dormancy, perplexity
from engine.evaluate_cli import corpus_blocks
from engine.model import load_model, model_identity
from engine.operation import measure
from engine.patch import apply_head_tensors, export_model, load_patch, save_patch
from engine.prompts import builtin_prompts
from engine.report import HeadReport
from helpers import run_in_process, save_model, tiny_model

SEQ_LEN = 32


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("\n\n".join(builtin_prompts() * 2))
    return path


@pytest.fixture(scope="module")
def patch_file(tiny_dir, tmp_path_factory):
    """A patch for tiny_dir that rewrites head 1.2's Q, K and V rows."""
    loaded = load_model(str(tiny_dir), device="cpu")
    rows = loaded.adapter.qkv_rows(2)
    torch.manual_seed(1)
    tensors = {"layer.1.head.2.qkv_weight": torch.randn_like(loaded.adapter.qkv(loaded.model, 1).weight[rows])}
    path = tmp_path_factory.mktemp("patch") / "patch.safetensors"
    save_patch(path, tensors, {"base_model": model_identity(loaded)})
    return path


def _expected(model_dir, corpus_file, blocks, patch=None) -> tuple[float, int]:
    """(perplexity by mean_loss over the same blocks, blocks in the corpus)."""
    loaded = load_model(str(model_dir), device="cpu")
    if patch is not None:
        apply_head_tensors(loaded.model, loaded.adapter, load_patch(patch)[0])
    every = corpus_blocks(CorpusSpec(str(corpus_file)), loaded.tokenizer, SEQ_LEN)
    return perplexity(mean_loss(loaded.model, every[:blocks] if blocks else every, 8)), len(every)


def _evaluate(capsys, tmp_path, model_dir, corpus_file, *extra):
    out = tmp_path / f"ppl-{len(list(tmp_path.iterdir()))}.json"
    done = run_in_process(capsys, "evaluate", "--model", model_dir, "--corpus", corpus_file, "--seq-len", SEQ_LEN,
                          "--device", "cpu", "--json", out, *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()), done.stdout


def test_evaluate_equals_mean_loss_over_every_block(capsys, tmp_path, tiny_dir, corpus_file):
    result, stdout = _evaluate(capsys, tmp_path, tiny_dir, corpus_file)
    expected, total = _expected(tiny_dir, corpus_file, None)
    assert result["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert result["blocks"] == result["blocks_in_corpus"] == total > 2
    assert result["tokens"] == total * (SEQ_LEN - 1)
    assert result["perplexity"] == pytest.approx(perplexity(result["mean_loss"]))
    assert "all of the corpus's" in stdout and "perplexity" in stdout and "mean loss" in stdout


def test_evaluate_first_blocks_and_patch(capsys, tmp_path, tiny_dir, corpus_file, patch_file):
    plain, stdout = _evaluate(capsys, tmp_path, tiny_dir, corpus_file, "--blocks", 2)
    assert plain["blocks"] == 2 and "the first 2 of" in stdout
    patched, stdout = _evaluate(capsys, tmp_path, tiny_dir, corpus_file, "--blocks", 2, "--patch", patch_file)
    expected, _ = _expected(tiny_dir, corpus_file, 2, patch_file)
    assert patched["perplexity"] == pytest.approx(expected, rel=1e-6)
    assert patched["perplexity"] != pytest.approx(plain["perplexity"], rel=1e-6)
    assert patched["patched_heads"] == "1.2" and "+ patch" in stdout


def test_evaluate_refuses_other_weights_existing_json_and_missing_corpus(capsys, tmp_path, planted_dir, corpus_file,
                                                                          patch_file):
    args = ("evaluate", "--model", planted_dir, "--corpus", corpus_file, "--seq-len", SEQ_LEN, "--device", "cpu",
            "--blocks", 1)
    done = run_in_process(capsys, *args, "--patch", patch_file)
    assert done.returncode == 2 and "other weights" in done.stderr and len(done.stderr.splitlines()) == 1
    assert run_in_process(capsys, *args, "--patch", patch_file, "--force").returncode == 0
    existing = tmp_path / "taken.json"
    existing.write_text("{}")
    done = run_in_process(capsys, *args, "--json", existing)
    assert done.returncode == 2 and "already exists" in done.stderr and existing.read_text() == "{}"
    done = run_in_process(capsys, "evaluate", "--model", tmp_path / "no-model", "--corpus", tmp_path / "none.txt")
    assert done.returncode == 2 and "corpus" in done.stderr  # the corpus is checked before the model


def test_mlp_weight_dormancy_finds_exactly_the_zeroed_units():
    model = tiny_model()
    adapter = adapter_for(model)
    reads_nothing, writes_nothing = {0: [3, 17], 2: [5]}, {0: [40], 1: [0, 127]}
    with torch.no_grad():
        for block in adapter.blocks(model):  # unit strengths around 1, as in a trained model
            block.mlp.dense_h_to_4h.weight.mul_(10.0)
            block.mlp.dense_4h_to_h.weight.mul_(10.0)
        for layer, units in reads_nothing.items():
            adapter.blocks(model)[layer].mlp.dense_h_to_4h.weight[units] = 0.0
        for layer, units in writes_nothing.items():
            adapter.blocks(model)[layer].mlp.dense_4h_to_h.weight[:, units] *= 1e-3
    found = [torch.nonzero(s < 0.01).flatten().tolist() for s in mlp_unit_strengths(model, adapter)]
    assert found == [[3, 17, 40], [0, 127], [5]]
    assert mlp_weight_dormancy(model, adapter) == [3, 2, 1]
    assert mlp_weight_dormancy(model, adapter, threshold=0.0) == [0, 0, 0]


def test_measure_reports_both_dormancies(tiny_dir, corpus_file):
    loaded = load_model(str(tiny_dir), device="cpu")
    prompt_ids = tokenize_prompts(loaded.tokenizer, builtin_prompts()[:4], 32)
    blocks = corpus_blocks(CorpusSpec(str(corpus_file)), loaded.tokenizer, SEQ_LEN)[:2]
    measured = measure(loaded, prompt_ids, blocks, EvalSettings(completion_prompts=0), prompts=[], seed=0)
    assert measured["mlp_weight_dormancy"] == mlp_weight_dormancy(loaded.model, loaded.adapter)
    assert len(measured["mlp_dormancy"]) == 3 and all(0.0 <= x <= 1.0 for x in measured["mlp_dormancy"])


def _report(bos: np.ndarray) -> HeadReport:
    zeros = np.zeros_like(bos)
    return HeadReport("m", bos.shape[0], bos.shape[1], [1.0] * bos.shape[1], bos, zeros + 2.0, zeros, zeros + 0.1)


def test_drift_summary_mean_and_worst():
    before = np.zeros((2, 3))
    after = np.array([[0.10, -0.20, 0.01], [0.90, 0.00, -0.03]])  # head 1.0 is the target
    result = drift(_report(before), _report(after), [(1, 0)], [], threshold=0.05)
    assert result["drifted"] == 2 and result["untouched_heads"] == 5
    assert result["drifted_mean_abs_delta"] == pytest.approx(0.15)
    assert result["drifted_max_abs_delta"] == pytest.approx(0.20)
    assert result["mean_abs_delta"] == pytest.approx((0.10 + 0.20 + 0.01 + 0.00 + 0.03) / 5)
    assert result["max_abs_delta"] == pytest.approx(0.20)
    quiet = drift(_report(before), _report(before), [(1, 0)], [], threshold=0.05)
    assert quiet["drifted_mean_abs_delta"] == quiet["drifted_max_abs_delta"] == quiet["mean_abs_delta"] == 0.0


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    return save_model(tiny_model().to(torch.bfloat16), tmp_path_factory.mktemp("bf16"))


def _saved_dtypes(directory) -> tuple[set, str]:
    with safe_open(str(directory / "model.safetensors"), "pt") as fh:
        dtypes = {fh.get_tensor(k).dtype for k in fh.keys()}
    return dtypes, json.loads((directory / "config.json").read_text())["dtype"]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_export_keeps_the_base_dtype(tmp_path, bf16_dir, patch_file, dtype):
    """A bf16 base stays bf16, whether it ran in bf16 or (the CPU default) fp32; the patch is in it."""
    loaded = load_model(str(bf16_dir), device="cpu", dtype=dtype)
    tensors = load_patch(patch_file)[0]
    apply_head_tensors(loaded.model, loaded.adapter, tensors)
    out = export_model(loaded.model, loaded.tokenizer, tmp_path / "out")
    assert _saved_dtypes(out) == ({torch.bfloat16}, "bfloat16")
    assert next(loaded.model.parameters()).dtype == loaded.dtype  # the model in memory is left as it was
    again = load_model(str(out), device="cpu", dtype="bf16")
    rows = again.adapter.qkv_rows(2)
    assert torch.equal(again.adapter.qkv(again.model, 1).weight[rows], tensors["layer.1.head.2.qkv_weight"].bfloat16())
    assert again.model.lm_head.weight.data_ptr() == again.model.transformer.word_embeddings.weight.data_ptr()
