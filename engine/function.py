"""What the targets did before the operation, judged against the model's own healthy heads.

A head is *functional* when ablating it (zeroing its output) raises held-out loss by at least
`functional_share` of the median rise that ablating one of the model's healthy heads causes, both
measured on the same blocks before the operation. A fixed positive floor would call any freshly trained
head functional; the healthy heads say what "doing work" means in this model. When the healthy heads do
not measurably help (median rise <= 0), the threshold falls back to `ablation_min_delta`.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

from .evaluate import EvalSettings, ablation_deltas, key, mean_loss
from .report import HEALTHY, HeadReport

Head = tuple[int, int]


def reference_heads(before: HeadReport, exclude: list[Head], n: int, seed: int) -> list[Head]:
    """Up to `n` healthy heads, not among `exclude`, drawn with `seed` (all of them when there are fewer)."""
    healthy = sorted(set(before.of_class(HEALTHY)) - set(exclude))
    return sorted(random.Random(seed).sample(healthy, min(n, len(healthy))))


@torch.no_grad()
def function_baseline(loaded, before: HeadReport, targets: list[Head], blocks: torch.Tensor,
                      settings: EvalSettings, seed: int = 0) -> dict[str, Any]:
    """The functional threshold from healthy heads, and each target's ablation effect and contribution."""
    model, adapter = loaded.model, loaded.adapter
    base_loss = mean_loss(model, blocks, settings.batch_size)
    reference = reference_heads(before, targets, settings.reference_heads, seed)
    ref = ablation_deltas(model, adapter, reference, blocks, settings.batch_size, base_loss)
    median = float(np.median(list(ref.values()))) if ref else float("nan")
    threshold = settings.functional_share * median if median > 0 else settings.ablation_min_delta
    function = {
        "rule": f"ablating the head raises held-out loss by at least {settings.functional_share:g} x the median "
                f"rise of {len(reference)} healthy heads (measured before the operation)",
        "reference": {"heads": [key(h) for h in reference], "median_ablation_delta": median,
                      "share": settings.functional_share, "threshold": threshold},
        "targets": {}, "working": [],
    }
    add_targets(function, loaded, before, targets, blocks, settings, base_loss)
    return function


@torch.no_grad()
def add_targets(function: dict[str, Any], loaded, before: HeadReport, targets: list[Head], blocks: torch.Tensor,
                settings: EvalSettings, base_loss: float | None = None) -> list[str]:
    """Measure more targets against the same threshold (a second pass's, resolved later); `loaded` must
    hold the base model. Returns the new targets that were doing measurable work."""
    threshold = function["reference"]["threshold"]
    new = [t for t in targets if key(t) not in function["targets"]]
    deltas = ablation_deltas(loaded.model, loaded.adapter, new, blocks, settings.batch_size, base_loss)
    working = []
    for l, h in new:
        delta = deltas[key((l, h))]
        function["targets"][key((l, h))] = {"ablation_delta": delta, "contribution": float(before.contribution[l, h]),
                                            "class": str(before.classes[l, h]), "functional": bool(delta >= threshold)}
        if delta >= threshold:
            working.append(key((l, h)))
    function["working"] += working
    return working


def working_notice(working: list[str], of: int) -> str | None:
    """A warning (never a refusal) when targets were doing measurable work before the operation."""
    if not working:
        return None
    shown = ", ".join(working[:8]) + ("…" if len(working) > 8 else "")
    return (f"{len(working)} of {of} targets were doing measurable work before the operation "
            f"({shown}): re-initialising them may cost function; a sham control arm tells what it buys")
