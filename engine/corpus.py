"""Training corpora: local text files and directories (read in plain Python), jsonl/parquet files and hub
datasets (through `datasets`), or the running Python's own sources.

Texts are tokenised into one stream and packed into blocks of `seq_len`; the last `heldout_frac` of the
stream is held out. Order is deterministic; shuffling uses the caller's seed. `check_corpus` is the cheap
check to call before any model is loaded.
"""

from __future__ import annotations

import codecs
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import InputError
from .preflight import hub_offline, hub_unreachable

TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".c", ".h", ".html", ".json", ".toml", ".cfg", ".ini", ".yaml", ".yml"}
PYTHON_SOURCES = "python-stdlib"  # the running Python's own source tree (or python-stdlib/PKG): on every machine
PYTHON_PACKAGES = "python-packages"  # the standard library plus every installed package's sources (or python-packages/PKG)
DATASET_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}  # read through `datasets`
SNIFF_BYTES = 64 * 1024  # how much of a text file check_corpus reads to tell text from binary


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
        raise InputError(f"corpus directory {str(path)!r} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}): "
                         "put text files in it or pass another corpus")
    return [str(p) for p in files]


def _looks_like_path(source: str) -> bool:
    """A source meant as a local path (not a hub dataset id): ./x, /abs, ~, a/b/c, or a file name like notes.txt."""
    return (source.startswith((".", "/", "~")) or source.count("/") > 1
            or Path(source).suffix.lower() in TEXT_SUFFIXES | set(DATASET_SUFFIXES))


def _is_text_file(path: Path) -> bool:
    return DATASET_SUFFIXES.get(path.suffix.lower()) != "parquet"


def _sniff(path: Path, label: str) -> None:
    """Refuse an unreadable, empty or binary file (NUL bytes or invalid UTF-8 in its first 64 KiB)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else type(exc).__name__
        raise InputError(f"{label} {str(path)!r} cannot be read ({reason}): fix its permissions or pass another corpus") from exc
    if size == 0:
        raise InputError(f"{label} {str(path)!r} is empty: give it some text or pass another corpus")
    if not _is_text_file(path):
        return
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=len(head) == size)
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise InputError(f"{label} {str(path)!r} is a binary file, not UTF-8 text: pass a text, .jsonl or .parquet corpus")
    if len(head) == size and not text.strip():
        raise InputError(f"{label} {str(path)!r} is empty (only whitespace): give it some text or pass another corpus")


def check_corpus(spec: CorpusSpec) -> None:
    """Cheap check before any model is loaded: a local corpus exists, is readable, and is non-empty text.
    Hub dataset ids and the built-in python-stdlib / python-packages sources pass (checked when loaded).
    Raises InputError with one line naming the file and the fix."""
    source = spec.source
    if _python_corpus(source) is not None:
        return
    path = Path(source).expanduser()
    if not path.exists():
        if _looks_like_path(source):
            raise InputError(f"corpus {source!r} does not exist: pass a text file, directory, .jsonl/.parquet or hub dataset id")
        return  # a hub dataset id
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            raise InputError(f"corpus directory {source!r} cannot be read (no permission): fix its permissions or pass another corpus")
        files = [Path(f) for f in _local_files(path)]
        if all(f.stat().st_size == 0 for f in files):
            raise InputError(f"corpus directory {source!r} is empty: its {len(files)} text file(s) hold no text")
        return
    if not path.is_file():
        raise InputError(f"corpus {source!r} is not a regular file or directory: pass a text file, directory, .jsonl or .parquet")
    _sniff(path, "corpus")


def _read_paragraphs(path: Path) -> list[str]:
    """A text file's paragraphs (split at blank lines), as `datasets`' text builder with sample_by=paragraph."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read().split("\n\n")
    except UnicodeDecodeError as exc:
        raise InputError(f"corpus {str(path)!r} is not UTF-8 text (byte {exc.start}): pass a text, .jsonl or .parquet corpus") from exc


def _read_documents(files: list[str]) -> list[str]:
    """Whole files as documents; undecodable bytes dropped (source trees hold the odd latin-1 file)."""
    texts = []
    for name in files:
        with open(name, encoding="utf-8", errors="ignore") as fh:
            texts.append(fh.read())
    return texts


