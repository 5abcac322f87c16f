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
from . import flash_stats, fused_stats
from .distributed import all_sum, any_rank, spread, world
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


def batch_rows(token_ids: list[list[int]], batch_size: int) -> list[list[list[int]]]:
    """The prompts' token lists in batches of `batch_size`, longest first, so that a batch's rows are of similar
    lengths (little padding)."""
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    return [[token_ids[i] for i in order[start : start + batch_size]] for start in range(0, len(order), batch_size)]


def right_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of one batch's rows, right-padded to the longest.

    Right padding keeps key 0 the first real token of every row, and causal masking means real queries
    never see pads, so padding cannot change any statistic."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[*r, *[pad_id] * (width - len(r))] for r in rows], dtype=torch.long)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    return ids, mask


def right_padded_batches(token_ids: list[list[int]], batch_size: int, pad_id: int):
    """Yield (input_ids, attention_mask) batches, right-padded, longest prompts grouped together."""
    for rows in batch_rows(token_ids, batch_size):
        yield right_padded(rows, pad_id)


ROWS_BUDGET_BYTES = 256 * 2**20  # the kernel path's per-batch row buffers (HeadStatsCollector.layer_buffers)


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device` without waiting: on CUDA from pinned memory, so that the host does not
    stall until the GPU has finished the previous batch (a plain copy from pageable memory waits)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def query_weights(attention_mask: torch.Tensor) -> torch.Tensor:
    """1.0 for every real query position except position 0, else 0.0; shape [B, L]."""
    w = attention_mask.to(torch.float32).clone()
    w[:, 0] = 0.0
    return w


class HeadStatsCollector:
    """Per-head sums over every batch run while attached: from hooks on the attention and output projection
    modules (the eager and scores paths), or written by the statistics kernel's attention forward into
    `layer_buffers` and added up by `end_batch` (`hooks=False`)."""

    def __init__(self, model: torch.nn.Module, adapter: Adapter, *, hooks: bool = True):
        self.model, self.adapter = model, adapter
        # Sums stay on the model's device until `means()`: a copy to the host per layer would stall the GPU.
        # Rows: BOS mass, entropy, local mass, head output norm.
        device = next(model.parameters()).device
        self.sums = torch.zeros((4, adapter.n_layer, adapter.n_head), dtype=torch.float64, device=device)
        self.layer_norm = torch.zeros(adapter.n_layer, dtype=torch.float64, device=device)
        self.count = 0.0
        self._weights: torch.Tensor | None = None
        self._grams: dict[int, torch.Tensor] = {}
        self._gram_parts: dict[int, tuple] = {}
        self._rows: torch.Tensor | None = None  # the kernel path's per-batch buffers (layer_buffers)
        self._norms: torch.Tensor | None = None
        self._written: set[int] = set()
        self._pending: list[int] = []  # the layers whose rows the buffers hold
        self._handles: list = []
        self._hooks = hooks
        self.dense_terms = fused_stats.dense_terms  # the scores path on CUDA sets the compiled one

    def __enter__(self) -> "HeadStatsCollector":
        for layer in range(self.adapter.n_layer if self._hooks else 0):
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
        self._weights = to_device(weights, self.sums.device)

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

    def _head_grams(self, module) -> torch.Tensor:
        """W_h^T W_h per head ([H, d, d], fp32) of an output projection."""
        n_head, d = self.adapter.n_head, self.adapter.head_dim
        w = module.weight.float().view(-1, n_head, d).transpose(0, 1)  # [H, hidden, d]
        return torch.bmm(w.transpose(1, 2), w)

    def _gram(self, layer: int, module) -> torch.Tensor:
        """`_head_grams`, kept per layer; weights are fixed while a collector is attached."""
        if layer not in self._grams:
            self._grams[layer] = self._head_grams(module)
        return self._grams[layer]

    def gram_parts(self, layer: int, module, dtype: torch.dtype) -> tuple:
        """The output projection's per-head Gram matrices as the statistics kernel multiplies them (only these
        are kept on the kernel path, not the fp32 matrices too)."""
        if layer not in self._gram_parts:
            self._gram_parts[layer] = flash_stats.gram_parts(self._head_grams(module), dtype)
        return self._gram_parts[layer]

    def layer_buffers(self, layer: int, batch: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the statistics kernel writes `layer`'s per-row statistics [4, H, B, L] (BOS mass, entropy,
        local mass, head output norm) and output norms ||y - b|| [B * L] for this batch. The buffers hold as
        many consecutive layers as fit in ROWS_BUDGET_BYTES (every layer of bloom-1b7 and bloom-7b1 at 8 x 512)
        and are added up, weighted, when full and at `end_batch`: two small kernels per group of layers, not
        several per layer (diagnosis is host-bound on a GPU)."""
        per_layer = 4 * self.adapter.n_head * batch * length * 4  # 4 statistics, fp32
        group = max(1, min(self.adapter.n_layer, ROWS_BUDGET_BYTES // per_layer))
        shape = (group, 4, self.adapter.n_head, batch, length)
        if self._rows is None or self._rows.shape != shape:
            self._flush()
            device = self.sums.device
            self._rows = torch.empty(shape, dtype=torch.float32, device=device)
            self._norms = torch.empty((group, batch * length), dtype=torch.float32, device=device)
        if len(self._pending) == group or (self._pending and layer != self._pending[-1] + 1):
            self._flush()
        self._pending.append(layer)
        self._written.add(layer)
        return self._rows[len(self._pending) - 1], self._norms[len(self._pending) - 1]

    def _flush(self) -> None:
        """Add the buffered layers' rows (consecutive layers, from `layer_buffers`) to the sums."""
        pending, self._pending = self._pending, []
        if not pending or self._weights is None:  # a skipped batch's rows are dropped
            return
        n, first, w = len(pending), pending[0], self._weights.view(-1)
        self.sums[:, first : first + n] += (self._rows[:n].view(n, 4, self.adapter.n_head, -1) @ w).transpose(0, 1)
        self.layer_norm[first : first + n] += self._norms[:n] @ w

    def end_batch(self) -> None:
        """Add the rest of the batch's statistics from `layer_buffers` (the kernel path)."""
        written, self._written = self._written, set()
        measured = self._weights is not None and self._rows is not None
        self._flush()
        if measured and len(written) != self.adapter.n_layer:
            raise RuntimeError(f"the statistics kernel measured {len(written)} of {self.adapter.n_layer} layers")

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


PATH_ENV = "HEAD_SURGEON_DIAGNOSIS_PATH"


def resolve_path(adapter: Adapter, device: torch.device, path: str | None = None) -> str:
    """The diagnosis path `run_statistics` takes for `path`; None: the one named by the environment variable
    HEAD_SURGEON_DIAGNOSIS_PATH (kernel, scores or eager: every diagnosis of the process and of the runs it
    starts), else the default for the family and device (`fused_stats.default_path`)."""
    import os

    source = "diagnosis path"
    if path is None and os.environ.get(PATH_ENV):
        path, source = os.environ[PATH_ENV], PATH_ENV
    path = path or fused_stats.default_path(adapter, device)
    if path not in fused_stats.PATHS or (path != "eager" and adapter.family != "bloom"):
        raise InputError(f"{source} {path!r}: use eager, or kernel or scores for BLOOM")
    if path == "kernel" and not flash_stats.kernel_available(device):
        raise InputError(f"{source} 'kernel': the statistics kernel needs Triton and a CUDA GPU of compute "
                         "capability 8.0 or newer: use scores or eager")
    return path


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
    """Per-head mean statistics over `token_ids`; returns (stats, number of query positions). `path` (BLOOM):
    "kernel" computes each layer's output and statistics in one flash-attention kernel (engine.flash_stats),
    "scores" reduces BLOOM's scores without writing probabilities (engine.fused_stats), "eager" reads the
    probabilities the model computes; default: `fused_stats.default_path` (the kernel on a GPU)."""
    sink = sink or NullSink()
    device = next(model.parameters()).device
    path = resolve_path(adapter, device, path)
    body = base_model(model)
    was_training = model.training
    model.eval()
    done = 0
    try:
        collector = HeadStatsCollector(model, adapter, hooks=path != "kernel")
        if path == "scores" and device.type == "cuda":
            collector.dense_terms = fused_stats.compiled_dense_terms()
        with collector, (
                fused_stats.statistics_attention(model, adapter, collector, kernel=path == "kernel")
                if path != "eager" else probabilities_exposed(model, adapter)):
            # in a distributed run each rank measures its share of the batches, and the sums are added up
            # each batch's tensors are made when it is reached, while the GPU runs the one before (so before
            # the ranks agree on cancelling, which waits for the GPU)
            for rows, real in spread(batch_rows(token_ids, batch_size)):
                ids, mask = right_padded(rows, pad_id)
                if any_rank(cancelled(), device):
                    break
                if real:
                    collector.set_batch(mask)
                else:
                    collector.skip_batch()
                # the kernel reads no mask: rows are right-padded, so causal masking alone keeps every real query
                # off the pads; passing none spares transformers the padding-aware mask and ALiBi it builds
                mask_arg = None if path == "kernel" else to_device(mask, device)
                body(input_ids=to_device(ids, device), attention_mask=mask_arg, use_cache=False)
                collector.end_batch()
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
    adapter = loaded.adapter
    parameter = next(loaded.model.parameters())
    path = resolve_path(adapter, parameter.device)
    stats, n_tokens = run_statistics(
        loaded.model, adapter, token_ids, batch_size=settings.batch_size, pad_id=pad_id, sink=sink,
        cancelled=cancelled, path=path
    )
    return HeadReport(
        model=loaded.ref,
        n_layer=adapter.n_layer,
        n_head=adapter.n_head,
        slopes=adapter.slopes,
        thresholds=settings.thresholds,
        n_prompts=len(token_ids),
        n_tokens=n_tokens,
        measurement={"path": path, "dtype": str(parameter.dtype).removeprefix("torch."), "device": parameter.device.type,
                     **world().record()},
        **stats,
    )
