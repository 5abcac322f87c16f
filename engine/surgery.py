"""Surgery on attention heads: re-initialise their Q/K/V rows, zero their output columns, and train
small parameters that hold only those rows and columns while every base tensor stays frozen.

`HeadSlices` installs forward hooks on each targeted layer's `query_key_value` and `dense`:
  qkv:   y = base(x); y[..., target rows] = x @ W_sel^T + b_sel
  dense: the base tensor's target columns are zero, so y = base(ctx) + ctx[..., target cols] @ W_cols^T
`export()` writes the slices back into the fused tensors. The updates equal the paper's method (whole
tensors trainable, gradients masked outside the targets, weight decay 0); tests check it step by step.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .arch import Adapter
from .distributed import whole
from .errors import InputError
from .recipe import INIT_SCHEMES
from .spec import format_heads, parse_heads

SHAM = "none"  # the control arm: the same slices train from their current values (no re-init, no zeroing)
Head = tuple[int, int]


@dataclass
class SurgeryPlan:
    """Which heads to operate on, which to keep frozen (recorded, never trained), and how to re-initialise."""

    targets: list[Head]
    frozen: list[Head] = field(default_factory=list)
    init: str = "xavier_uniform"
    seed: int = 0

    def __post_init__(self) -> None:
        self.targets = sorted({(int(l), int(h)) for l, h in self.targets})
        self.frozen = sorted({(int(l), int(h)) for l, h in self.frozen})
        if not self.targets:
            raise InputError("the surgery plan has no target heads: mark heads or pass --targets SPEC")
        if self.init not in (*INIT_SCHEMES, SHAM):
            raise InputError(f"unknown init scheme {self.init!r}: use one of {', '.join(INIT_SCHEMES)}")
        both = set(self.targets) & set(self.frozen)
        if both:
            raise InputError(f"heads {format_heads(both)} are both targets and frozen: choose one for each")

    @classmethod
    def from_specs(cls, targets: str, frozen: str | None, adapter: Adapter, *, sick: list[Head] | None = None,
                   report=None,
                   init: str = "xavier_uniform", seed: int = 0) -> "SurgeryPlan":
        """A plan from head-spec strings (`3.9-15,5-22.9-15`, `sick`, `5-22.*&bos>0.3`, ...); `report` (a
        diagnosis of this model) resolves class words and predicates."""
        parse = lambda s: parse_heads(s, adapter.n_layer, adapter.n_head, sick, report=report)  # noqa: E731
        return cls(parse(targets), parse(frozen) if frozen else [], init, seed)

    def check_fits(self, adapter: Adapter) -> None:
        for l, h in self.targets + self.frozen:
            if not (0 <= l < adapter.n_layer and 0 <= h < adapter.n_head):
                raise InputError(f"head {l}.{h} is outside this model ({adapter.n_layer} layers x {adapter.n_head} heads)")

    @property
    def layers(self) -> list[int]:
        return sorted({l for l, _ in self.targets})

    def heads_in(self, layer: int) -> list[int]:
        return [h for l, h in self.targets if l == layer]

    def to_dict(self) -> dict[str, Any]:
        return {"targets": format_heads(self.targets), "frozen": format_heads(self.frozen), "init": self.init,
                "seed": self.seed}

    @classmethod
    def from_dict(cls, data: dict[str, Any], adapter: Adapter, sick: list[Head] | None = None,
                  report=None) -> "SurgeryPlan":
        try:
            return cls.from_specs(data["targets"], data.get("frozen") or None, adapter, sick=sick, report=report,
                                  init=data.get("init", "xavier_uniform"), seed=int(data.get("seed", 0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"malformed surgery plan {data!r}: {exc}") from exc


def init_head_weights(plan: SurgeryPlan, adapter: Adapter, dtype=torch.float32) -> dict[Head, torch.Tensor]:
    """Fresh Q/K/V rows per target ([3d, hidden]), from the plan's seed, independent of device.

    `xavier_uniform` and `xavier_normal` initialise each of q, k and v as its own `hidden -> head_dim`
    projection would be; `xavier_uniform_block` draws the head's whole [3d, hidden] block at once, as
    `nn.init.xavier_uniform_` on that slice does (the paper's scripts; bound sqrt(6 / (hidden + 3d)))."""
    gen = torch.Generator().manual_seed(plan.seed)
    d, hidden = adapter.head_dim, adapter.hidden_size
    out = {}
    for head in plan.targets:
        if plan.init == "xavier_uniform_block":
            bound = math.sqrt(6.0 / (hidden + 3 * d))
            out[head] = torch.empty(3 * d, hidden).uniform_(-bound, bound, generator=gen).to(dtype)
            continue
        w = torch.empty(3, d, hidden, dtype=torch.float32)
        std = math.sqrt(2.0 / (hidden + d))
        for i in range(3):
            if plan.init == "xavier_uniform":
                w[i].uniform_(-math.sqrt(3.0) * std, math.sqrt(3.0) * std, generator=gen)
            else:
                w[i].normal_(0.0, std, generator=gen)
        out[head] = w.view(3 * d, hidden).to(dtype)
    return out


class LayerSlices(nn.Module):
    """Trainable rows of one layer's `query_key_value` and columns of its `dense`, for some heads."""

    def __init__(self, heads: list[int], qkv: nn.Linear, dense: nn.Linear, adapter: Adapter, dtype):
        super().__init__()
        self.heads = list(heads)
        rows = torch.cat([adapter.qkv_rows(h) for h in heads])
        cols = torch.cat([torch.arange(adapter.dense_cols(h).start, adapter.dense_cols(h).stop) for h in heads])
        device = qkv.weight.device
        self.register_buffer("rows", rows.to(device), persistent=False)
        self.register_buffer("cols", cols.to(device), persistent=False)
        with whole(qkv.weight) as w:
            self.qkv_weight = nn.Parameter(w[self.rows].to(dtype).clone())
        # MPT's projections have no bias; then no bias is trained either
        self.qkv_bias = None
        if qkv.bias is not None:
            with whole(qkv.bias) as b:
                self.qkv_bias = nn.Parameter(b[self.rows].to(dtype).clone())
        # Falcon's linear layers round the product, then add the bias: the rows here do the same, so a sham arm's
        # slices compute exactly what the base rows did in bf16 too
        self.split_bias = type(qkv).forward is not nn.Linear.forward
        with torch.no_grad(), whole(dense.weight) as w:
            self.dense_weight = nn.Parameter(w[:, self.cols].to(dtype).clone())
            w[:, self.cols] = 0.0  # the hook adds these heads' output; the base tensor must not add it again

    def qkv_hook(self, module, args, output):
        x = args[0]
        bias = self.qkv_bias.to(x.dtype) if self.qkv_bias is not None else None
        if self.split_bias:
            sel = x @ self.qkv_weight.to(x.dtype).T
            sel = sel + bias if bias is not None else sel
        else:
            sel = F.linear(x, self.qkv_weight.to(x.dtype), bias)
        return output.index_copy(-1, self.rows, sel.to(output.dtype))

    def dense_hook(self, module, args, output):
        ctx = args[0]
        return output + F.linear(ctx.index_select(-1, self.cols), self.dense_weight.to(ctx.dtype)).to(output.dtype)


class HeadSlices(nn.Module):
    """The trainable state of a surgery: one `LayerSlices` per targeted layer, hooked into the model.

    Creating it moves the targets' `dense` columns out of the base tensor (zeroed there), so the hooked
    model computes the same function; after `detach()` call `export()` to put them back."""

    def __init__(self, model: nn.Module, adapter: Adapter, plan: SurgeryPlan, dtype=torch.float32):
        super().__init__()
        plan.check_fits(adapter)
        self.adapter, self.plan = adapter, plan
        self._model = [model]  # not a submodule: its parameters are not ours
        self.layers = nn.ModuleDict({
            str(l): LayerSlices(plan.heads_in(l), adapter.qkv(model, l), adapter.dense(model, l), adapter, dtype)
            for l in plan.layers
        })
        self._handles: list = []

    @property
    def model(self) -> nn.Module:
        return self._model[0]

    def attach(self) -> "HeadSlices":
        if self._handles:
            return self
        for name, sl in self.layers.items():
            layer = int(name)
            self._handles.append(self.adapter.qkv(self.model, layer).register_forward_hook(sl.qkv_hook))
            self._handles.append(self.adapter.dense(self.model, layer).register_forward_hook(sl.dense_hook))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "HeadSlices":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    @torch.no_grad()
    def export(self) -> None:
        """Detach the hooks and write the slices into the model's fused tensors (model = base + patch)."""
        self.detach()
        for name, sl in self.layers.items():
            qkv, dense = self.adapter.qkv(self.model, int(name)), self.adapter.dense(self.model, int(name))
            with whole(qkv.weight) as w:
                w.index_copy_(0, sl.rows, sl.qkv_weight.to(w.dtype))
            if sl.qkv_bias is not None:
                with whole(qkv.bias) as b:
                    b.index_copy_(0, sl.rows, sl.qkv_bias.to(b.dtype))
            with whole(dense.weight) as w:
                w.index_copy_(1, sl.cols, sl.dense_weight.to(w.dtype))

    @contextmanager
    def exported(self):
        """Within the block the fused tensors hold the slices and no hook runs, so evaluation sees exactly
        the model a patch gives; afterwards the columns move back into the trainable slices."""
        self.export()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, sl in self.layers.items():
                    with whole(self.adapter.dense(self.model, int(name)).weight) as w:
                        w[:, sl.cols] = 0.0
            self.attach()

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """Per-head tensors for a patch: `layer.L.head.H.{qkv_weight,qkv_bias,dense_weight}`."""
        d3, d = 3 * self.adapter.head_dim, self.adapter.head_dim
        out = {}
        for name, sl in self.layers.items():
            for i, h in enumerate(sl.heads):
                prefix = f"layer.{name}.head.{h}."
                out[prefix + "qkv_weight"] = sl.qkv_weight.detach()[i * d3 : (i + 1) * d3].cpu().contiguous()
                if sl.qkv_bias is not None:
                    out[prefix + "qkv_bias"] = sl.qkv_bias.detach()[i * d3 : (i + 1) * d3].cpu().contiguous()
                out[prefix + "dense_weight"] = sl.dense_weight.detach()[:, i * d : (i + 1) * d].cpu().contiguous()
        return out

    @torch.no_grad()
    def load_head_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `head_tensors` (resuming from a checkpoint)."""
        d3, d = 3 * self.adapter.head_dim, self.adapter.head_dim
        for name, sl in self.layers.items():
            for i, h in enumerate(sl.heads):
                prefix = f"layer.{name}.head.{h}."
                try:
                    sl.qkv_weight[i * d3 : (i + 1) * d3] = tensors[prefix + "qkv_weight"]
                    if sl.qkv_bias is not None:
                        sl.qkv_bias[i * d3 : (i + 1) * d3] = tensors[prefix + "qkv_bias"]
                    sl.dense_weight[:, i * d : (i + 1) * d] = tensors[prefix + "dense_weight"]
                except KeyError as exc:
                    raise InputError(f"checkpoint has no tensor {exc}: it belongs to another plan") from exc


def freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def sham(plan: SurgeryPlan) -> SurgeryPlan:
    """The control arm's plan: the same heads and seed, trained from their current values."""
    return SurgeryPlan(plan.targets, plan.frozen, SHAM, plan.seed)


@torch.no_grad()
def read_head_tensors(model: nn.Module, adapter: Adapter, heads: list[Head]) -> dict[str, torch.Tensor]:
    """The heads' current slices, named as in a patch (`apply_head_tensors` puts them back)."""
    out = {}
    for l, h in heads:
        qkv, dense = adapter.qkv(model, l), adapter.dense(model, l)
        rows, cols = adapter.qkv_rows(h), adapter.dense_cols(h)
        prefix = f"layer.{l}.head.{h}."
        with whole(qkv.weight) as w:
            out[prefix + "qkv_weight"] = w[rows.to(w.device)].cpu().clone()
        if qkv.bias is not None:
            with whole(qkv.bias) as b:
                out[prefix + "qkv_bias"] = b[rows.to(b.device)].cpu().clone()
        with whole(dense.weight) as w:
            out[prefix + "dense_weight"] = w[:, cols].cpu().clone()
    return out


@torch.no_grad()
def operate(model: nn.Module, adapter: Adapter, plan: SurgeryPlan, dtype=torch.float32) -> HeadSlices:
    """Perform the surgery: freeze the model, re-initialise each target's Q/K/V rows (bias rows zero),
    zero its `dense` columns, and return the attached trainable slices. A sham plan (init `none`) skips
    the re-initialisation and the zeroing: the slices start as the base's, so the model is unchanged."""
    plan.check_fits(adapter)
    freeze(model)
    if plan.init == SHAM:
        return HeadSlices(model, adapter, plan, dtype).attach()
    fresh = init_head_weights(plan, adapter)
    for (layer, head), w in fresh.items():
        qkv, dense = adapter.qkv(model, layer), adapter.dense(model, layer)
        rows, cols = adapter.qkv_rows(head), adapter.dense_cols(head)
        with whole(qkv.weight) as full:
            full[rows.to(full.device)] = w.to(full)
        if qkv.bias is not None:
            with whole(qkv.bias) as b:
                b[rows.to(b.device)] = 0.0
        with whole(dense.weight) as full:
            full[:, cols] = 0.0
    return HeadSlices(model, adapter, plan, dtype).attach()
