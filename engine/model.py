"""Loading a model and tokenizer from a hub id or a local directory, with clear errors."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .arch import SUPPORTED, Adapter, adapter_for
from .errors import ModelLoadError, UnsupportedModelError
from .preflight import hub_offline, hub_unreachable
from .runtime import resolve_device, resolve_dtype

BUNDLED_MODEL_DIR = Path(__file__).parent / "organism_model"
BUNDLED_NAME = "organism"


@dataclass
class LoadedModel:
    """A model ready for diagnosis or surgery, with where it came from."""

    model: torch.nn.Module
    tokenizer: object
    adapter: Adapter
    ref: str  # hub id, or absolute path of the local directory
    source: str  # "hub" | "local"
    revision: str | None
    device: torch.device
    dtype: torch.dtype

    @property
    def name(self) -> str:
        return Path(self.ref).name if self.source == "local" else self.ref


def default_model_ref() -> str:
    """The bundled organism model shipped inside the package."""
    return str(BUNDLED_MODEL_DIR)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def _looks_like_path(ref: str) -> bool:
    """Hub ids are `name` or `org/name`; anything else (./x, /abs, a/b/c, ~) is meant as a path."""
    return ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref)


def resolve_ref(ref: str | None) -> tuple[str, str]:
    """Return (ref, source): an absolute local directory or a hub id."""
    if ref in (None, "", BUNDLED_NAME):
        ref = default_model_ref()
        if not (Path(ref) / "config.json").is_file():
            raise ModelLoadError(
                f"the bundled model is missing from {ref}: reinstall head-surgeon or pass --model PATH_OR_HUB_ID"
            )
    path = Path(ref).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model path {ref!r} is a file: pass the save_pretrained directory that holds it")
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model directory {ref!r} has no config.json: pass a directory written by save_pretrained"
            )
        return str(path.resolve()), "local"
    if _looks_like_path(ref):
        raise ModelLoadError(f"model directory {ref!r} does not exist: check the path or pass a hub id")
    return ref, "hub"


def _hub_error(ref: str, exc: Exception) -> ModelLoadError:
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if hub_offline():
        return ModelLoadError(
            f"{ref!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: download it on a "
            "connected machine (hf download) or pass a local directory with --model PATH"
        )
    return ModelLoadError(
        f"could not load {ref!r} from the Hugging Face hub ({first}): with no network, download it on a "
        "connected machine (hf download) and pass the local directory with --model PATH"
    )


def _hub_kwargs(ref: str) -> dict:
    """Extra from_pretrained arguments for a hub id, decided before any request is made, so that no network
    means one line at once rather than a minute of retries: offline mode (HF_HUB_OFFLINE) reads only the
    cache; an unreachable hub falls back to a cached copy if there is one, else refuses."""
    if hub_offline():
        return {"local_files_only": True}
    reason = hub_unreachable()
    if reason is None:
        return {}
    if _cached_config(ref):
        return {"local_files_only": True}
    if "/" in ref and Path(ref).expanduser().parent.is_dir():  # e.g. models/bloom, meant as a path
        raise ModelLoadError(
            f"model directory {ref!r} does not exist (and as a hub id the Hugging Face hub is unreachable: "
            f"{reason}): check the path"
        )
    raise ModelLoadError(
        f"cannot load {ref!r}: the Hugging Face hub is unreachable ({reason}): pass a local directory with "
        "--model PATH, or set HF_HUB_OFFLINE=1 to use a cached copy"
    )


def _cached_config(ref: str) -> bool:
    """Whether the hub cache holds a config.json for `ref` (no network)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(ref, "config.json"), str)
    except Exception:  # an id the cache cannot even name
        return False


