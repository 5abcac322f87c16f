"""Faults end in one line naming the problem and the fix, found before any model is loaded where that is
cheap, and never lose or half-write what the user saved: read-only and full disks, paths that are files,
empty and binary corpora, corrupt patches, an unreachable hub."""

from __future__ import annotations

import errno
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine.atomic as atomic
import engine.corpus as corpus_mod
import engine.preflight as preflight
from engine.atomic import atomic_write_bytes, atomic_write_text
from engine.corpus import CorpusSpec, check_corpus, load_corpus, load_texts
from engine.errors import HeadSurgeonError, InputError, ModelLoadError
from engine.patch import META_KEY, PATCH_FORMAT, PATCH_VERSION, export_model, load_patch, save_patch
from engine.preflight import check_output_dir, check_output_file, hub_unreachable, os_error_message
from helpers import run_in_process

ROOT = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def _one_line(exc: BaseException) -> str:
    text = str(exc)
    assert "\n" not in text, text
    return text


def _read_only(monkeypatch, directory: Path) -> None:
    """Make `directory` read-only for real; as root (which ignores modes) make os.access say so."""
    if IS_ROOT:
        real = os.access
        monkeypatch.setattr(preflight.os, "access",
                            lambda p, mode, *a, **k: False if Path(p) == directory and mode & os.W_OK else real(p, mode, *a, **k))
    else:
        directory.chmod(0o500)  # restored by the restore_modes fixture


@pytest.fixture
def restore_modes(tmp_path):
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir():
            p.chmod(0o700)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(".") or p.suffix == ".tmp")


# ---------------------------------------------------------------- preflight: output paths

def test_output_dir_checks(tmp_path, monkeypatch, restore_modes):
    new = tmp_path / "runs" / "new"
    assert check_output_dir(new) == new and not new.exists() and not new.parent.exists()  # creates nothing

    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="is a file, not a directory") as info:
        check_output_dir(tmp_path / "file")
    assert _one_line(info.value).startswith("--out ")

    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(InputError, match="already exists: choose a new directory or pass --overwrite"):
        check_output_dir(existing)  # empty or not
    (existing / "a").write_text("x")
    with pytest.raises(InputError, match="already exists"):
        check_output_dir(existing, what="--out")
    assert check_output_dir(existing, overwrite=True) == existing

    with pytest.raises(InputError, match="is a file, not a directory: choose another path"):
        check_output_dir(tmp_path / "file" / "sub" / "run")

    locked = tmp_path / "locked"
    locked.mkdir()
    _read_only(monkeypatch, locked)
    with pytest.raises(InputError, match="read-only or no permission") as info:
        check_output_dir(locked / "deep" / "run")
    assert str(locked) in _one_line(info.value)


def test_output_file_checks(tmp_path, monkeypatch, restore_modes):
    target = tmp_path / "sub" / "s.json"
    assert check_output_file(target) == target and not target.parent.exists()
    target.parent.mkdir()
    target.write_text("{}")
    with pytest.raises(InputError, match="already exists: choose a new file name or pass --overwrite"):
        check_output_file(target)
    assert check_output_file(target, overwrite=True) == target
    with pytest.raises(InputError, match="is a directory, not a file"):
        check_output_file(tmp_path / "sub")
    with pytest.raises(InputError, match="is a file, not a directory"):
        check_output_file(target / "inner.json")
    _read_only(monkeypatch, target.parent)
    with pytest.raises(InputError, match="--session .*read-only or no permission"):
        check_output_file(target.parent / "other.json", what="--session")
    with pytest.raises(InputError, match="read-only or no permission"):
        check_output_file(target, overwrite=True)


def test_os_error_messages_are_one_line_with_the_fix():
    path = "/data/run/patch.safetensors"
    assert os_error_message(OSError(errno.ENOSPC, "No space left on device"), path) == \
        f"no space left on device writing {path}: free space, then resume"
    for code in (errno.EROFS, errno.EACCES, errno.EPERM):
        assert os_error_message(OSError(code, "x"), path) == \
            f"cannot write {path}: read-only or no permission; choose another directory"
    for code in (errno.ENOTDIR, errno.EEXIST):
        assert "is a file" in os_error_message(OSError(code, "x"), path)
    generic = os_error_message(OSError(errno.EIO, "x"), path)
    assert os.strerror(errno.EIO) in generic and path in generic and "\n" not in generic