def _root_cause(exc: BaseException) -> str:
    """The first line of the innermost cause (datasets wraps the real error in DatasetGenerationError)."""
    while exc.__cause__ is not None or (exc.__context__ is not None and not exc.__suppress_context__):
        exc = exc.__cause__ or exc.__context__
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _load_with_datasets(spec: CorpusSpec, path: Path | None) -> tuple[object, str]:
    if path is None and not hub_offline():
        reason = hub_unreachable()  # before datasets' minute of retries
        if reason is not None:
            raise InputError(f"cannot load corpus {spec.describe()!r}: the Hugging Face hub is unreachable ({reason}): "
                             "pass a local file or directory, or set HF_HUB_OFFLINE=1 to use a cached copy")
    import datasets

    if path is not None:
        # a local file: no progress bar, and no logged error before the one line a damaged file gives
        import logging

        from datasets.utils import logging as ds_logging

        bars, logger = ds_logging.is_progress_bar_enabled(), logging.getLogger("datasets")
        level = logger.level
        ds_logging.disable_progress_bar()
        logger.setLevel(logging.CRITICAL)
        try:
            ds = datasets.load_dataset(DATASET_SUFFIXES[path.suffix.lower()], data_files=[str(path)], split="train")
        finally:
            logger.setLevel(level)
            if bars:
                ds_logging.enable_progress_bar()
    else:
        ds = datasets.load_dataset(spec.source, spec.config, split=spec.split or "train")
    return ds, spec.text_column


def _read_errors() -> tuple[type[BaseException], ...]:
    """What reading a damaged file through `datasets` raises (without importing datasets if it is not loaded)."""
    errors: list[type[BaseException]] = [ValueError, UnicodeError, EOFError]
    if "datasets" in sys.modules:
        errors.append(sys.modules["datasets"].exceptions.DatasetsError)
    if "pyarrow" in sys.modules:
        errors.append(sys.modules["pyarrow"].lib.ArrowException)
    return tuple(errors)


def load_texts(spec: CorpusSpec) -> list[str]:
    """Documents of the corpus as a list of strings (empty documents dropped). Text files and directories
    are read in plain Python; `datasets` is imported only for .jsonl/.json/.parquet files and hub ids."""
    source = spec.source
    path = Path(source).expanduser()
    check_corpus(spec)
    try:
        python = _python_corpus(source)
        if python or path.is_dir():
            texts = _read_documents(python_source_files(*python) if python else _local_files(path))
        elif path.is_file() and path.suffix.lower() not in DATASET_SUFFIXES:
            texts = _read_paragraphs(path)
        else:
            ds, column = _load_with_datasets(spec, path if path.is_file() else None)
            if column not in ds.column_names:
                raise InputError(f"corpus {spec.describe()!r} has no {column!r} column (columns: "
                                 f"{', '.join(ds.column_names)}): use --text-column")
            texts = ds[column]
    except InputError:
        raise
    except (FileNotFoundError, ConnectionError) as exc:
        raise InputError(f"cannot load corpus {spec.describe()!r} ({_root_cause(exc)}): with no network, pass a "
                         "local file or directory") from exc
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else _root_cause(exc)
        raise InputError(f"cannot read corpus {spec.describe()!r} ({reason}): fix the file or pass another corpus") from exc
    except _read_errors() as exc:  # datasets' DatasetGenerationError, ValueError, pyarrow errors for damaged files
        raise InputError(f"cannot read corpus {spec.describe()!r} ({_root_cause(exc)}): fix the file or pass "
                         "a text, .jsonl or .parquet corpus") from exc
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
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
            "give more text or a smaller seq len"
        )
    n_held = max(1, int(round(len(blocks) * heldout_frac)))
    return PackedCorpus(blocks[:-n_held], blocks[-n_held:], seq_len, bos_id is not None, description)


def load_corpus(spec: CorpusSpec, tokenizer, seq_len: int, heldout_frac: float = 0.05) -> PackedCorpus:
    return pack_corpus(tokenizer, load_texts(spec), seq_len, heldout_frac, spec.describe())