def load_model(
    ref: str | None = None,
    *,
    device: str | None = None,
    dtype: str | None = None,
    revision: str | None = None,
) -> LoadedModel:
    """Load a supported causal LM and its tokenizer; `ref` is a hub id or a directory (None: bundled)."""
    ref, source = resolve_ref(ref)
    kwargs = {"revision": revision, "trust_remote_code": False}
    if source == "hub":
        kwargs.update(_hub_kwargs(ref))  # before importing transformers: no network fails at once
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .distributed import rank_device, world

    sharded = world().active  # under torchrun: every rank loads only its share of the blocks, on its own GPU
    dev = resolve_device(rank_device(device) if sharded else device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(ref, **kwargs)
    except OSError as exc:
        error = _hub_error(ref, exc) if source == "hub" else ModelLoadError(f"cannot read config of {ref!r}: {exc}")
        raise error from exc
    except ValueError as exc:  # unknown model_type in config.json, or one that needs its repository's own code
        if "custom code" in str(exc) or "trust_remote_code" in str(exc):
            raise UnsupportedModelError(
                f"{ref!r} needs its own modelling code (trust_remote_code), which head-surgeon never runs: it "
                f"supports {SUPPORTED} through transformers' own code") from exc
        raise ModelLoadError(f"cannot read config of {ref!r}: {str(exc).splitlines()[0]}") from exc
    adapter = adapter_for(config)
    try:
        if sharded:
            from .sharded_load import load_sharded

            directory = ref if source == "local" else _snapshot(ref, kwargs)
            model = load_sharded(directory, config, adapter, torch_dtype, dev)
        else:
            model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(ref, **kwargs)
    except OSError as exc:
        if source == "hub":
            raise _hub_error(ref, exc) from exc
        raise ModelLoadError(f"cannot load weights or tokenizer from {ref!r}: {str(exc).splitlines()[0]}") from exc
    if not sharded:
        model.to(dev)
    model.eval()
    return LoadedModel(model, tokenizer, adapter, ref, source, revision, dev, torch_dtype)


def _snapshot(ref: str, kwargs: dict) -> str:
    """The local folder of a hub model's config and safetensors files (the cache, or a download), for
    sharded loading, which reads the files itself."""
    from huggingface_hub import snapshot_download

    return snapshot_download(ref, revision=kwargs.get("revision"), allow_patterns=["*.json", "*.safetensors"],
                             local_files_only=bool(kwargs.get("local_files_only")))


def weights_hash(directory: str | Path) -> str:
    """sha256 over the directory's weight files (names and bytes), for pinning a local base model.
    Cached per process while the files' sizes and modification times stay the same."""
    directory = Path(directory).resolve()
    files = sorted(p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise ModelLoadError(f"no weight files (*.safetensors) in {directory}")
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return _hash_files(str(directory), stamp)


@functools.lru_cache(maxsize=16)
def _hash_files(directory: str, stamp: tuple) -> str:
    digest = hashlib.sha256()
    for name, _, _ in stamp:
        path = Path(directory) / name
        digest.update(name.encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 22), b""):
                digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _hash_on_rank_0(directory: str) -> str:
    """`weights_hash`, read once: in a distributed run rank 0 hashes the files and tells the others (every
    rank calls this together)."""
    from .distributed import broadcast, world

    return broadcast(weights_hash(directory) if world().main else None)


def model_identity(loaded: LoadedModel) -> dict:
    """What a patch or session records about its base model, to refuse a mismatched one later."""
    a = loaded.adapter
    bundled = loaded.source == "local" and Path(loaded.ref) == BUNDLED_MODEL_DIR.resolve()
    ident = {"ref": BUNDLED_NAME if bundled else loaded.ref, "source": loaded.source, "revision": loaded.revision,
             "family": a.family, "n_layer": a.n_layer, "n_head": a.n_head, "hidden_size": a.hidden_size}
    if loaded.source == "local":
        ident["weights_hash"] = weights_hash(loaded.ref)
    else:
        ident["commit"] = getattr(loaded.model.config, "_commit_hash", None)
    return ident


def check_identity(recorded: dict, loaded: LoadedModel, what: str) -> None:
    """Raise if `loaded` is not the model `recorded` names (shape always; weights hash for local models)."""
    a = loaded.adapter
    if recorded.get("family", "bloom") != a.family:  # records from before other families were BLOOM's
        raise ModelLoadError(f"{what} was made for a {recorded.get('family', 'bloom')} model ({recorded.get('ref')}), not "
                             f"{loaded.name} ({a.family}): open the model it was made from")
    shape = (recorded.get("n_layer"), recorded.get("n_head"), recorded.get("hidden_size"))
    if shape != (a.n_layer, a.n_head, a.hidden_size):
        raise ModelLoadError(
            f"{what} was made for a {shape[0]}-layer x {shape[1]}-head model ({recorded.get('ref')}), not "
            f"{loaded.name} ({a.n_layer} x {a.n_head}): open the model it was made from ({recorded.get('ref')})"
        )
    if recorded.get("weights_hash") and loaded.source == "local" \
            and _hash_on_rank_0(loaded.ref) != recorded["weights_hash"]:
        raise ModelLoadError(
            f"{what} was made for other weights than {loaded.ref} (content hash differs): pass the base model it "
            f"was made from ({recorded.get('ref')})"
        )
