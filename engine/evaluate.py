"""Measurements that say whether a repair worked: perplexity, ablation, recovery, drift, iatrogenic heads,
MLP dormancy and sampled completions. Pure functions over a model and data; no training here."""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from .arch import Adapter, base_model
from .distributed import all_sum, spread, whole, world
from .diagnosis import right_padded_batches
from .loss import causal_lm_loss
from .report import HEALTHY, SICK, HeadReport, Thresholds

Head = tuple[int, int]


@dataclass
class EvalSettings:
    """How a repair is judged (defaults follow the paper where it says)."""

    thresholds: Thresholds = field(default_factory=Thresholds)
    contribution_floor: float = 0.02  # share of the layer's attention output norm (without a function baseline)
    ablation_min_delta: float = 1e-4  # nats: the functional threshold when healthy heads measure no effect
    functional_share: float = 0.25  # functional: ablation raises loss by >= this x the healthy heads' median
    reference_heads: int = 16  # healthy heads ablated before the operation for that median
    verdict_tolerance: float = 0.005  # surgery and control perplexities within this relative gap tie
    ablation_blocks: int = 4
    drift_threshold: float = 0.05  # |delta BOS mass| of an untouched head that counts as drift
    dormancy_threshold: float = 1e-3  # activation dormancy: an MLP unit whose max |activation| stays below this
    weight_dormancy_threshold: float = 0.01  # the paper's: ||input row|| x ||output column|| of a unit below this
    completion_prompts: int = 3
    max_new_tokens: int = 100
    temperature: float = 0.7
    top_p: float = 0.92
    batch_size: int = 8


def key(head: Head) -> str:
    return f"{head[0]}.{head[1]}"


def _summed_loss(model, ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[float, int]:
    """(loss x tokens, tokens) of one batch."""
    device = next(model.parameters()).device
    ids = ids.to(device)
    mask = mask.to(device) if mask is not None else None
    hidden = base_model(model)(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    n = int(mask[:, 1:].sum()) if mask is not None else ids[:, 1:].numel()
    return float(causal_lm_loss(model.lm_head, hidden, ids, mask)) * n, n


def _mean_over(model, batches: list[tuple[torch.Tensor, torch.Tensor | None]]) -> float:
    """Token-weighted mean loss over batches; spread over the ranks of a distributed run and summed."""
    totals = torch.zeros(2, dtype=torch.float64)
    for (ids, mask), real in spread(batches):
        total, n = _summed_loss(model, ids, mask)
        if real:
            totals += torch.tensor([total, n], dtype=torch.float64)
    total, count = all_sum(totals.to(next(model.parameters()).device)).tolist()
    return total / max(count, 1)


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch_size: int = 8, attention_mask: torch.Tensor | None = None) -> float:
    """Token-weighted mean next-token loss over `blocks` ([N, L] token ids)."""
    return _mean_over(model, [(blocks[s : s + batch_size], None if attention_mask is None else
                               attention_mask[s : s + batch_size]) for s in range(0, len(blocks), batch_size)])


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 80.0))


@torch.no_grad()
def prompt_loss(model, token_ids: list[list[int]], pad_id: int, batch_size: int = 8) -> float:
    """Mean loss over a prompt set (right-padded, pads masked out)."""
    return _mean_over(model, list(right_padded_batches(token_ids, batch_size, pad_id)))


@contextmanager
def heads_ablated(model, adapter: Adapter, heads: list[Head]):
    """Zero the context vectors of `heads` before their layer's `dense` (the head contributes nothing)."""
    handles = []
    by_layer: dict[int, list[int]] = {}
    for l, h in heads:
        by_layer.setdefault(l, []).append(h)
    for layer, hs in by_layer.items():
        cols = torch.cat([torch.arange(adapter.dense_cols(h).start, adapter.dense_cols(h).stop) for h in hs])

        def pre_hook(module, args, cols=cols):
            return (args[0].index_fill(-1, cols.to(args[0].device), 0.0),) + tuple(args[1:])

        handles.append(adapter.dense(model, layer).register_forward_pre_hook(pre_hook))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def ablation_deltas(model, adapter: Adapter, heads: list[Head], blocks: torch.Tensor, batch_size: int = 8,
                    base_loss: float | None = None) -> dict[str, float]:
    """Per head: loss with that head's output zeroed minus the intact loss (> 0: the head helps)."""
    if base_loss is None:
        base_loss = mean_loss(model, blocks, batch_size)
    out = {}
    for head in heads:
        with heads_ablated(model, adapter, [head]):
            out[key(head)] = mean_loss(model, blocks, batch_size) - base_loss
    return out