def test_preflight_imports_nothing_heavy_at_module_level():
    """engine/__init__ imports the whole engine (torch included); preflight itself must not add to that."""
    import ast

    for name in ("preflight.py", "errors.py"):
        tree = ast.parse((ROOT / "engine" / name).read_text())
        modules = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        modules |= {n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom) and not n.level}
        assert not modules & {"torch", "transformers", "datasets", "numpy", "huggingface_hub"}, (name, modules)


# ---------------------------------------------------------------- atomic writes

class _FullDisk:
    """A file object that accepts `limit` bytes, then fails like a full disk."""

    def __init__(self, fh, limit: int):
        self.fh, self.limit = fh, limit

    def write(self, data):
        self.fh.write(data[: self.limit])
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def test_full_disk_keeps_the_original_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "session.json"
    target.write_text('{"saved": true}')
    real_open = open
    monkeypatch.setattr(atomic, "open", lambda name, mode="r", *a, **k: _FullDisk(real_open(name, mode, *a, **k), 5),
                        raising=False)
    with pytest.raises(InputError, match="no space left on device writing .*session.json: free space, then resume") as info:
        atomic_write_text(target, '{"saved": false, "bigger": "x"}')
    _one_line(info.value)
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert target.read_text() == '{"saved": true}'
    assert _leftovers(tmp_path) == []


def test_full_disk_during_fsync_and_read_only_rename(tmp_path, monkeypatch):
    target = tmp_path / "report.json"
    target.write_bytes(b"old")

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "fsync", no_space)
        with pytest.raises(InputError, match="no space left"):
            atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []

    def read_only(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    with monkeypatch.context() as m:
        m.setattr(atomic.os, "replace", read_only)
        with pytest.raises(InputError, match="cannot write .*report.json: read-only or no permission; choose another directory"):
            atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old" and _leftovers(tmp_path) == []


def test_read_only_directory_refuses_in_one_line(tmp_path, monkeypatch, restore_modes):
    locked = tmp_path / "locked"
    locked.mkdir()
    if IS_ROOT:  # root writes anywhere: make creating the temp file fail as a read-only file system would
        def mkstemp(*a, **k):
            raise OSError(errno.EROFS, "Read-only file system")
        monkeypatch.setattr(atomic.tempfile, "mkstemp", mkstemp)
    else:
        locked.chmod(0o500)
    with pytest.raises(InputError, match="read-only or no permission") as info:
        atomic_write_text(locked / "s.json", "{}")
    _one_line(info.value)
    assert list(locked.iterdir()) == []


def test_a_path_component_that_is_a_file(tmp_path):
    (tmp_path / "plain").write_text("keep me")
    with pytest.raises(InputError, match="is a file") as info:
        atomic_write_text(tmp_path / "plain" / "s.json", "{}")
    _one_line(info.value)
    assert (tmp_path / "plain").read_text() == "keep me"


# ---------------------------------------------------------------- patches

def _patch_tensors():
    g = torch.Generator().manual_seed(0)
    return {"layer.0.head.1.qkv_weight": torch.randn(6, 8, generator=g),
            "layer.0.head.1.qkv_bias": torch.randn(6, generator=g),
            "layer.1.head.0.dense_weight": torch.randn(8, 2, generator=g).to(torch.bfloat16)}


def test_patch_checksum_refuses_a_flipped_data_byte(tmp_path):
    path = tmp_path / "patch.safetensors"
    tensors = _patch_tensors()
    save_patch(path, tensors, {"base": {"ref": "x"}})
    loaded, meta = load_patch(path)
    assert meta["checksum"].startswith("sha256:") and meta["base"] == {"ref": "x"}
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)

    raw = bytearray(path.read_bytes())
    data_start = 8 + struct.unpack("<Q", raw[:8])[0]  # after the length and the JSON header
    raw[data_start + 13] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError) as info:
        load_patch(path)
    assert _one_line(info.value) == (f"patch {str(path)!r} is corrupt: its content checksum does not match; "
                                     "re-run or restore the file")


