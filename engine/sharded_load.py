"""Loading a save_pretrained checkpoint straight into the FSDP2-sharded model, each rank reading only its rows.

The model is built on the meta device, sharded (`engine.distributed.shard_model`), given empty storage for
this rank's shards only, and then filled from the safetensors files: a sharded parameter reads just this
rank's rows (`get_slice`), a whole one (embeddings, final norm, the tied LM head) the full tensor. No rank ever
holds a full copy of a sharded tensor, so each rank's memory stays near its own shard plus the whole
parameters. Outside a process group the model is loaded unsharded (every parameter whole), as from_pretrained.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .distributed import is_sharded, local_rows, shard_model, world
from .errors import ModelLoadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt", "pytorch_model.bin.index.json")


def checkpoint_files(directory: str | Path) -> list[Path]:
    """The safetensors files of a save_pretrained directory: the index's shard files (sorted) or the one file."""
    d = Path(directory)
    if not d.is_dir():
        raise ModelLoadError(f"no model directory at {d}")
    index = d / INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"cannot read the shard index {index}: {exc}") from exc
        files = [d / name for name in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise ModelLoadError(f"{index} names shard files missing from {d}: {', '.join(absent[:5])}")
        return files
    if (d / SINGLE).is_file():
        return [d / SINGLE]
    if any(any(d.glob(pattern)) for pattern in PICKLED):
        raise ModelLoadError(f"{d} holds only pickled (.bin) weights and sharded loading reads safetensors only: load "
                             "it once with from_pretrained and save it with save_pretrained (safe_serialization=True "
                             "on transformers 4), which writes model.safetensors")
    raise ModelLoadError(f"no model weights ({SINGLE} or {INDEX}) in {d}")


def load_sharded(directory: str | Path, config, adapter, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model of `config` with the weights in `directory`, sharded over the ranks (in eval mode)."""
    from safetensors import safe_open

    files = checkpoint_files(directory)
    model = _build(config, dtype)
    plan = _plan(model, files, Path(directory))  # headers only: a bad checkpoint fails before any allocation
    ties = _tied_groups(model)
    _materialise(model, adapter, ties, device)
    targets = _targets(model)
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for name, (path, key) in plan.items():
        by_file.setdefault(path, []).append((name, key))
    with torch.no_grad():
        for path, items in by_file.items():
            with safe_open(str(path), framework="pt") as fh:
                for name, key in items:
                    tensor = targets[name]
                    if is_sharded(tensor):
                        start, stop = local_rows(tensor)
                        if stop > start:
                            tensor.to_local().copy_(fh.get_slice(key)[start:stop])
                    else:
                        tensor.copy_(fh.get_tensor(key))
    return model.eval()


def random_sharded(config, adapter, dtype: torch.dtype, device: torch.device, seed: int = 0) -> nn.Module:
    """A sharded model of `config` with RANDOM weights (for benchmarking shapes that cannot be downloaded, such
    as bloom-176b): normal(0, initializer_range or 0.02), norm weights 1, biases 0. Each rank draws its shards
    from a generator seeded `seed + rank`; the whole parameters from one seeded `seed + world size`, so every
    rank holds the same embeddings and norms."""
    model = _build(config, dtype)
    persistent = _persistent_buffers(model)
    if persistent:
        raise ModelLoadError(f"random_sharded cannot fill the {config.model_type} model's buffers "
                             f"{', '.join(persistent[:5])}: load a checkpoint with load_sharded")
    _materialise(model, adapter, _tied_groups(model), device)
    w = world()
    std = getattr(config, "initializer_range", None) or 0.02
    shard_gen = torch.Generator(device=device).manual_seed(seed + w.rank)
    whole_gen = torch.Generator(device=device).manual_seed(seed + w.size)
    done: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            norm = isinstance(module, nn.LayerNorm) or any(n in type(module).__name__ for n in ("LayerNorm", "RMSNorm"))
            for pname, param in module.named_parameters(recurse=False):
                if id(param) in done:
                    continue
                done.add(id(param))
                local = param.to_local() if is_sharded(param) else param
                if local.numel() == 0:
                    continue
                if norm and pname == "weight":
                    local.fill_(1.0)
                elif norm or pname == "bias":
                    local.zero_()
                else:
                    local.normal_(0.0, std, generator=shard_gen if is_sharded(param) else whole_gen)
    return model.eval()


# --- steps ---------------------------------------------------------------------------------------------
def _build(config, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def _materialise(model: nn.Module, adapter, ties: list[list[str]], device: torch.device) -> None:
    """Shard the meta model, give it (uninitialised) storage on `device`, re-tie, recompute derived buffers."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        shard_model(model, adapter, torch.device(device).type)
    model.to_empty(device=device)
    # to_empty makes a new Parameter per module (meta -> real cannot swap the data in place), which unties
    # the LM head from the embeddings: point every alias back at the first name's parameter.
    for names in ties:
        param = model.get_parameter(names[0])
        for alias in names[1:]:
            owner, _, attr = alias.rpartition(".")
            setattr(model.get_submodule(owner), attr, param)
    _recompute_buffers(model)


def _tied_groups(model: nn.Module) -> list[list[str]]:
    """Names sharing one parameter, each group in the model's order (the first is the one that is loaded)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _non_persistent(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    return [(f"{mname}.{b}" if mname else b, module, b) for mname, module in model.named_modules()
            for b in module._buffers if b in module._non_persistent_buffers_set and module._buffers[b] is not None]


def _persistent_buffers(model: nn.Module) -> list[str]:
    skip = {name for name, _, _ in _non_persistent(model)}
    return [name for name, _ in model.named_buffers() if name not in skip]


def _recompute_buffers(model: nn.Module) -> None:
    """Non-persistent buffers (Falcon's unused rotary inv_freq) are not in a checkpoint: recompute them with
    transformers' own `_init_weights`, as from_pretrained does; refuse one it does not recompute."""
    entries = _non_persistent(model)
    owners: dict[int, nn.Module] = {}
    with torch.no_grad():
        for name, module, b in entries:
            if not module._buffers[b].is_floating_point() or next(module.parameters(recurse=False), None) is not None:
                raise _no_buffer(model, name)
            module._buffers[b].fill_(float("nan"))
            owners[id(module)] = module
    for module in owners.values():
        model._init_weights(module)
    for name, module, b in entries:
        if torch.isnan(module._buffers[b]).any():
            raise _no_buffer(model, name)


def _no_buffer(model: nn.Module, name: str) -> ModelLoadError:
    return ModelLoadError(f"the {model.config.model_type} model keeps buffer {name}, which is not saved and which "
                          "sharded loading cannot recompute: load it with from_pretrained instead")


def _targets(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint fills: each distinct parameter under its first name, and the persistent buffers."""
    persistent = set(_persistent_buffers(model))
    return {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if n in persistent}}


def _plan(model: nn.Module, files: list[Path], directory: Path) -> dict[str, tuple[Path, str]]:
    """For every target, the (file, key) that fills it; a tied alias's key only when its first name has none."""
    from safetensors import safe_open

    targets = _targets(model)
    canonical = {name: name for name in targets}
    for names in _tied_groups(model):
        canonical.update({alias: names[0] for alias in names})
    prefix = getattr(model, "base_model_prefix", "") or ""
    plan: dict[str, tuple[Path, str]] = {}
    direct: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as fh:
            for key in fh.keys():
                name = _model_name(key, canonical, prefix)
                if name is None:  # a key the model does not have (from_pretrained drops them too)
                    continue
                target = canonical[name]
                if target in direct or (target in plan and name != target):
                    continue
                shape = tuple(fh.get_slice(key).get_shape())
                if shape != tuple(targets[target].shape):
                    raise ModelLoadError(f"{key} in {path} has shape {list(shape)}, but the model's {target} is "
                                         f"{list(targets[target].shape)}: the checkpoint is of another model")
                plan[target] = (path, key)
                if name == target:
                    direct.add(target)
    missing = [name for name in targets if name not in plan]
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise ModelLoadError(f"checkpoint in {directory} lacks {', '.join(missing[:5])}{more}: it is not a complete "
                             "save_pretrained directory of this model")
    return plan


def _model_name(key: str, names: dict[str, str], prefix: str) -> str | None:
    """The model's name for a checkpoint key: itself, with the base-model prefix added (original bigscience
    BLOOM stores `h.0...`), or with it stripped."""
    if key in names:
        return key
    if prefix:
        if f"{prefix}.{key}" in names:
            return f"{prefix}.{key}"
        if key.startswith(prefix + ".") and key[len(prefix) + 1:] in names:
            return key[len(prefix) + 1:]
    return None
