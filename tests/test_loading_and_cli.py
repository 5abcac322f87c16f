"""The real loader, the diagnose command, and one-line errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import InputError, ModelLoadError, UnsupportedModelError
from engine.model import load_model, resolve_ref
from engine.prompts import load_prompts
from helpers import run_in_process

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, env_extra=None):
    """The real entry point in a subprocess: one test uses it; the rest run the same code in-process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "tui.entry", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)


@pytest.fixture
def cli(capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return lambda *args: run_in_process(capsys, *args)


def assert_one_line_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("head-surgeon: error:"), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_loads_local_directory_on_cpu_fp32(tiny_dir):
    loaded = load_model(str(tiny_dir))
    assert loaded.source == "local" and loaded.ref == str(Path(tiny_dir).resolve())
    assert loaded.device.type == "cpu" and str(loaded.dtype) == "torch.float32"
    assert loaded.adapter.n_head == 4 and loaded.adapter.head_dim == 8


def test_dtype_override(tiny_dir):
    import torch

    assert load_model(str(tiny_dir), dtype="bf16").model.dtype == torch.bfloat16


def test_missing_directory_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_ref("./no/such/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_ref(str(tmp_path))


def test_non_bloom_model_is_refused(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="BLOOM"):
        load_model(str(tmp_path))


def test_prompts_files(tmp_path):
    (tmp_path / "p.txt").write_text("first prompt\n\nsecond prompt\n")
    assert load_prompts(tmp_path / "p.txt") == ["first prompt", "second prompt"]
    (tmp_path / "p.jsonl").write_text('{"text": "a b c"}\n\n{"text": "d e"}\n')
    assert load_prompts(tmp_path / "p.jsonl") == ["a b c", "d e"]
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": 3}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:2"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"\n')
    with pytest.raises(InputError, match="not valid JSON"):
        load_prompts(tmp_path / "broken.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(InputError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")


def test_cli_diagnose_writes_the_json_report(planted_dir, tmp_path):
    out = tmp_path / "report.json"
    proc = run_cli("diagnose", "--model", str(planted_dir), "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "dead" in proc.stdout
    data = json.loads(out.read_text())
    for key in ("schema_version", "model", "n_layer", "n_head", "slopes", "bos_mass", "entropy", "local_mass",
                "contribution", "class", "counts"):
        assert key in data
    assert data["model"] == str(Path(planted_dir).resolve())
    assert len(data["bos_mass"]) == data["n_layer"] == 3 and len(data["class"][0]) == data["n_head"] == 4
    assert data["counts"]["dead"] == 2 and data["class"][0][3] == "dead"


def test_cli_missing_directory(cli):
    assert_one_line_error(cli("diagnose", "--model", "./missing-model-dir"), "does not exist")


def test_cli_non_bloom(tmp_path, cli):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(tmp_path)
    assert_one_line_error(cli("diagnose", "--model", str(tmp_path)), "architecture 'gpt2'", "MPT", "Falcon")


def test_a_model_that_needs_its_own_code_is_refused_saying_why(tmp_path, cli):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "baichuan", "architectures": ["BaichuanForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                     "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"}}))
    assert_one_line_error(cli("diagnose", "--model", str(tmp_path)), "trust_remote_code", "never runs", "BLOOM")


def test_cli_hub_id_without_network_suggests_a_local_path(cli):
    proc = cli("diagnose", "--model", "bigscience/bloom-560m")
    assert_one_line_error(proc, "bigscience/bloom-560m", "--model PATH")


def test_cli_malformed_prompts(tiny_dir, tmp_path, cli):
    bad = tmp_path / "prompts.jsonl"
    bad.write_text("not json\n")
    assert_one_line_error(cli("diagnose", "--model", str(tiny_dir), "--prompts", str(bad)), "prompts.jsonl:1")
