"""Surgery patches: safetensors holding only the changed head slices, plus JSON metadata naming the
base model and the plan. Base + patch = repaired model; `export_model` writes it as save_pretrained."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from .arch import BloomAdapter
from .errors import InputError

PATCH_FORMAT = "head-surgeon-patch"
PATCH_VERSION = 1
META_KEY = "head_surgeon"


def save_patch(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write atomically: a crash never leaves a half-written patch under `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {META_KEY: json.dumps({"format": PATCH_FORMAT, "version": PATCH_VERSION, **meta})}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=header)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
        raise InputError(f"patch {str(path)!r} is not a readable safetensors file ({exc}): it is damaged") from exc
    if not meta or meta.get("format") != PATCH_FORMAT:
        raise InputError(f"{str(path)!r} is a safetensors file but not a head-surgeon patch")
    if meta.get("version") != PATCH_VERSION:
        raise InputError(f"patch version {meta.get('version')!r} is not {PATCH_VERSION}: use a matching head-surgeon")
    return tensors, meta


def parse_tensor_name(name: str) -> tuple[int, int, str]:
    parts = name.split(".")
    if len(parts) != 5 or parts[0] != "layer" or parts[2] != "head":
        raise InputError(f"patch tensor {name!r} is not layer.L.head.H.PART: the patch is damaged")
    return int(parts[1]), int(parts[3]), parts[4]


@torch.no_grad()
def apply_head_tensors(model, adapter: BloomAdapter, tensors: dict[str, torch.Tensor]) -> list[tuple[int, int]]:
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
        if target is None:
            raise InputError(f"patch tensor {name!r} has unknown part {part!r}: the patch is damaged")
        tensor, index = target
        if tuple(tensor[index].shape) != tuple(value.shape):
            raise InputError(f"patch tensor {name!r} has shape {tuple(value.shape)}, the model needs "
                             f"{tuple(tensor[index].shape)}: the patch is for another model")
        tensor[index] = value.to(tensor)
        heads.add((layer, head))
    return sorted(heads)


def export_model(model, tokenizer, out_dir: str | Path) -> Path:
    """save_pretrained into a temporary sibling directory, then rename it into place."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise InputError(f"export directory {str(out)!r} is not empty: choose a new directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
