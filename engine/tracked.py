"""The tracked in-domain set: a fixed text set whose perplexity is measured before, at every evaluation point
and after a surgery (the paper's "training PPL", Tables 2 and 9, was such a set of in-domain texts).

By default it is `track_blocks` training blocks, evenly spaced over the training split (the same blocks
at every point, whatever the seed); `track_texts` names a text file to use instead, as the paper's scripts
did with their eight fixed texts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .corpus import PackedCorpus
from .diagnosis import tokenize_prompts
from .errors import InputError
from .evaluate import mean_loss, prompt_loss
from .prompts import load_prompts


@dataclass
class TrackedSet:
    """Either fixed training blocks or tokenised texts; `loss` is their token-weighted mean loss."""

    description: str
    blocks: torch.Tensor | None = None
    texts: list[list[int]] | None = None
    pad_id: int = 0

    def loss(self, model, batch_size: int = 8) -> float:
        if self.texts is not None:
            return prompt_loss(model, self.texts, self.pad_id, batch_size)
        return mean_loss(model, self.blocks, batch_size)


def track_blocks(corpus: PackedCorpus, n: int) -> torch.Tensor:
    """`n` training blocks evenly spaced over the training split (all of them when it has fewer)."""
    total = len(corpus.train)
    if n >= total:
        return corpus.train
    return corpus.train[torch.linspace(0, total - 1, n).round().long()]


def tracked_set(corpus: PackedCorpus, tokenizer, *, blocks: int, texts: str | None,
                max_len: int) -> TrackedSet | None:
    """The job's tracked set, or None when it has none (`blocks` 0 and no `texts`)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if texts:
        ids = tokenize_prompts(tokenizer, load_prompts(texts, what="track texts file"), max_len)
        if not ids:
            raise InputError(f"track texts file {texts!r} has no text of two tokens or more: add longer texts")
        return TrackedSet(f"{len(ids)} texts of {texts}", texts=ids, pad_id=pad)
    if blocks < 1:
        return None
    chosen = track_blocks(corpus, blocks)
    return TrackedSet(f"{len(chosen)} training blocks, evenly spaced", blocks=chosen, pad_id=pad)
