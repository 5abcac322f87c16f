"""The frozen-prefix cache: every layer below the lowest target is frozen, so its output for a training block
never changes. The first time a block is trained, the hidden state leaving layer `lowest - 1` is kept (on the
model's device, or in pinned host memory, within a budget); every later visit skips those layers and feeds
the kept state to the lowest target layer. The model's own forward still runs (embeddings, masks, ALiBi);
only the prefix blocks are swapped for stand-ins while a cached block runs, so the numbers are the same as
without the cache (a CPU test checks the patch).

It is only used where it is exact and can pay: the prefix has no dropout, the run visits some block twice
(more than one epoch), and the lowest target is above layer 0. A micro-batch is fed from the cache only when
every block in it is kept: with micro-batches of several blocks and a budget smaller than the corpus, fewer
visits are served than blocks are kept.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
from torch import nn

DROPOUT_SETTINGS = ("hidden_dropout", "attention_dropout", "resid_pdrop", "emb_pdrop", "embd_pdrop")


class _Skip(nn.Module):
    """A prefix block while its output is known: passes the hidden state on unchanged."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states, None


class _Feed(nn.Module):
    """The last prefix block while its output is known: returns the kept output instead of computing it."""

    def __init__(self, hidden: torch.Tensor) -> None:
        super().__init__()
        self.hidden = hidden

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden, None


def prefix_dropout(config) -> float:
    """The largest dropout probability the model's config sets (MPT keeps its attention's in attn_config)."""
    values = [getattr(config, name, 0.0) or 0.0 for name in DROPOUT_SETTINGS]
    values.append(getattr(getattr(config, "attn_config", None), "attn_pdrop", 0.0) or 0.0)
    return float(max(values))


class PrefixCache:
    """Kept hidden states leaving the frozen prefix, one per training block index."""

    def __init__(self, blocks: nn.ModuleList, lowest: int, budget_bytes: int, where: str = "device") -> None:
        self.blocks, self.lowest, self.budget, self.where = blocks, lowest, budget_bytes, where
        self.store: dict[int, torch.Tensor] = {}
        self.bytes = 0
        self.hits = self.misses = 0

    @classmethod
    def for_run(cls, model, adapter, lowest: int, *, budget_gb: float, where: str, total_steps: int,
                steps_per_epoch: int) -> "PrefixCache | None":
        """A cache for this pass, or None where it would not be exact or would never be read. On a GPU the
        device budget is also held to half of the memory free when the pass starts."""
        if budget_gb <= 0 or lowest < 1 or total_steps <= steps_per_epoch or prefix_dropout(model.config) > 0:
            return None
        budget = int(budget_gb * 2**30)
        device = next(model.parameters()).device
        if where == "device" and device.type == "cuda":
            budget = min(budget, torch.cuda.mem_get_info(device)[0] // 2)
        return cls(adapter.blocks(model), lowest, budget, where)

    def around(self, block_ids: torch.Tensor):
        """The context to run the forward of these training blocks in: fed from the cache when every one is
        kept, else keeping what the prefix computes while the budget lasts."""
        keys = [int(i) for i in block_ids]
        if all(k in self.store for k in keys):
            self.hits += len(keys)
            return self._fed(keys)
        self.misses += len(keys)
        return self._keeping(keys) if self.bytes < self.budget else nullcontext()

    @contextmanager
    def _fed(self, keys: list[int]):
        last = self.blocks[self.lowest - 1]
        device = next(last.parameters()).device
        # pinned rows copy to the device asynchronously, each on its own, then stack there
        hidden = torch.stack([self.store[k].to(device, non_blocking=True) for k in keys])
        saved = [self.blocks[i] for i in range(self.lowest)]
        for i in range(self.lowest - 1):
            self.blocks[i] = _Skip()
        self.blocks[self.lowest - 1] = _Feed(hidden)
        try:
            yield
        finally:
            for i, block in enumerate(saved):
                self.blocks[i] = block

    @contextmanager
    def _keeping(self, keys: list[int]):
        def keep(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            pinned = self.where == "host" and hidden.is_cuda
            for row, key in zip(hidden.detach(), keys, strict=True):
                size = row.numel() * row.element_size()
                if pinned:  # the pinned-memory allocator hands out powers of two: count what it takes
                    size = 1 << (size - 1).bit_length()
                if key in self.store or self.bytes + size > self.budget:
                    continue
                if self.where == "device":
                    kept = row.clone()
                else:  # device -> pinned host copies run asynchronously, in stream order with the later reads
                    kept = torch.empty(row.shape, dtype=row.dtype, pin_memory=pinned)
                    kept.copy_(row, non_blocking=pinned)
                self.store[key] = kept
                self.bytes += size

        handle = self.blocks[self.lowest - 1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()