def recovery(after: HeadReport, targets: list[Head], deltas: dict[str, float], settings: EvalSettings,
             before: HeadReport | None = None, function: dict | None = None) -> dict:
    """Woken (BOS mass back at or under the sink threshold) and functional, counted separately: a freshly
    re-initialised head is awake, not repaired. With `function` (engine.function.function_baseline)
    functional means ablating the head costs at least its threshold, judged against the model's healthy
    heads, and each target says whether it worked before and lost function; without one, contribution
    above the floor and any loss rise on ablation."""
    threshold = function["reference"]["threshold"] if function else None
    per_head = {}
    for l, h in targets:
        bos, contrib = float(after.bos_mass[l, h]), float(after.contribution[l, h])
        delta = float(deltas.get(key((l, h)), float("nan")))
        woken = bos <= settings.thresholds.sink
        if threshold is not None:
            functional = delta >= threshold
        else:
            functional = contrib > settings.contribution_floor and delta > settings.ablation_min_delta
        entry = {"bos_mass": bos, "entropy": float(after.entropy[l, h]), "local_mass": float(after.local_mass[l, h]),
                 "contribution": contrib, "ablation_delta": delta, "woken": woken, "functional": bool(functional)}
        if before is not None:
            entry["bos_mass_before"] = float(before.bos_mass[l, h])
            entry["contribution_before"] = float(before.contribution[l, h])
        if function is not None:
            was = function["targets"][key((l, h))]
            entry.update(ablation_delta_before=was["ablation_delta"], functional_before=was["functional"],
                         lost_function=bool(was["functional"] and not functional))
        per_head[key((l, h))] = entry
    out = {
        "targets": len(targets),
        "woken": sum(e["woken"] for e in per_head.values()),
        "functional": sum(e["functional"] for e in per_head.values()),
        "per_head": per_head,
    }
    if function is not None:
        out["functional_before"] = sum(e["functional_before"] for e in per_head.values())
        out["lost_function"] = sorted(k for k, e in per_head.items() if e["lost_function"])
        out["rule"], out["threshold"] = function["rule"], threshold
    return out


def untouched_mask(shape: tuple[int, int], targets: list[Head]) -> np.ndarray:
    mask = np.ones(shape, dtype=bool)
    for l, h in targets:
        mask[l, h] = False
    return mask


def drifted(before_bos: np.ndarray, after_bos: np.ndarray, targets: list[Head], threshold: float) -> np.ndarray:
    """Mask of untouched heads whose BOS mass moved by more than `threshold`."""
    delta = np.asarray(after_bos) - np.asarray(before_bos)
    return (np.abs(delta) > threshold) & untouched_mask(delta.shape, targets)


def drift(before: HeadReport, after: HeadReport, targets: list[Head], frozen: list[Head], threshold: float) -> dict:
    """Untouched heads whose BOS mass moved by more than `threshold`, split into heads outside the targeted
    columns and the listed frozen heads inside them, plus counts per head-index column. The summary (the
    paper's Tables 5-6): mean and worst |delta BOS mass| of the drifted heads and of all untouched heads."""
    frozen_set = set(frozen)
    target_cols = {h for _, h in targets}
    delta = after.bos_mass - before.bos_mass
    moved = drifted(before.bos_mass, after.bos_mass, targets, threshold)
    outside, frozen_drift, other = [], [], []
    for l, h in zip(*np.nonzero(moved)):
        l, h = int(l), int(h)
        item = {"head": key((l, h)), "delta_bos_mass": float(delta[l, h])}
        if (l, h) in frozen_set:
            frozen_drift.append(item)
        elif h not in target_cols:
            outside.append(item)
        else:
            other.append(item)
    untouched = untouched_mask(delta.shape, targets)
    magnitude = np.abs(delta)
    return {
        "threshold": threshold,
        "untouched_heads": int(untouched.sum()),
        "drifted": int(moved.sum()),
        "outside_target_columns": outside,
        "frozen_in_target_columns": frozen_drift,
        "other_in_target_columns": other,
        "per_column": [int(x) for x in moved.sum(axis=0)],
        "max_abs_delta": _max(magnitude[untouched]),
        "mean_abs_delta": _mean(magnitude[untouched]),
        "drifted_max_abs_delta": _max(magnitude[moved]),
        "drifted_mean_abs_delta": _mean(magnitude[moved]),
    }


