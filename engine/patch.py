"""Surgery patches: safetensors holding only the changed head slices, plus JSON metadata naming the
base model and the plan. Base + patch = repaired model; `export_model` writes it as save_pretrained."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .arch import Adapter
from .atomic import atomic_write_bytes
from .distributed import whole, world
from .errors import InputError
from .preflight import os_error_message

PATCH_FORMAT = "head-surgeon-patch"
PATCH_VERSION = 1
META_KEY = "head_surgeon"


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over every tensor's name, dtype, shape and bytes, in name order: the patch's content checksum."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        digest.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return "sha256:" + digest.hexdigest()


def save_patch(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write atomically: a crash never leaves a half-written patch under `path` (nor a temp file beside it).
    The metadata carries a checksum of the tensors' content, which `load_patch` verifies."""
    from safetensors.torch import save

    if not world().main:  # its write would be dropped (engine.atomic): skip the checksum and serialising too
        return
    tensors = {k: v.detach().contiguous() for k, v in tensors.items()}
    header = {META_KEY: json.dumps({"format": PATCH_FORMAT, "version": PATCH_VERSION, **meta,
                                    "checksum": tensors_checksum(tensors)})}
    # serialised in memory (patches hold only head slices) and written by Python, so a full disk or a
    # read-only directory surfaces as an OSError that becomes one line
    atomic_write_bytes(path, save(tensors, metadata=header))


def load_patch(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata) of a patch file, with a one-line error for anything that is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"patch {str(path)!r} does not exist: pass the .safetensors written by operate")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        meta = json.loads(raw) if raw else None
    except Exception as exc:  # safetensors raises its own error types for damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"patch {str(path)!r} is not a readable safetensors file ({first}): it is damaged") from exc
    if not isinstance(meta, dict) or meta.get("format") != PATCH_FORMAT:
        raise InputError(f"{str(path)!r} is a safetensors file but not a head-surgeon patch")
    if meta.get("version") != PATCH_VERSION:
        raise InputError(f"patch version {meta.get('version')!r} is not {PATCH_VERSION}: use a matching head-surgeon")
    recorded = meta.get("checksum")  # older patches have none: they load unchecked
    if recorded is not None and recorded != tensors_checksum(tensors):
        raise InputError(f"patch {str(path)!r} is corrupt: its content checksum does not match; "
                         "re-run or restore the file")
    return tensors, meta


def parse_tensor_name(name: str) -> tuple[int, int, str]:
    parts = name.split(".")
    if len(parts) != 5 or parts[0] != "layer" or parts[2] != "head":
        raise InputError(f"patch tensor {name!r} is not layer.L.head.H.PART: the patch is damaged")
    return int(parts[1]), int(parts[3]), parts[4]


@torch.no_grad()
def apply_head_tensors(model, adapter: Adapter, tensors: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
    """Write per-head slices into the fused tensors; returns the heads patched."""
    heads = set()
    for name, value in tensors.items():
        layer, head, part = parse_tensor_name(name)
        if not (0 <= layer < adapter.n_layer and 0 <= head < adapter.n_head):
            raise InputError(f"patch head {layer}.{head} is outside this model ({adapter.n_layer}x{adapter.n_head})")
        qkv, dense = adapter.qkv(model, layer), adapter.dense(model, layer)
        rows, cols = adapter.qkv_rows(head), adapter.dense_cols(head)
        target = {"qkv_weight": (qkv.weight, (rows,)), "qkv_bias": (qkv.bias, (rows,)),
                  "dense_weight": (dense.weight, (slice(None), cols))}.get(part)
        if target is not None and target[0] is None:
            raise InputError(f"patch tensor {name!r} is a bias this model does not have: the patch is for another model")
        if target is None:
            raise InputError(f"patch tensor {name!r} has unknown part {part!r}: the patch is damaged")
        param, index = target
        with whole(param) as tensor:  # a sharded base (engine.distributed) is gathered and written back
            if tuple(tensor[index].shape) != tuple(value.shape):
                raise InputError(f"patch tensor {name!r} has shape {tuple(value.shape)}, the model needs "
                                 f"{tuple(tensor[index].shape)}: the patch is for another model")
            tensor[index] = value.to(tensor)
        heads.add((layer, head))
    return sorted(heads)


def _config_file(model) -> Path | None:
    """config.json of the directory, or the hub cache entry, the model was loaded from."""
    source = str(getattr(model, "name_or_path", "") or "")
    if not source:
        return None
    local = Path(source) / "config.json"
    if local.is_file():
        return local
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(source, "config.json", revision=getattr(model.config, "_commit_hash", None))
    except ValueError:  # not a hub id either
        return None
    return Path(cached) if isinstance(cached, str) else None


def stored_dtype(model) -> torch.dtype | None:
    """The dtype the base checkpoint's config.json names (`dtype`, or the older `torch_dtype`); None when it
    cannot be told."""
    path = _config_file(model)
    try:
        config = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return None
    dtype = getattr(torch, str(config.get("dtype") or config.get("torch_dtype")), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else None


def _save_in_dtype(model, directory: Path, dtype: torch.dtype | None) -> None:
    """save_pretrained with the weights (and config `dtype`) in `dtype`; the model itself is left as it is."""
    if dtype is None or dtype == model.dtype:
        model.save_pretrained(directory)
        return
    cast: dict[int, torch.Tensor] = {}  # one cast per storage, so tied weights stay tied (and are saved once)
    state = {k: cast.setdefault(v.data_ptr(), v.to(dtype)) for k, v in model.state_dict().items()}
    model.save_pretrained(directory, state_dict=state)
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_model(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained into a temporary sibling directory, then rename it into place, in the base checkpoint's
    dtype (a bf16 base run in fp32 on CPU is written as bf16). On failure the temporary directory is removed
    and nothing is left at `out_dir`."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"export directory {str(out)!r} is not empty: choose a new directory")
    tmp: Path | None = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
        _save_in_dtype(model, tmp, stored_dtype(model))
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
        tmp = None
    except OSError as exc:
        raise InputError(os_error_message(exc, out)) from exc
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    return out
