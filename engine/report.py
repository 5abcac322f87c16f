"""The per-head diagnosis report: statistics, classes, summary and JSON form."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

REPORT_SCHEMA_VERSION = 1

HEALTHY, BOS_SINK, DEAD, LOW_ENTROPY = "healthy", "bos-sink", "dead", "low-entropy"
CLASSES = (HEALTHY, BOS_SINK, DEAD, LOW_ENTROPY)
STATS = ("bos_mass", "entropy", "local_mass", "contribution")


@dataclass(frozen=True)
class Thresholds:
    """Class boundaries. BOS mass above `dead` is dead, above `sink` a BOS sink; otherwise entropy
    below `low_entropy` (nats) is low-entropy."""

    sink: float = 0.50
    dead: float = 0.95
    low_entropy: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.sink < self.dead <= 1.0:
            raise InputError(f"thresholds need 0 <= sink < dead <= 1 (got sink={self.sink}, dead={self.dead})")
        if self.low_entropy < 0:
            raise InputError(f"low-entropy threshold must be >= 0 nats (got {self.low_entropy})")


def classify(bos_mass: np.ndarray, entropy: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """Class name per head (same shape as the inputs)."""
    out = np.full(bos_mass.shape, HEALTHY, dtype=object)
    out[entropy < thresholds.low_entropy] = LOW_ENTROPY
    out[bos_mass > thresholds.sink] = BOS_SINK
    out[bos_mass > thresholds.dead] = DEAD
    return out


@dataclass
class HeadReport:
    """Per-(layer, head) statistics of one diagnosis; arrays are n_layer x n_head."""

    model: str
    n_layer: int
    n_head: int
    slopes: list[float]
    bos_mass: np.ndarray
    entropy: np.ndarray
    local_mass: np.ndarray
    contribution: np.ndarray
    thresholds: Thresholds = field(default_factory=Thresholds)
    n_prompts: int = 0
    n_tokens: int = 0  # query positions averaged over (position 0 of each prompt excluded)

    @property
    def classes(self) -> np.ndarray:
        return classify(self.bos_mass, self.entropy, self.thresholds)

    def with_thresholds(self, thresholds: Thresholds) -> "HeadReport":
        """The same statistics re-classified under other thresholds (no recomputation)."""
        return HeadReport(**{**self.__dict__, "thresholds": thresholds})

    def head(self, layer: int, head: int) -> dict[str, Any]:
        return {
            "layer": layer,
            "head": head,
            "slope": self.slopes[head],
            "class": str(self.classes[layer, head]),
            **{name: float(getattr(self, name)[layer, head]) for name in STATS},
        }

    def sick(self) -> list[tuple[int, int]]:
        """Every head not classed healthy, in (layer, head) order."""
        cls = self.classes
        return [(l, h) for l in range(self.n_layer) for h in range(self.n_head) if cls[l, h] != HEALTHY]

    # --- summary ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        cls = self.classes
        return {name: int((cls == name).sum()) for name in CLASSES}

    def column_counts(self) -> dict[str, list[int]]:
        """Per head-index column: how many layers put that head in each class."""
        cls = self.classes
        return {name: [int(x) for x in (cls == name).sum(axis=0)] for name in CLASSES}

    def column_mean_bos(self) -> list[float]:
        return [float(x) for x in self.bos_mass.mean(axis=0)]

    def bos_histogram(self, bins: int = 10) -> tuple[list[int], list[float]]:
        counts, edges = np.histogram(self.bos_mass, bins=bins, range=(0.0, 1.0))
        return [int(c) for c in counts], [float(e) for e in edges]

    # --- JSON ----------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        hist, edges = self.bos_histogram()
        return {
            "schema_version": REPORT_SCHEMA_VERSION,
            "model": self.model,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "slopes": list(self.slopes),
            **{name: getattr(self, name).tolist() for name in STATS},
            "class": self.classes.tolist(),
            "counts": self.counts(),
            "column_counts": self.column_counts(),
            "column_mean_bos_mass": self.column_mean_bos(),
            "bos_mass_histogram": {"counts": hist, "edges": edges},
            "thresholds": asdict(self.thresholds),
            "n_prompts": self.n_prompts,
            "n_tokens": self.n_tokens,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "HeadReport":
        try:
            if data.get("schema_version") != REPORT_SCHEMA_VERSION:
                raise InputError(
                    f"report schema_version {data.get('schema_version')!r} is not {REPORT_SCHEMA_VERSION}: "
                    "re-run head-surgeon diagnose with this version"
                )
            arrays = {name: np.asarray(data[name], dtype=np.float64) for name in STATS}
            shape = (data["n_layer"], data["n_head"])
            if any(a.shape != shape for a in arrays.values()):
                raise InputError(f"report arrays are not {shape[0]} x {shape[1]}: the file is damaged")
            return cls(
                model=data["model"],
                n_layer=data["n_layer"],
                n_head=data["n_head"],
                slopes=[float(s) for s in data["slopes"]],
                thresholds=Thresholds(**data.get("thresholds", {})),
                n_prompts=int(data.get("n_prompts", 0)),
                n_tokens=int(data.get("n_tokens", 0)),
                **arrays,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"report is missing or has malformed field {exc}: re-run head-surgeon diagnose") from exc

    def save(self, path: str | Path) -> None:
        from .atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
