"""Head diagnosis: run prompts through the model and reduce attention to per-(layer, head) statistics.

A forward hook on every attention module reduces that layer's probabilities to per-head sums at once
and drops them, so at most one layer's [B, H, L, L] tensor is alive. A forward hook on every `dense`
measures each head's output norm through its own columns. The body of the model is called without the
LM head, so no full-vocabulary logits are built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .arch import Adapter, base_model
from . import fused_stats
from .distributed import all_sum, any_rank, spread
from .fastpath import probabilities_exposed
from .errors import InputError
from .events import DiagnosisProgress, NullSink, Sink
from .report import HeadReport, Thresholds


@dataclass
class DiagnosisSettings:
    """How heads are measured: the same settings before, at every evaluation point and after a surgery."""

    batch_size: int = 8
    max_len: int = 512
    thresholds: Thresholds = field(default_factory=Thresholds)
    prompts: str | None = None  # a .jsonl/.txt file; None: the built-in prompts

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_len < 2:
            raise InputError(f"the diagnosis batch size must be at least 1 and max len at least 2 (got "
                             f"{self.batch_size}, {self.max_len})")

    def to_dict(self) -> dict:
        return {"batch_size": self.batch_size, "max_len": self.max_len, "prompts": self.prompts,
                "thresholds": vars(self.thresholds).copy()}

    @classmethod
    def from_dict(cls, data: dict) -> "DiagnosisSettings":
        return cls(batch_size=int(data.get("batch_size", 8)), max_len=int(data.get("max_len", 512)),
                   thresholds=Thresholds(**data.get("thresholds", {})), prompts=data.get("prompts"))


def tokenize_prompts(tokenizer, prompts: list[str], max_len: int) -> list[list[int]]:
    """Token ids per prompt with the tokenizer's own special tokens (a BOS it adds is position 0).
    Prompts shorter than two tokens have no query besides position 0 and are dropped."""
    ids = [tokenizer(text, add_special_tokens=True, truncation=True, max_length=max_len)["input_ids"] for text in prompts]
    return [x for x in ids if len(x) >= 2]


def right_padded_batches(token_ids: list[list[int]], batch_size: int, pad_id: int):
    """Yield (input_ids, attention_mask) batches, right-padded, longest prompts grouped together.

    Right padding keeps key 0 the first real token of every row, and causal masking means real queries
    never see pads, so padding cannot change any statistic."""
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    for start in range(0, len(order), batch_size):
        rows = [token_ids[i] for i in order[start : start + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        yield ids, mask


def query_weights(attention_mask: torch.Tensor) -> torch.Tensor:
    """1.0 for every real query position except position 0, else 0.0; shape [B, L]."""
    w = attention_mask.to(torch.float32).clone()
    w[:, 0] = 0.0
    return w


class HeadStatsCollector:
    """Hooks that accumulate per-head sums over every batch run while attached."""

    def __init__(self, model: torch.nn.Module, adapter: Adapter):
        self.model, self.adapter = model, adapter
        # Sums stay on the model's device until `means()`: a copy to the host per layer would stall the GPU.
        # Rows: BOS mass, entropy, local mass, head output norm.
        device = next(model.parameters()).device
        self.sums = torch.zeros((4, adapter.n_layer, adapter.n_head), dtype=torch.float64, device=device)
        self.layer_norm = torch.zeros(adapter.n_layer, dtype=torch.float64, device=device)
        self.count = 0.0
        self._weights: torch.Tensor | None = None
        self._grams: dict[int, torch.Tensor] = {}
        self._handles: list = []
        self.dense_terms = fused_stats.dense_terms  # the fused path on CUDA sets the compiled one

    def __enter__(self) -> "HeadStatsCollector":
        for layer in range(self.adapter.n_layer):
            attn = self.adapter.attention(self.model, layer)
            self._handles.append(attn.register_forward_hook(self._attention_hook(layer)))
            self._handles.append(self.adapter.dense(self.model, layer).register_forward_hook(self._dense_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def skip_batch(self) -> None:
        """The next forward is not measured (a rank's filler pass in a distributed run)."""
        self._weights = None

    def reduce_over_ranks(self) -> None:
        """Sum every rank's sums, so each rank holds the statistics of all prompts."""
        all_sum(self.sums)
        all_sum(self.layer_norm)
        self.count = float(all_sum(torch.tensor([self.count], dtype=torch.float64, device=self.sums.device)).item())

    def set_batch(self, attention_mask: torch.Tensor) -> None:
        weights = query_weights(attention_mask)
        self.count += float(weights.sum())
        self._weights = weights.to(next(self.model.parameters()).device)

    def _attention_hook(self, layer: int):
        def hook(module, args, output):
            probs = output[1]  # [B, H, Lq, Lk]: returned by every family's attention (see fastpath.probabilities_exposed)
            if probs is None or self._weights is None:
                return
            with torch.no_grad():
                self._reduce_probs(layer, probs.float())

        return hook

    def _reduce_probs(self, layer: int, p: torch.Tensor) -> None:
        # Few, large kernels: diagnosis is launch-bound on a GPU when the hooks issue many small ones.
        entropy = -torch.special.xlogy(p, p).sum(-1)
        self.add_row_stats(layer, torch.stack((p[..., 0], entropy, fused_stats.local_band(p))))

    def add_row_stats(self, layer: int, stats: torch.Tensor) -> None:
        """Add one batch's per-row statistics [3, B, H, Lq] (BOS mass, entropy, local mass) of `layer`."""
        if self._weights is None:
            return
        self.sums[:3, layer] += (stats * self._weights[None, :, None, :]).sum(dim=(1, 3)).double()

    def _dense_hook(self, layer: int):
        def hook(module, args, output):
            if self._weights is None:
                return
            with torch.no_grad():
                self._reduce_dense(layer, module, args[0], output)

        return hook

    def _gram(self, layer: int, module) -> torch.Tensor:
        """W_h^T W_h per head ([H, d, d]); weights are fixed while a collector is attached."""
        if layer not in self._grams:
            n_head, d = self.adapter.n_head, self.adapter.head_dim
            w = module.weight.float().view(-1, n_head, d).transpose(0, 1)  # [H, hidden, d]
            self._grams[layer] = torch.bmm(w.transpose(1, 2), w)
        return self._grams[layer]

    def _reduce_dense(self, layer: int, module, ctx: torch.Tensor, out: torch.Tensor) -> None:
        heads, total = self.dense_terms(ctx, out, self._gram(layer, module), module.bias, self._weights)
        self.sums[3, layer] += heads.double()
        self.layer_norm[layer] += total.double()

    def means(self) -> dict[str, np.ndarray]:
        n = max(self.count, 1.0)
        sums = self.sums.cpu()
        out = {name: (sums[i] / n).numpy() for i, name in enumerate(("bos_mass", "entropy", "local_mass"))}
        out["contribution"] = (sums[3] / self.layer_norm.cpu().clamp_min(1e-12)[:, None]).numpy()
        return out


@torch.no_grad()
def run_statistics(
    model: torch.nn.Module,
    adapter: Adapter,
    token_ids: list[list[int]],
    *,
    batch_size: int = 8,
    pad_id: int = 0,
    sink: Sink | None = None,
    cancelled=lambda: False,
    path: str | None = None,
) -> tuple[dict[str, np.ndarray], int]:
    """Per-head mean statistics over `token_ids`; returns (stats, number of query positions). `path`: "eager"
    reads the attention probabilities the model computes; "fused" reduces BLOOM's scores in one kernel
    without writing probabilities (engine.fused_stats); default: fused where it is available (BLOOM on CUDA)."""
    sink = sink or NullSink()
    device = next(model.parameters()).device
    path = path or ("fused" if fused_stats.available(adapter, device) else "eager")
    if path not in ("fused", "eager") or (path == "fused" and adapter.family != "bloom"):
        raise InputError(f"diagnosis path {path!r}: use eager, or fused for BLOOM")
    body = base_model(model)
    was_training = model.training
    model.eval()
    done = 0
    try:
        collector = HeadStatsCollector(model, adapter)
        if path == "fused" and device.type == "cuda":
            collector.dense_terms = fused_stats.compiled_dense_terms()
        with collector, (
                fused_stats.statistics_attention(model, adapter, collector.add_row_stats) if path == "fused"
                else probabilities_exposed(model, adapter)):
            # in a distributed run each rank measures its share of the batches, and the sums are added up
            for (ids, mask), real in spread(list(right_padded_batches(token_ids, batch_size, pad_id))):
                if any_rank(cancelled(), device):
                    break
                if real:
                    collector.set_batch(mask)
                else:
                    collector.skip_batch()
                body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                done += len(ids) * real
                sink.emit(DiagnosisProgress(done, len(token_ids), int(collector.count)))
            collector.reduce_over_ranks()
    finally:
        model.train(was_training)
    return collector.means(), int(collector.count)


def diagnose(
    loaded,
    prompts: list[str],
    settings: DiagnosisSettings | None = None,
    *,
    sink: Sink | None = None,
    cancelled=lambda: False,
) -> HeadReport:
    """Diagnose every head of a `LoadedModel` on `prompts`."""
    settings = settings or DiagnosisSettings()
    loaded.adapter.check_length(settings.max_len, "diagnosis max length")
    tok = loaded.tokenizer
    token_ids = tokenize_prompts(tok, prompts, settings.max_len)
    if not token_ids:
        from .errors import InputError

        raise InputError("no prompt is at least two tokens long: give longer prompts")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    stats, n_tokens = run_statistics(
        loaded.model, loaded.adapter, token_ids, batch_size=settings.batch_size, pad_id=pad_id, sink=sink, cancelled=cancelled
    )
    adapter = loaded.adapter
    return HeadReport(
        model=loaded.ref,
        n_layer=adapter.n_layer,
        n_head=adapter.n_head,
        slopes=adapter.slopes,
        thresholds=settings.thresholds,
        n_prompts=len(token_ids),
        n_tokens=n_tokens,
        **stats,
    )