def _max(values: np.ndarray) -> float:
    return float(values.max()) if values.size else 0.0


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else 0.0


def iatrogenic(before: HeadReport, after: HeadReport, targets: list[Head]) -> list[str]:
    """Heads that were healthy before and are sick (BOS-sink or dead) after, outside the targets."""
    b, a = before.classes, after.classes
    target_set = set(targets)
    return [key((l, h)) for l in range(before.n_layer) for h in range(before.n_head)
            if (l, h) not in target_set and b[l, h] == HEALTHY and a[l, h] in SICK]


@torch.no_grad()
def mlp_activation_dormancy(model, adapter: Adapter, token_ids: list[list[int]], pad_id: int, threshold: float,
                            batch_size: int = 8) -> list[float]:
    """Per layer: share of MLP hidden units whose |GeLU output| never exceeds `threshold` on the prompts."""
    device = next(model.parameters()).device
    blocks = adapter.blocks(model)
    peaks: list[torch.Tensor | None] = [None] * len(blocks)
    current_mask: list[torch.Tensor] = []
    handles = []
    for i, block in enumerate(blocks):
        def hook(module, args, i=i):
            act = args[0].float().abs() * current_mask[0][..., None]
            peak = act.amax(dim=(0, 1)).cpu()
            peaks[i] = peak if peaks[i] is None else torch.maximum(peaks[i], peak)

        handles.append(adapter.mlp_out(block).register_forward_pre_hook(hook))
    try:
        for ids, mask in right_padded_batches(token_ids, batch_size, pad_id):
            current_mask[:] = [mask.to(device, torch.float32)]
            base_model(model)(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return [float((p <= threshold).float().mean()) if p is not None else 0.0 for p in peaks]




@torch.no_grad()
def mlp_unit_strengths(model, adapter: Adapter) -> list[torch.Tensor]:
    """Per layer, per MLP unit: ||its input row of the up projection|| x ||its output column of the down one||."""
    strengths = []
    for b in adapter.blocks(model):
        with whole(adapter.mlp_in(b).weight) as w_in, whole(adapter.mlp_out(b).weight) as w_out:
            strengths.append((w_in.float().norm(dim=1) * w_out.float().norm(dim=0)).cpu())
    return strengths


def mlp_weight_dormancy(model, adapter: Adapter, threshold: float = 0.01) -> list[int]:
    """Per layer: MLP units dormant as the paper defines it, unit strength (`mlp_unit_strengths`) below
    `threshold`: a unit that reads or writes almost nothing, whatever the data."""
    return [int((strength < threshold).sum()) for strength in mlp_unit_strengths(model, adapter)]


@torch.no_grad()
def completions(model, tokenizer, prompts: list[str], settings: EvalSettings, seed: int = 0,
                max_len: int | None = None) -> list[dict]:
    """Seeded samples (temperature, top-p, max new tokens from `settings`) for the first prompts; prompt and
    completion stay within `max_len` tokens when the model takes no more (MPT)."""
    device = next(model.parameters()).device
    out = []
    for i, prompt in enumerate(prompts[: settings.completion_prompts]):
        keep = 64 if max_len is None else min(64, max_len - 1)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=True)["input_ids"][:, :keep].to(device)
        new = settings.max_new_tokens if max_len is None else min(settings.max_new_tokens, max_len - ids.shape[1])
        torch.manual_seed(seed + i)
        generated = model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=settings.temperature,
            top_p=settings.top_p, top_k=0, max_new_tokens=new, synced_gpus=world().active,  # ranks step together
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
        out.append({"prompt": tokenizer.decode(ids[0], skip_special_tokens=True), "completion": text})
    return out
