"""The compact head spec: comma-separated items, each `LAYER.HEAD` (either side a range), a class word
or a predicate on a statistic; `&` intersects parts of one item, `!` removes an item's heads.

    3.9-15,5-22.9-15,23.12     layer 3 heads 9..15, layers 5..22 heads 9..15, layer 23 head 12
    *.9-15  /  4.*             every layer / every head
    sick                       BOS-sink or dead heads of a diagnosis (the paper's targets)
    sink dead low-entropy positional healthy    one class each (`bos-sink` is `sink`)
    bos>0.3  contribution<0.05  entropy<=1  local>=0.5    a statistic compared with a number
    5-22.9-15&sick             the sick heads of that band
    5-22.9-15,!healthy         an item prefixed with ! removes its heads (applied after every other item)
Ranges are inclusive. Results are sorted (layer, head) pairs without duplicates. Words and predicates
need a diagnosis (a HeadReport); a bare `sick` list still resolves `sick` and its complement `healthy`.
"""

from __future__ import annotations

import re

from .errors import InputError

Head = tuple[int, int]
_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")
_PREDICATE = re.compile(r"^([a-z_]+)\s*(<=|>=|<|>)\s*(-?\d*\.?\d+(?:e-?\d+)?)$")
CLASS_WORDS = {"sick": ("bos-sink", "dead"), "sink": ("bos-sink",), "bos-sink": ("bos-sink",), "dead": ("dead",),
               "low-entropy": ("low-entropy",), "positional": ("positional",), "healthy": ("healthy",)}
STAT_WORDS = {"bos": "bos_mass", "bos_mass": "bos_mass", "entropy": "entropy", "local": "local_mass",
              "local_mass": "local_mass", "contribution": "contribution", "contrib": "contribution"}


def _side(text: str, limit: int, what: str, item: str) -> range:
    if text == "*":
        return range(limit)
    m = _RANGE.match(text)
    if not m:
        raise InputError(f"bad {what} {text!r} in head spec item {item!r}: write N, N-M or *")
    lo, hi = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
    if lo > hi:
        raise InputError(f"empty {what} range {text!r} in {item!r}: write the smaller number first")
    if hi >= limit:
        raise InputError(f"{what} {hi} in {item!r} is out of range: the model has {limit} {what}s (0-{limit - 1})")
    return range(lo, hi + 1)


def _items(spec: str) -> list[str]:
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise InputError("empty head spec: write items like 3.9-15,5-22.9-15 or the word sick")
    return items


def _parts(item: str) -> tuple[bool, list[str]]:
    negate = item.startswith("!")
    parts = [p.strip() for p in (item[1:] if negate else item).split("&")]
    if not all(parts):
        raise InputError(f"bad head spec item {item!r}: write PART&PART, e.g. 5-22.9-15&sick")
    return negate, parts


def needs_report(spec: str | None) -> bool:
    """True when the spec names heads by class or statistic, which only a diagnosis resolves."""
    return bool(spec) and any(_kind(part) != "range" for item in _items(spec) for part in _parts(item)[1])


def _kind(part: str) -> str:
    if part in CLASS_WORDS:
        return "word"
    if _PREDICATE.match(part.replace(" ", "")):
        return "predicate"
    return "range"


def parse_heads(spec: str, n_layer: int, n_head: int, sick: list[Head] | None = None, *, report=None) -> list[Head]:
    """Parse a head spec into sorted (layer, head) pairs; `report` (a HeadReport of this model) resolves
    class words and predicates, or a bare `sick` list the words `sick` and `healthy`."""
    heads: set[Head] = set()
    removed: set[Head] = set()
    for item in _items(spec):
        negate, parts = _parts(item)
        found = set.intersection(*(_part_heads(p, item, n_layer, n_head, sick, report) for p in parts))
        (removed if negate else heads).update(found)
    return sorted(heads - removed)


def _part_heads(part: str, item: str, n_layer: int, n_head: int, sick: list[Head] | None, report) -> set[Head]:
    kind = _kind(part)
    if kind == "word":
        if report is not None:
            return set(report.of_class(*CLASS_WORDS[part]))
        if sick is not None and part in ("sick", "healthy"):
            every = {(l, h) for l in range(n_layer) for h in range(n_head)}
            return set(sick) if part == "sick" else every - set(sick)
        raise InputError(f"'{part}' needs a diagnosis: run diagnose first")
    if kind == "predicate":
        name, op, value = _PREDICATE.match(part.replace(" ", "")).groups()
        if name not in STAT_WORDS:
            raise InputError(f"unknown statistic {name!r} in {item!r}: use one of bos, entropy, local, contribution")
        if report is None:
            raise InputError(f"'{part}' needs a diagnosis: run diagnose first")
        return set(report.where(STAT_WORDS[name], op, float(value)))
    sides = part.split(".")
    if len(sides) != 2:
        raise InputError(f"bad head spec item {item!r}: write LAYER.HEAD (e.g. 5-22.9-15), a class word "
                         f"({', '.join(CLASS_WORDS)}) or a predicate such as bos>0.3")
    layers = _side(sides[0].strip(), n_layer, "layer", item)
    hs = _side(sides[1].strip(), n_head, "head", item)
    return {(l, h) for l in layers for h in hs}


def check_syntax(spec: str) -> None:
    """Refuse a malformed spec without a model or a diagnosis (bounds are checked once the model is known)."""
    for item in _items(spec):
        for part in _parts(item)[1]:
            kind = _kind(part)
            if kind == "predicate":
                name = _PREDICATE.match(part.replace(" ", "")).group(1)
                if name not in STAT_WORDS:
                    raise InputError(f"unknown statistic {name!r} in {item!r}: use one of bos, entropy, local, "
                                     "contribution")
            elif kind == "range":
                _part_heads(part, item, 1 << 20, 1 << 20, None, None)


def format_heads(heads) -> str:
    """The shortest spec that lists `heads`, grouping layers that share the same set of heads."""
    by_layer: dict[int, list[int]] = {}
    for l, h in sorted(set(heads)):
        by_layer.setdefault(l, []).append(h)

    def runs(values: list[int]) -> list[str]:
        out, start = [], None
        for i, v in enumerate(values):
            if start is None:
                start = v
            if i + 1 == len(values) or values[i + 1] != v + 1:
                out.append(f"{start}" if start == v else f"{start}-{v}")
                start = None
        return out

    groups: list[tuple[list[int], tuple[int, ...]]] = []
    for layer in sorted(by_layer):
        key = tuple(by_layer[layer])
        if groups and groups[-1][1] == key and groups[-1][0][-1] == layer - 1:
            groups[-1][0].append(layer)
        else:
            groups.append(([layer], key))
    items = []
    for layers, hs in groups:
        layer_part = runs(layers)[0]
        items += [f"{layer_part}.{r}" for r in runs(list(hs))]
    return ",".join(items)
