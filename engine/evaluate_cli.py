"""`head-surgeon evaluate`: the perplexity of a model (or base + patch) on every block of a corpus.

    result = corpus_perplexity(loaded, CorpusSpec("notes.txt"), seq_len=512, blocks=100)
gives perplexity, mean loss, tokens scored and blocks used (all of the corpus's blocks, or the first N),
the numbers `engine.evaluate.perplexity(mean_loss(...))` gives on the same blocks.
"""

from __future__ import annotations

from typing import Any

import torch

from .corpus import CorpusSpec, adds_bos, load_texts, pack_blocks, token_stream
from .errors import InputError
from .evaluate import mean_loss, perplexity


def corpus_blocks(spec: CorpusSpec, tokenizer, seq_len: int) -> torch.Tensor:
    """Every block of `seq_len` tokens of the corpus (no held-out split), each starting with BOS when the
    tokenizer adds one, as operate packs them."""
    if seq_len < 2:
        raise InputError(f"--seq-len must be at least 2 (got {seq_len})")
    bos_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    blocks = pack_blocks(token_stream(tokenizer, load_texts(spec)), seq_len, bos_id)
    if not len(blocks):
        raise InputError(f"corpus {spec.describe()!r} is too small for seq len {seq_len}: it gives no block; "
                         "give more text or a smaller --seq-len")
    return blocks


def corpus_perplexity(loaded, spec: CorpusSpec, seq_len: int, blocks: int | None = None,
                      batch_size: int = 8) -> dict[str, Any]:
    """Mean next-token loss and perplexity of `loaded` over all the corpus's blocks, or the first `blocks`."""
    if blocks is not None and blocks < 1:
        raise InputError(f"--blocks must be at least 1 (got {blocks})")
    loaded.adapter.check_length(seq_len, "seq len")
    every = corpus_blocks(spec, loaded.tokenizer, seq_len)
    used = every[:blocks] if blocks else every
    loss = mean_loss(loaded.model, used, batch_size)
    return {"perplexity": perplexity(loss), "mean_loss": loss, "tokens": int(used[:, 1:].numel()),
            "blocks": len(used), "blocks_in_corpus": len(every), "seq_len": seq_len, "corpus": spec.describe()}


def apply_patch(loaded, tensors: dict[str, torch.Tensor], meta: dict[str, Any], what: str,
                force: bool = False) -> list[tuple[int, int]]:
    """Write a loaded patch into `loaded`; a patch made for other weights is refused unless `force`."""
    from .model import check_identity
    from .patch import apply_head_tensors

    if not force:
        check_identity(meta.get("base_model", {}), loaded, what)
    return apply_head_tensors(loaded.model, loaded.adapter, tensors)


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The console lines: perplexity, mean loss, tokens, and which blocks were scored."""
    used, total = result["blocks"], result["blocks_in_corpus"]
    which = "all of the corpus's" if used == total else f"the first {used} of {total}"
    return [f"perplexity  {result['perplexity']:.4f}",
            f"mean loss   {result['mean_loss']:.4f} nats",
            f"tokens      {result['tokens']} (scored)",
            f"blocks      {used}: {which} blocks of {result['seq_len']} tokens of {result['corpus']}"]
