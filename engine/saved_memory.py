"""What each layer keeps for backward, measured rather than estimated.

One forward of the model's body runs with autograd recording, as a training step runs it (the caller sets
the trained slices, the attention path and train mode). A saved-tensors hook sees every tensor autograd keeps
for backward: each storage is counted once, against the layer whose forward saved it first, and dropped at
once, so the probe holds nothing beyond one forward's working memory. Parameters and views of them (the
trained slices too, and a layer's weights as FSDP2 gathers them for its forward) are not counted: they are
held anyway, or freed after the layer. A storage that a second layer saves too (BLOOM's shared ALiBi bias) is
counted as shared, once, and one saved outside every layer (the final norm's input) as outside.

Checkpointing plans from these figures instead of a per-token formula (`engine.checkpointing`), so the
plan fits what this model, on this attention path and with these targets, really keeps.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .arch import base_model


@dataclass(frozen=True)
class LayerBytes:
    """Bytes kept for backward by one forward: per layer, shared by several layers, and outside every layer."""

    per_layer: list[int]
    shared: int
    outside: int

    def total(self) -> int:
        return sum(self.per_layer) + self.shared + self.outside


@dataclass(frozen=True)
class SavedBytes:
    """What one forward keeps, measured for one sequence of `seq_len` tokens and for two: most of it grows with
    the batch, some does not (a target layer's slices, cast to the model's dtype), and two points give both."""

    one: LayerBytes
    two: LayerBytes
    seq_len: int

    def for_tokens(self, tokens: int) -> LayerBytes:
        """The same for a micro-batch of `tokens` tokens in sequences of `seq_len`."""
        n = tokens / self.seq_len

        def line(a: int, b: int) -> int:
            return max(0, round(a + (b - a) * (n - 1)))

        return LayerBytes([line(a, b) for a, b in zip(self.one.per_layer, self.two.per_layer)],
                          line(self.one.shared, self.two.shared), line(self.one.outside, self.two.outside))

    def to_dict(self) -> dict:
        return {"one": asdict(self.one), "two": asdict(self.two), "seq_len": self.seq_len}

    @classmethod
    def from_dict(cls, data: dict) -> "SavedBytes":
        return cls(LayerBytes(**data["one"]), LayerBytes(**data["two"]), data["seq_len"])


def _storage(tensor: torch.Tensor) -> torch.UntypedStorage | None:
    """The memory behind a tensor: a sharded (DTensor) parameter's local shard; None where there is none to
    count (meta tensors, wrappers without storage)."""
    if hasattr(tensor, "to_local"):
        tensor = tensor.to_local()
    if tensor.device.type == "meta":
        return None
    try:
        storage = tensor.untyped_storage()
        storage.data_ptr()
    except (RuntimeError, NotImplementedError):
        return None
    return storage


def _is_parameter(tensor: torch.Tensor) -> bool:
    """A parameter or a view of one (a transposed weight saved by a matmul; the trained slices included)."""
    return isinstance(tensor, nn.Parameter) or isinstance(tensor._base, nn.Parameter)


class _Counter:
    """The saved-tensors hook's state: which layer is running and whose storages were seen."""

    def __init__(self, model: nn.Module, n_layer: int) -> None:
        self.held = {storage.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())
                     if (storage := _storage(t)) is not None}
        self.layer: int | None = None
        self.gathered: set[int] = set()  # the running layer's weights as FSDP2 gathered them for its forward
        self.per_layer = [0] * n_layer
        self.shared = self.outside = 0
        # storage address -> (first layer, "shared" or None for outside; its size when first saved)
        self.owner: dict[int, tuple[int | str | None, int]] = {}

    def enter(self, layer: int, module: nn.Module) -> None:
        self.layer = layer
        # after FSDP2's own pre-forward hook: the parameters are the gathered ones, held until its post-forward
        self.gathered = {storage.data_ptr() for p in module.parameters() if (storage := _storage(p)) is not None}
        self.gathered -= self.held

    def leave(self) -> None:
        self.layer, self.gathered = None, set()

    def pack(self, tensor: torch.Tensor) -> None:
        storage = None if _is_parameter(tensor) else _storage(tensor)
        if storage is None:
            return None
        key, nbytes = storage.data_ptr(), storage.nbytes()
        if not nbytes or key in self.held or key in self.gathered:
            return None
        if key not in self.owner:
            self.owner[key] = (self.layer, nbytes)
            # a freed storage's address is reused by later ones: forget it when it is freed
            weakref.finalize(storage, self.owner.pop, key, None)
            self._add(self.layer, nbytes)
        elif self.owner[key][0] not in ("shared", self.layer):
            first, size = self.owner[key]
            self._add(first, -size)
            self.owner[key] = ("shared", size)
            self.shared += size
        return None

    def _add(self, layer: int | None, nbytes: int) -> None:
        if layer is None:
            self.outside += nbytes
        else:
            self.per_layer[layer] += nbytes

    @staticmethod
    def unpack(_packed):  # pragma: no cover - the probe never runs backward
        raise RuntimeError("the memory probe's graph cannot be backpropagated")


def measure_saved_bytes(model: nn.Module, adapter, block: torch.Tensor) -> SavedBytes:
    """What each layer's forward saves for backward, measured as the module docstring says on one training
    `block` ([1, seq_len] token ids) and on two copies of it, in train mode. Run it with the training's slices
    installed and within its attention path's context (`engine.fastpath.fast_kernels`), before checkpointing is
    switched on (a checkpointed layer keeps its inputs instead). The random number generators are left as they
    were, so dropout in the probe draws nothing from the run's."""
    block = block[:1]
    return SavedBytes(_measure(model, adapter, block), _measure(model, adapter, torch.cat([block, block])),
                      block.shape[1])


def _measure(model: nn.Module, adapter, ids: torch.Tensor) -> LayerBytes:
    blocks = adapter.blocks(model)
    if any(getattr(layer, "gradient_checkpointing", False) for layer in blocks):
        raise RuntimeError("measure what the layers keep before checkpointing is switched on: a checkpointed layer "
                           "keeps only its inputs")
    counter = _Counter(model, len(blocks))
    hooks = []
    for index, layer in enumerate(blocks):
        hooks.append(layer.register_forward_pre_hook(lambda m, _a, i=index: counter.enter(i, m)))
        hooks.append(layer.register_forward_hook(lambda _m, _a, _o: counter.leave()))
    was_training = model.training
    devices = [ids.device] if ids.device.type == "cuda" else []
    try:
        model.train()
        with torch.random.fork_rng(devices), torch.enable_grad(), \
                torch.autograd.graph.saved_tensors_hooks(counter.pack, counter.unpack):
            base_model(model)(input_ids=ids, use_cache=False)
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    return LayerBytes(counter.per_layer, counter.shared, counter.outside)