def test_patch_without_checksum_still_loads_and_a_truncated_one_is_one_line(tmp_path):
    from safetensors.torch import save_file

    old = tmp_path / "old.safetensors"
    save_file(_patch_tensors(), str(old), metadata={META_KEY: json.dumps({"format": PATCH_FORMAT, "version": PATCH_VERSION})})
    tensors, meta = load_patch(old)
    assert "checksum" not in meta and len(tensors) == 3

    cut = tmp_path / "cut.safetensors"
    save_patch(cut, _patch_tensors(), {})
    cut.write_bytes(cut.read_bytes()[:-10])
    with pytest.raises(InputError, match="damaged") as info:
        load_patch(cut)
    _one_line(info.value)


def test_patch_save_on_a_full_disk_keeps_the_previous_patch(tmp_path, monkeypatch):
    path = tmp_path / "patch.safetensors"
    save_patch(path, _patch_tensors(), {"step": 1})
    before = path.read_bytes()
    real_open = open
    monkeypatch.setattr(atomic, "open", lambda name, mode="r", *a, **k: _FullDisk(real_open(name, mode, *a, **k), 100),
                        raising=False)
    with pytest.raises(InputError, match="no space left on device"):
        save_patch(path, {k: v * 2 for k, v in _patch_tensors().items()}, {"step": 2})
    assert path.read_bytes() == before and _leftovers(tmp_path) == []
    monkeypatch.undo()
    assert load_patch(path)[1]["step"] == 1


def test_export_on_a_full_disk_leaves_nothing(tmp_path):
    class Model:
        def save_pretrained(self, directory):
            (Path(directory) / "model.safetensors").write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "exported"
    with pytest.raises(InputError, match="no space left on device writing .*exported") as info:
        export_model(Model(), None, out)
    _one_line(info.value)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- corpora

