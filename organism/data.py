"""Stage 1, data (CPU, `datasets`, `tokenizers`): corpus -> byte-level BPE tokenizer (prepends BOS) + token
stream (safetensors), so preparation and pretraining can run on different machines."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from engine.atomic import atomic_write_text
from engine.corpus import CorpusSpec, load_texts, token_stream
from engine.errors import InputError
from engine.events import NullSink, PhaseChanged, Sink
from engine.tokenizer import train_bpe_tokenizer

DATA_FILE = "tokens.safetensors"
DATA_META = "data.json"
TOKENIZER_CHARS = 64_000_000  # more text than this gains the 4k-token BPE little and costs minutes


def prepare_data(spec: CorpusSpec, out_dir: str | Path, vocab_size: int = 4096, heldout_frac: float = 0.02,
                 sink: Sink | None = None, tokenizer_chars: int = TOKENIZER_CHARS) -> dict:
    """Train the tokenizer on the corpus and write it with the tokenised stream into `out_dir`."""
    sink = sink or NullSink()
    sink.emit(PhaseChanged("prepare", f"reading {spec.describe()}"))
    return prepare_texts(load_texts(spec), spec.describe(), out_dir, vocab_size, heldout_frac, sink, tokenizer_chars)


def sample_stride(texts: list[str], max_chars: int) -> int:
    """k such that every k-th document holds about `max_chars` characters (1 when all of them fit)."""
    return max(1, math.ceil(sum(map(len, texts)) / max(max_chars, 1)))


def tokenizer_sample(texts: list[str], max_chars: int) -> list[str]:
    """Every k-th document, k chosen so the sample holds about `max_chars` characters (all when fewer)."""
    return texts[:: sample_stride(texts, max_chars)]


def prepare_texts(texts: list[str], description: str, out_dir: str | Path, vocab_size: int = 4096,
                  heldout_frac: float = 0.02, sink: Sink | None = None, tokenizer_chars: int = TOKENIZER_CHARS) -> dict:
    """`prepare_data` for documents already read: the tokenizer is trained on an evenly spread sample of at
    most about `tokenizer_chars` characters; the last `heldout_frac` of the token stream is held out."""
    from safetensors.torch import save_file

    sink = sink or NullSink()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sample = tokenizer_sample(texts, tokenizer_chars)
    sink.emit(PhaseChanged("prepare", f"training a {vocab_size}-token BPE on {len(sample)} of {len(texts)} documents"))
    tokenizer = train_bpe_tokenizer(sample, vocab_size=vocab_size)
    sink.emit(PhaseChanged("prepare", "tokenising"))
    stream = token_stream(tokenizer, texts)
    n_held = max(int(len(stream) * heldout_frac), 1)
    if len(stream) - n_held < 4 * 512:
        raise InputError(f"corpus {description!r} gives only {len(stream)} tokens: give more text")
    tokenizer.save_pretrained(out)
    dtype = torch.int16 if len(tokenizer) < 2**15 else torch.int32
    save_file({"train": stream[:-n_held].to(dtype).contiguous(), "heldout": stream[-n_held:].to(dtype).contiguous()}, out / DATA_FILE)
    meta = {"corpus": description, "documents": len(texts), "characters": sum(map(len, texts)),
            "tokenizer_documents": len(sample), "tokens": len(stream), "heldout_tokens": n_held,
            "vocab_size": len(tokenizer)}
    atomic_write_text(out / DATA_META, json.dumps(meta, indent=1))
    return meta


def load_data(data_dir: str | Path):
    """The tokenizer and the train / held-out token streams that `prepare_texts` wrote into `data_dir`."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    data_dir = Path(data_dir)
    if not (data_dir / DATA_FILE).is_file():
        raise InputError(f"{data_dir} holds no {DATA_FILE}: run head-surgeon organism --prepare-only first")
    tensors = load_file(data_dir / DATA_FILE)
    tokenizer = AutoTokenizer.from_pretrained(data_dir)
    return tokenizer, tensors["train"].long(), tensors["heldout"].long()
