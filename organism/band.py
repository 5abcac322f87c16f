"""The band: the numbers the organism is judged by (how many heads collapsed onto BOS, and whether they are
the low-slope ones)."""

from __future__ import annotations

import numpy as np
import torch

from engine.diagnosis import run_statistics
from engine.report import HeadReport


def band_numbers(bos: np.ndarray) -> dict:
    """The numbers the organism is judged by, from a [layer, head] BOS-mass grid: share of heads above 0.5
    and the upper/lower head-index ratio."""
    half = bos.shape[1] // 2
    lower, upper = float(bos[:, :half].mean()), float(bos[:, half:].mean())
    return {
        "heads_over_0.5": int((bos > 0.5).sum()),
        "frac_over_0.5": float((bos > 0.5).mean()),
        "mean_bos_lower_half": lower,
        "mean_bos_upper_half": upper,
        "upper_to_lower": upper / max(lower, 1e-9),
    }


def band_summary(report: HeadReport) -> dict:
    """`band_numbers` of a diagnosis, with its column means and class counts."""
    return {**band_numbers(report.bos_mass), "column_mean_bos": report.column_mean_bos(), "counts": report.counts()}


def band_probe(model, adapter, blocks: torch.Tensor, step: int, train_loss: float) -> dict:
    """A quick band reading mid-pretraining (a few held-out blocks): where the collapse stands at `step`."""
    stats, _ = run_statistics(model, adapter, blocks.tolist(), batch_size=len(blocks))
    band = band_numbers(stats["bos_mass"])
    return {"step": step, "train_loss": round(train_loss, 4), "heads_over_0.5": band["heads_over_0.5"],
            "mean_bos_upper_half": round(band["mean_bos_upper_half"], 4),
            "max_bos": round(float(stats["bos_mass"].max()), 4)}
