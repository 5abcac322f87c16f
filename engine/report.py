"""The per-head diagnosis report: statistics, classes, summary and JSON form."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError

REPORT_SCHEMA_VERSION = 1

HEALTHY, BOS_SINK, DEAD, LOW_ENTROPY, POSITIONAL = "healthy", "bos-sink", "dead", "low-entropy", "positional"
CLASSES = (HEALTHY, BOS_SINK, DEAD, LOW_ENTROPY, POSITIONAL)
PAPER_CLASSES = (HEALTHY, BOS_SINK, DEAD, LOW_ENTROPY)  # the paper's four: a positional head is low-entropy there
SICK = (BOS_SINK, DEAD)  # what the paper operates on; low-entropy heads can be working positional heads
STATS = ("bos_mass", "entropy", "local_mass", "contribution")


@dataclass(frozen=True)
class Thresholds:
    """Class boundaries and the literature's cut-offs. BOS mass above `dead` is dead, above `sink` a BOS
    sink; otherwise entropy below `low_entropy` (nats) is low-entropy, or positional when at least
    `positional_local` of the head's attention stays on the current and two previous tokens.
    `sink_rate_epsilon`: Gu et al. 2024's first-token mass cut-off for the sink rate; `band_share`: a
    head index is in the band when it is sick in more than this share of layers (the paper's 30%)."""

    sink: float = 0.50
    dead: float = 0.95
    low_entropy: float = 0.5
    positional_local: float = 0.5
    sink_rate_epsilon: float = 0.3
    band_share: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.sink < self.dead <= 1.0:
            raise InputError(f"thresholds need 0 <= sink < dead <= 1 (got sink={self.sink}, dead={self.dead})")
        if self.low_entropy < 0:
            raise InputError(f"low-entropy threshold must be >= 0 nats (got {self.low_entropy})")
        for name in ("positional_local", "sink_rate_epsilon", "band_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name.replace('_', ' ')} must be between 0 and 1 (got {getattr(self, name)})")


def classify(bos_mass: np.ndarray, entropy: np.ndarray, thresholds: Thresholds,
             local_mass: np.ndarray | None = None) -> np.ndarray:
    """Class name per head (same shape as the inputs)."""
    out = np.full(bos_mass.shape, HEALTHY, dtype=object)
    low = entropy < thresholds.low_entropy
    out[low] = LOW_ENTROPY
    if local_mass is not None:
        out[low & (local_mass >= thresholds.positional_local)] = POSITIONAL
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
    # how the statistics were computed: diagnosis path (kernel, scores, eager), dtype, device type, world size
    measurement: dict[str, Any] = field(default_factory=dict)

    @property
    def classes(self) -> np.ndarray:
        return classify(self.bos_mass, self.entropy, self.thresholds, self.local_mass)

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
        """Every BOS-sink or dead head, in (layer, head) order (as the paper: never low-entropy or positional)."""
        return self.of_class(*SICK)

    def of_class(self, *names: str) -> list[tuple[int, int]]:
        cls = self.classes
        return [(l, h) for l in range(self.n_layer) for h in range(self.n_head) if cls[l, h] in names]

    def where(self, stat: str, op: str, value: float) -> list[tuple[int, int]]:
        """Heads whose statistic (one of STATS) compares to `value` with `op` (<, <=, >, >=)."""
        ops = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal}
        mask = ops[op](getattr(self, stat), value)
        return [(int(l), int(h)) for l, h in zip(*np.nonzero(mask))]

    # --- summary ---------------------------------------------------------------------------
    def counts(self) -> dict[str, int]:
        cls = self.classes
        return {name: int((cls == name).sum()) for name in CLASSES}

    def paper_counts(self) -> dict[str, int]:
        """The paper's four classes (positional heads counted as low-entropy), for comparable tables."""
        counts = self.counts()
        return {**{name: counts[name] for name in PAPER_CLASSES}, LOW_ENTROPY: counts[LOW_ENTROPY] + counts[POSITIONAL]}

    def sink_rate(self) -> tuple[list[float], float]:
        """Gu et al. 2024: the share of heads whose first-token mass exceeds epsilon, per layer and overall."""
        over = self.bos_mass > self.thresholds.sink_rate_epsilon
        return [float(x) for x in over.mean(axis=1)], float(over.mean())

    def band(self) -> list[int]:
        """The paper's band: head indices sick in more than `band_share` of the layers."""
        sick = np.isin(self.classes, SICK)
        return [int(h) for h in np.nonzero(sick.mean(axis=0) > self.thresholds.band_share)[0]]

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
            "paper_counts": self.paper_counts(),
            "sink_rate": dict(zip(("per_layer", "model"), self.sink_rate()),
                              epsilon=self.thresholds.sink_rate_epsilon),
            "band": {"heads": self.band(), "share": self.thresholds.band_share},
            "column_counts": self.column_counts(),
            "column_mean_bos_mass": self.column_mean_bos(),
            "bos_mass_histogram": {"counts": hist, "edges": edges},
            "thresholds": asdict(self.thresholds),
            "n_prompts": self.n_prompts,
            "n_tokens": self.n_tokens,
            "measurement": dict(self.measurement),
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
                measurement=dict(data.get("measurement", {})),
                **arrays,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"report is missing or has malformed field {exc}: re-run head-surgeon diagnose") from exc

    def save(self, path: str | Path) -> None:
        from .atomic import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_json(), indent=1))
