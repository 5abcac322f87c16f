"""Training corpora through `datasets`: local files, directories, jsonl/parquet, or hub datasets.

Texts are tokenised into one stream and packed into blocks of `seq_len`; the last `heldout_frac` of the
stream is held out. Order is deterministic; shuffling uses the caller's seed.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".html", ".json", ".toml", ".cfg", ".ini", ".yaml", ".yml"}
PYTHON_SOURCES = "python-stdlib"  # the running Python's own source tree (or python-stdlib/PKG): on every machine
PYTHON_PACKAGES = "python-packages"  # the standard library plus every installed package's sources (or python-packages/PKG)


@dataclass(frozen=True)
class CorpusSpec:
    """Where text comes from: a path, `python-stdlib`, `python-packages`, or a hub dataset id with config and split."""

    source: str
    config: str | None = None
    split: str | None = None
    text_column: str = "text"
    max_documents: int | None = None

    def describe(self) -> str:
        parts = [self.source] + [p for p in (self.config, self.split) if p]
        return ":".join(parts)


def python_source_files(package: str = "", installed: bool = False) -> list[str]:
    """The running Python's standard-library `.py` files (its own tests included), sorted; with `installed`,
    the `.py` files of every installed package (site-packages) too. `package` narrows them to one
    (sub-)package, e.g. `json`."""
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"])
    roots = [stdlib] + ([Path(paths["purelib"]), Path(paths["platlib"])] if installed else [])
    files: set[Path] = set()
    for root in dict.fromkeys(r.resolve() for r in roots if r.is_dir()):
        for p in (root / package).rglob("*.py"):
            if root == stdlib.resolve() and "site-packages" in p.relative_to(root).parts:
                continue  # installed packages are their own root (and only with `installed`)
            if p.is_file():
                files.add(p)
    if not files:
        name = PYTHON_PACKAGES if installed else PYTHON_SOURCES
        raise InputError(f"no Python package {package!r} here: write {name}/NAME, e.g. {name}/json")
    return [str(p) for p in sorted(files)]


def _python_corpus(source: str) -> tuple[str, bool] | None:
    """(package, installed) when `source` names the running Python's sources, else None."""
    for name, installed in ((PYTHON_SOURCES, False), (PYTHON_PACKAGES, True)):
        if source == name or source.startswith(name + "/"):
            return source[len(name) + 1:], installed
    return None


def _local_files(path: Path) -> list[str]:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise InputError(f"corpus directory {str(path)!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    return [str(p) for p in files]


def load_texts(spec: CorpusSpec) -> list[str]:
    """Documents of the corpus as a list of strings (empty documents dropped)."""
    import datasets

    source = spec.source
    path = Path(source).expanduser()
    try:
        python = _python_corpus(source)
        if python or path.is_dir():
            files = python_source_files(*python) if python else _local_files(path)
            ds = datasets.load_dataset("text", data_files=files, sample_by="document", encoding_errors="ignore", split="train")
            column = "text"
        elif path.is_file():
            suffix = path.suffix.lower()
            builder = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix, "text")
            kwargs = {"sample_by": "paragraph"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=[str(path)], split="train", **kwargs)
            column = spec.text_column if builder != "text" else "text"
        elif source.startswith((".", "/", "~")) or source.count("/") > 1:
            raise InputError(f"corpus {source!r} does not exist: pass a text file, directory, .jsonl/.parquet or hub dataset id")
        else:
            ds = datasets.load_dataset(source, spec.config, split=spec.split or "train")
            column = spec.text_column
    except InputError:
        raise
    except (FileNotFoundError, ConnectionError, OSError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot load corpus {spec.describe()!r} ({first}): with no network, pass a local file or directory") from exc
    except ValueError as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputError(f"cannot read corpus {spec.describe()!r}: {first}") from exc
    if column not in ds.column_names:
        raise InputError(f"corpus {spec.describe()!r} has no {column!r} column (columns: {', '.join(ds.column_names)}): "
                         "use --text-column")
    texts = [t for t in ds[column] if isinstance(t, str) and t.strip()]
    if spec.max_documents:
        texts = texts[: spec.max_documents]
    if not texts:
        raise InputError(f"corpus {spec.describe()!r} is empty: give it some text")
    return texts


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts its BOS token first (then every block starts with BOS, as in training)."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos is not None and len(ids) > 0 and ids[0] == bos


def token_stream(tokenizer, texts: list[str], batch: int = 1024) -> torch.Tensor:
    """All documents as one 1-D stream, each followed by EOS when the tokenizer has one."""
    eos = tokenizer.eos_token_id
    tail = [eos] if eos is not None else []
    pieces: list[np.ndarray] = []
    for start in range(0, len(texts), batch):
        encoded = tokenizer(texts[start : start + batch], add_special_tokens=False)["input_ids"]
        pieces.append(np.fromiter((t for ids in encoded for t in (*ids, *tail)), dtype=np.int64))
    return torch.from_numpy(np.concatenate(pieces)) if pieces else torch.zeros(0, dtype=torch.long)


@dataclass
class PackedCorpus:
    """Blocks of `seq_len` tokens (each starting with BOS when the model expects one)."""

    train: torch.Tensor  # [n_train, seq_len]
    heldout: torch.Tensor  # [n_heldout, seq_len]
    seq_len: int
    bos_prefix: bool
    description: str

    @property
    def n_train_tokens(self) -> int:
        return self.train.numel()


def pack_blocks(stream: torch.Tensor, seq_len: int, bos_id: int | None) -> torch.Tensor:
    body = seq_len - (1 if bos_id is not None else 0)
    n = stream.numel() // body
    blocks = stream[: n * body].view(n, body)
    if bos_id is not None:
        blocks = torch.cat([torch.full((n, 1), bos_id, dtype=torch.long), blocks], dim=1)
    return blocks


def pack_corpus(tokenizer, texts: list[str], seq_len: int, heldout_frac: float = 0.05, description: str = "") -> PackedCorpus:
    """Tokenise and pack; the last `heldout_frac` of the stream (at least one block) is held out."""
    if seq_len < 2:
        raise InputError(f"seq len must be at least 2 (got {seq_len})")
    bos_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    blocks = pack_blocks(token_stream(tokenizer, texts), seq_len, bos_id)
    if len(blocks) < 2:
        raise InputError(
            f"corpus {description!r} is too small for seq len {seq_len}: it gives {len(blocks)} block(s); "
            "give more text or a smaller --seq-len"
        )
    n_held = max(1, int(round(len(blocks) * heldout_frac)))
    return PackedCorpus(blocks[:-n_held], blocks[-n_held:], seq_len, bos_id is not None, description)


def load_corpus(spec: CorpusSpec, tokenizer, seq_len: int, heldout_frac: float = 0.05) -> PackedCorpus:
    return pack_corpus(tokenizer, load_texts(spec), seq_len, heldout_frac, spec.describe())