@pytest.fixture
def corpora(tmp_path):
    d = tmp_path / "c"
    d.mkdir()
    (d / "empty.txt").write_bytes(b"")
    (d / "blank.txt").write_text("  \n\n \n")
    (d / "nul.txt").write_bytes(b"some text\x00\x01\x02 more")
    (d / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (d / "late.txt").write_bytes(b"ok text\n\n" * 10000 + b"\xff\xfe")  # invalid UTF-8 after the first 64 KiB
    (d / "emptydir").mkdir()
    (d / "emptyfiles").mkdir()
    (d / "emptyfiles" / "a.txt").write_bytes(b"")
    (d / "good.txt").write_text("first paragraph\n\nsecond paragraph\n\n\nthird")
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops\n')
    return d


@pytest.mark.parametrize("name, message", [
    ("missing.txt", "does not exist: pass a text file"),
    ("empty.txt", "is empty: give it some text"),
    ("blank.txt", "is empty (only whitespace)"),
    ("nul.txt", "is a binary file, not UTF-8 text"),
    ("latin.txt", "is a binary file, not UTF-8 text"),
    ("emptydir", "holds no text files"),
    ("emptyfiles", "is empty: its 1 text file(s) hold no text"),
])
def test_check_corpus_refuses_in_one_line(corpora, name, message):
    source = str(corpora / name)
    with pytest.raises(InputError) as info:
        check_corpus(CorpusSpec(source))
    line = _one_line(info.value)
    assert message in line and source in line
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_texts(CorpusSpec(source))  # the same refusal on the loading path


def test_check_corpus_passes_hub_ids_and_builtin_sources(corpora):
    for source in ("allenai/c4", "wikitext", "python-stdlib", "python-stdlib/json", "python-packages",
                   str(corpora / "good.txt"), str(corpora)):
        check_corpus(CorpusSpec(source))
    with pytest.raises(InputError, match="does not exist"):
        check_corpus(CorpusSpec("notes.txt"))  # a file name, not a hub id


def test_unreadable_corpus(corpora, monkeypatch):
    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(corpus_mod, "open", denied, raising=False)
    with pytest.raises(InputError, match="cannot be read \\(Permission denied\\): fix its permissions") as info:
        check_corpus(CorpusSpec(str(corpora / "good.txt")))
    _one_line(info.value)


def test_loading_errors_past_the_check_are_one_line(corpora):
    with pytest.raises(InputError, match="is not UTF-8 text") as info:
        load_texts(CorpusSpec(str(corpora / "late.txt")))
    _one_line(info.value)
    with pytest.raises(InputError, match="cannot read corpus") as info:
        load_texts(CorpusSpec(str(corpora / "bad.jsonl")))
    _one_line(info.value)


def test_text_corpus_reads_paragraphs_and_too_small_is_one_line(corpora):
    from helpers import tiny_tokenizer

    assert load_texts(CorpusSpec(str(corpora / "good.txt"))) == ["first paragraph", "second paragraph", "\nthird"]
    with pytest.raises(InputError, match="too small for seq len 4096: it gives 0 block") as info:
        load_corpus(CorpusSpec(str(corpora / "good.txt")), tiny_tokenizer(), 4096)
    _one_line(info.value)


def test_text_corpora_do_not_import_datasets(corpora):
    code = ("import sys; from engine.corpus import CorpusSpec, load_texts; "
            f"n = len(load_texts(CorpusSpec({str(corpora / 'good.txt')!r}))); "
            "m = len(load_texts(CorpusSpec('python-stdlib/json'))); "
            "print(n, m > 0, 'datasets' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.stdout.split() == ["3", "True", "False"], done.stderr


def test_cli_binary_corpus_is_one_line_without_a_traceback(planted_dir, corpora, tmp_path, capsys):
    done = run_in_process(capsys, "operate", "--model", planted_dir, "--device", "cpu", "--targets", "0.3", "--corpus",
                          corpora / "nul.txt", "--steps", "1", "--out", tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert not (tmp_path / "out").exists()
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("head-surgeon: error: corpus") and "binary" in lines[0], done.stderr


# ---------------------------------------------------------------- hub

def test_unreachable_hub_fails_fast_in_one_line(monkeypatch, capfd):
    """A closed local port stands in for the hub: the answer must not depend on this machine's network."""
    from engine.model import load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    capfd.readouterr()
    start = time.monotonic()
    with pytest.raises(ModelLoadError) as info:
        load_model("some-org/some-model-that-is-not-cached", device="cpu")
    elapsed = time.monotonic() - start
    line = _one_line(info.value)
    assert "'some-org/some-model-that-is-not-cached'" in line and "hub is unreachable" in line
    assert "--model PATH" in line and "HF_HUB_OFFLINE=1" in line
    assert elapsed < 10, elapsed
    out, err = capfd.readouterr()
    assert err.strip() == "" and out.strip() == ""


def test_real_hub_fails_fast_when_there_is_no_network(monkeypatch, capfd):
    reason = hub_unreachable()
    if reason is None:
        pytest.skip("the hub is reachable from here")
    from engine.model import load_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    capfd.readouterr()
    start = time.monotonic()
    with pytest.raises(ModelLoadError, match="hub is unreachable"):
        load_model("bigscience/bloom-560m", device="cpu")
    assert time.monotonic() - start < 10
    assert capfd.readouterr().err.strip() == ""


def test_cli_hub_id_offline_and_missing_dir_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    start = time.monotonic()
    done = run_in_process(capsys, "diagnose", "--model", "some-org/not-cached", "--device", "cpu")
    elapsed = time.monotonic() - start
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not in the local Hugging Face cache and HF_HUB_OFFLINE is set" in lines[0], done.stderr
    assert elapsed < 10, elapsed

    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    done = run_in_process(capsys, "diagnose", "--model", "models/bloom", "--device", "cpu")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "'models/bloom' does not exist" in lines[0], done.stderr


def test_errors_are_head_surgeon_errors():
    assert issubclass(InputError, HeadSurgeonError) and issubclass(ModelLoadError, HeadSurgeonError)
