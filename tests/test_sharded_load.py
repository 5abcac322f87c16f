"""engine.sharded_load: a save_pretrained checkpoint read straight into the FSDP2-sharded model, each rank
reading only its own rows. The multi-rank tests run this file as a `torchrun` worker (2 CPU ranks, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2
# family -> tiny model shape; "bloom_odd" has 33 rows per hidden matrix, so the two ranks hold 17 and 16 rows
# (FSDP2 pads the last shard) and its checkpoint is stored the original bigscience way, without `transformer.`
FAMILIES = {"bloom": (4, 4, 64), "mpt": (3, 4, 64), "falcon": (3, 4, 64), "bloom_odd": (2, 3, 33)}


# --- the parent side ---------------------------------------------------------------------------------------
def _launch(tmp_path: Path, mode: str, *args: str) -> list[dict]:
    """Run this file as `mode` on RANKS processes with torchrun; each rank's JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    # --standalone: torchrun picks a free port for its rendezvous itself (no race with another test run)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(RANKS),
           __file__, mode, str(tmp_path), *args]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, f"workers failed:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
    print(done.stdout)
    return [json.loads((tmp_path / f"{mode}-{rank}.json").read_text()) for rank in range(RANKS)]


def _save_families(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from helpers import tiny_family_model

    for name, (n_layer, n_head, hidden) in FAMILIES.items():
        model = tiny_family_model(name.split("_")[0], n_layer=n_layer, n_head=n_head, hidden=hidden, seed=1)
        model.save_pretrained(tmp_path / name, max_shard_size="20KB")
        index = json.loads((tmp_path / name / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) >= 3  # really a multi-file checkpoint
        if name == "bloom_odd":  # bigscience layout: no `transformer.` prefix, no lm_head, one unknown key
            flat = tmp_path / "bloom_flat"
            model.config.save_pretrained(flat)
            state = {k.removeprefix("transformer."): v.contiguous() for k, v in model.state_dict().items()
                     if k != "lm_head.weight"}
            keys = sorted(state)
            halves = {"part-1.safetensors": keys[: len(keys) // 2], "part-2.safetensors": keys[len(keys) // 2:]}
            halves["part-2.safetensors"].append("unused.extra")
            state["unused.extra"] = torch.ones(3)
            for file, names in halves.items():
                save_file({k: state[k] for k in names}, str(flat / file), metadata={"format": "pt"})
            weight_map = {k: file for file, names in halves.items() for k in names}
            (flat / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_sharded_load_stays_near_one_shard_and_equals_from_pretrained(tmp_path):
    """One torchrun launch (each costs seconds of start-up): the memory check first, in processes that have
    loaded nothing yet, then the equality of every family's load."""
    from transformers import BloomConfig, BloomForCausalLM

    from helpers import tiny_tokenizer

    # ~200 MB of fp32 weights, 99.8% of them in the 16 blocks (vocab is the tiny tokenizer's 320): each rank
    # grows by its half of the blocks (~97 MiB) plus, transiently, the pages it touched of the file it is
    # reading (safetensors maps the file; they count in RSS until it is closed). With 30 MB files that was up
    # to +28 MiB (ratio 0.65 on rank 0); 10 MB files keep it at ~+8 MiB (ratios 0.53-0.55, steady over runs),
    # so the 0.75 bound has ~40 MiB of room, and a load that holds the whole model (>= 1.0) fails it.
    tok = tiny_tokenizer()
    cfg = BloomConfig(vocab_size=len(tok), hidden_size=512, n_layer=16, n_head=8)
    torch.manual_seed(0)
    BloomForCausalLM(cfg).save_pretrained(tmp_path / "big", max_shard_size="10MB")
    assert len(list((tmp_path / "big").glob("*.safetensors"))) >= 10
    _save_families(tmp_path)
    both = _launch(tmp_path, "both", str(tmp_path / "big"))
    _check_memory([r["memory"] for r in both])
    _check_equality([r["equality"] for r in both])


def _check_equality(results: list[dict]) -> None:
    for rank, result in enumerate(results):
        assert result["world"] == [rank, RANKS]
        for name in [*FAMILIES, "bloom_flat"]:
            r = result[name]
            assert r["unequal"] == [], (rank, name)
            assert r["sharded"] > 0 and r["local_numel"] < r["sharded_numel"], (rank, name)  # really sharded
            assert r["tied"], (rank, name)
            assert r["buffers_unequal"] == [], (rank, name)
            assert r["forward_diff"] <= 1e-5, (rank, name, r["forward_diff"])
            assert r["logits_diff"] <= 1e-5, (rank, name, r["logits_diff"])
            assert r["eval"], (rank, name)
            assert r["bad_reads"] == [] and r["rows_read"] == r["sharded"], (rank, name, r["bad_reads"])
    # the two ranks hold complementary rows of the odd-sized model (17 + 16 of each 33-row matrix)
    assert sum(results[r]["bloom_odd"]["local_numel"] for r in range(RANKS)) == results[0]["bloom_odd"]["sharded_numel"]


def _check_memory(results: list[dict]) -> None:
    for rank, r in enumerate(results):
        growth = r["peak_kb"] * 1024 - r["before_kb"] * 1024
        print(f"rank {rank}: grew {growth / 2**20:.1f} MiB loading a {r['full_bytes'] / 2**20:.1f} MiB model "
              f"(own shard {r['local_bytes'] / 2**20:.1f} MiB, ratio {growth / r['full_bytes']:.2f})")
        assert r["local_bytes"] < 0.55 * r["full_bytes"]
        assert growth < 0.75 * r["full_bytes"], r
        random = r["random"]
        assert random["norms_one"] and random["biases_zero"] and abs(random["std"] - 0.02) < 0.002, random
    # random_sharded: the whole parameters are the same on every rank, the shards are drawn per rank
    assert results[0]["random"]["whole_sum"] == results[1]["random"]["whole_sum"]
    assert results[0]["random"]["shard_sum"] != results[1]["random"]["shard_sum"]


def test_checkpoint_errors(tmp_path):
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from engine.arch import adapter_for
    from engine.errors import ModelLoadError
    from engine.sharded_load import checkpoint_files, load_sharded
    from helpers import tiny_model

    model = tiny_model(n_layer=2, hidden=32)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError) as exc:
        checkpoint_files(pickled)
    message = str(exc.value)
    assert "\n" not in message and "safetensors only" in message and "save_pretrained" in message

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelLoadError, match="no model weights") as exc:
        checkpoint_files(empty)
    assert str(empty) in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(ModelLoadError, match="no model directory"):
        checkpoint_files(tmp_path / "absent")

    model.save_pretrained(tmp_path / "shards", max_shard_size="20KB")
    files = checkpoint_files(tmp_path / "shards")
    assert len(files) >= 3 and files == sorted(files) and all(f.suffix == ".safetensors" for f in files)
    files[-1].unlink()
    with pytest.raises(ModelLoadError, match="names shard files missing"):
        checkpoint_files(tmp_path / "shards")

    # without a process group the model loads whole, the same as from_pretrained
    good = tmp_path / "good"
    model.save_pretrained(good)
    assert checkpoint_files(good) == [good / "model.safetensors"]
    loaded = load_sharded(good, model.config, adapter_for(model.config), torch.float32, torch.device("cpu"))
    assert not loaded.training and loaded.lm_head.weight is loaded.get_input_embeddings().weight
    ref = AutoModelForCausalLM.from_pretrained(good)
    for (name, p), (_, q) in zip(loaded.state_dict().items(), ref.state_dict().items(), strict=True):
        assert torch.equal(p, q), name

    state = load_file(str(good / "model.safetensors"))
    del state["transformer.h.1.mlp.dense_4h_to_h.weight"]
    save_file(state, str(good / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as exc:
        load_sharded(good, model.config, adapter_for(model.config), torch.float32, torch.device("cpu"))
    message = str(exc.value)
    assert "\n" not in message and "transformer.h.1.mlp.dense_4h_to_h.weight" in message
    assert "not a complete save_pretrained directory" in message and str(good) in message


# --- the worker side (run by torchrun) ---------------------------------------------------------------------
class _SpyFile:
    """safetensors.safe_open that records what is read: (key, None) for a whole tensor, (key, [start, stop])
    for a slice of rows."""

    reads: list = []

    def __init__(self, *args, **kwargs) -> None:
        import safetensors

        self._cm = safetensors._real_safe_open(*args, **kwargs)

    def __enter__(self) -> "_SpyFile":
        self._fh = self._cm.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        return self._cm.__exit__(*exc)

    def keys(self):
        return self._fh.keys()

    def get_tensor(self, key):
        self.reads.append((key, None))
        return self._fh.get_tensor(key)

    def get_slice(self, key):
        spy, real = self, self._fh.get_slice(key)

        class Slice:
            def get_shape(self):
                return real.get_shape()

            def __getitem__(self, index):
                rows = [index.start, index.stop] if isinstance(index, slice) and index.step is None else repr(index)
                spy.reads.append((key, rows))
                return real[index]

        return Slice()


def _check_reads(model, reads: list) -> tuple[list, int]:
    """Reads that break the rule (a sharded parameter: exactly its local rows; a whole one: all of it), and
    how many row slices were read."""
    from engine.distributed import is_sharded, local_rows

    names = dict(model.named_parameters(remove_duplicate=False))
    bad, sliced = [], 0
    for key, rows in reads:
        param = names.get(key, names.get(f"transformer.{key}"))
        if param is None:
            bad.append([key, "not a parameter"])
        elif is_sharded(param):
            sliced += 1
            if rows != list(local_rows(param)):
                bad.append([key, rows])
        elif rows is not None:
            bad.append([key, rows])
    return bad, sliced


def _equality(out: Path) -> dict:
    import safetensors
    from transformers import AutoModelForCausalLM

    from engine.arch import adapter_for, base_model
    from engine.distributed import is_sharded
    from engine.sharded_load import load_sharded

    safetensors._real_safe_open = safetensors.safe_open
    result = {}
    for name in [*FAMILIES, "bloom_flat"]:
        directory = out / ("bloom_odd" if name == "bloom_flat" else name)
        ref = AutoModelForCausalLM.from_pretrained(directory).eval()
        _SpyFile.reads = []
        safetensors.safe_open = _SpyFile
        try:
            model = load_sharded(out / name, ref.config, adapter_for(ref.config), torch.float32, torch.device("cpu"))
        finally:
            safetensors.safe_open = safetensors._real_safe_open
        ref_params = dict(ref.named_parameters())
        r = {"unequal": [], "sharded": 0, "local_numel": 0, "sharded_numel": 0, "eval": not model.training,
             "tied": model.lm_head.weight is model.get_input_embeddings().weight}
        for pname, param in model.named_parameters():
            if is_sharded(param):
                r["sharded"] += 1
                r["local_numel"] += param.to_local().numel()
                r["sharded_numel"] += param.numel()
                full = param.full_tensor()
            else:
                full = param
            if not torch.equal(full.detach(), ref_params[pname].detach()):
                r["unequal"].append(pname)
        ref_buffers = dict(ref.named_buffers())
        r["buffers_unequal"] = [b for b, t in model.named_buffers() if not torch.equal(t, ref_buffers[b])]
        ids = torch.randint(3, ref.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(7))
        with torch.no_grad():
            hidden = base_model(model)(ids).last_hidden_state
            expected = base_model(ref)(ids).last_hidden_state
            r["forward_diff"] = float((hidden - expected).abs().max())
            r["logits_diff"] = float((model.lm_head(hidden) - ref.lm_head(expected)).abs().max())
        r["bad_reads"], r["rows_read"] = _check_reads(model, _SpyFile.reads)
        result[name] = r
    return result


def _memory(out: Path, directory: str) -> dict:
    import gc
    import resource

    import safetensors  # noqa: F401  (imports before the baseline)
    import torch.distributed.fsdp  # noqa: F401
    import transformers.models.bloom.modeling_bloom  # noqa: F401
    from transformers import AutoConfig, BloomConfig

    from engine.arch import adapter_for
    from engine.distributed import is_sharded
    from engine.sharded_load import load_sharded, random_sharded

    # random_sharded on a small model first: checks it, and runs the meta build, sharding and DTensor code
    # once so their lazy imports and caches are not counted as the big load's growth
    small = BloomConfig(vocab_size=320, hidden_size=64, n_layer=2, n_head=4)
    rand = random_sharded(small, adapter_for(small), torch.float32, torch.device("cpu"), seed=3)
    whole = [p for p in rand.parameters() if not is_sharded(p)]
    shards = [p.to_local() for p in rand.parameters() if is_sharded(p)]
    norms = [m for m in rand.modules() if isinstance(m, torch.nn.LayerNorm)]
    matrices = [p.to_local() for n, p in rand.named_parameters()
                if is_sharded(p) and n.endswith("weight") and p.ndim == 2]
    random = {"whole_sum": float(sum(p.double().sum() for p in whole)),
              "shard_sum": float(sum(p.double().sum() for p in shards)),
              "norms_one": all(bool((m.weight.to_local() if is_sharded(m.weight) else m.weight).eq(1).all())
                               for m in norms),
              "biases_zero": all(bool((p.to_local() if is_sharded(p) else p).eq(0).all())
                                 for n, p in rand.named_parameters() if n.endswith("bias")),
              "std": float(torch.cat([m.flatten() for m in matrices]).std())}
    config = AutoConfig.from_pretrained(directory)
    adapter = adapter_for(config)
    del rand, whole, shards, norms, matrices
    gc.collect()
    before_kb = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                         if line.startswith("VmRSS:")).split()[1])
    model = load_sharded(directory, config, adapter, torch.float32, torch.device("cpu"))
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    params = list(model.parameters())
    return {"before_kb": before_kb, "peak_kb": peak_kb, "random": random,
            "full_bytes": sum(p.numel() * p.element_size() for p in params),
            "local_bytes": sum((p.to_local() if is_sharded(p) else p).numel() * p.element_size() for p in params)}


def _worker(mode: str, out: str, *args: str) -> None:
    from engine.distributed import init_from_env, shutdown, world

    init_from_env("cpu")
    w = world()
    memory = _memory(Path(out), *args)  # first: in a process that has loaded nothing yet
    result = {"memory": memory, "equality": {**_equality(Path(out)), "world": [w.rank, w.size]}}
    (Path(out) / f"{mode}-{w.rank}.json").write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    _worker(*sys.argv[1:])
