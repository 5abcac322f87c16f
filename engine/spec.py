"""The compact head spec: comma-separated `LAYER.HEAD` items where either side may be a range.

    3.9-15,5-22.9-15,23.12     layer 3 heads 9..15, layers 5..22 heads 9..15, layer 23 head 12
    *.9-15  /  4.*             every layer / every head
    sick / healthy             every non-healthy / healthy head of a diagnosis report
    5-22.9-15,!healthy         an item prefixed with ! removes its heads (applied after every other item)
Ranges are inclusive. Results are sorted (layer, head) pairs without duplicates.
"""

from __future__ import annotations

import re

from .errors import InputError

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


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


def parse_heads(spec: str, n_layer: int, n_head: int, sick: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Parse a head spec into sorted (layer, head) pairs; `sick` supplies the heads for the word `sick`."""
    items = [item.strip() for item in spec.split(",") if item.strip()]
    if not items:
        raise InputError("empty head spec: write items like 3.9-15,5-22.9-15 or the word sick")
    heads: set[tuple[int, int]] = set()
    removed: set[tuple[int, int]] = set()
    for item in items:
        negate = item.startswith("!")
        (removed if negate else heads).update(_item_heads(item[1:].strip() if negate else item, n_layer, n_head, sick))
    return sorted(heads - removed)


def _item_heads(item: str, n_layer: int, n_head: int, sick: list[tuple[int, int]] | None) -> set[tuple[int, int]]:
    if item in ("sick", "healthy"):
        if sick is None:
            raise InputError(f"'{item}' needs a diagnosis: run diagnose first")
        if item == "sick":
            return set(sick)
        return {(l, h) for l in range(n_layer) for h in range(n_head)} - set(sick)
    parts = item.split(".")
    if len(parts) != 2:
        raise InputError(f"bad head spec item {item!r}: write LAYER.HEAD, e.g. 5-22.9-15")
    layers = _side(parts[0].strip(), n_layer, "layer", item)
    hs = _side(parts[1].strip(), n_head, "head", item)
    return {(l, h) for l in layers for h in hs}


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
