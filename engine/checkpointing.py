"""Activation checkpointing chosen by memory: none, selective or full.

Only the layers from the lowest target up keep anything for backward (below it nothing needs a gradient).
Without checkpointing each of them keeps its activations for the whole step; with it, a layer keeps only its
input and computes the rest again in backward, which costs about one more forward of those layers.
`auto` keeps as many layers' activations as the free memory holds (the top ones, nearest the loss) and
checkpoints the rest: none when all fit, full when none does, selective in between. What a layer keeps is
measured by one probing forward (`engine.saved_memory`) where the caller gives it, else estimated per token.
The other modes are what they say. The numbers never change: a recomputed layer computes what it computed
the first time.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from .errors import InputError
from .saved_memory import SavedBytes, measure_saved_bytes

MODES = ("auto", "full", "selective", "none")
MEASURED = ("auto", "selective")  # the modes that plan from what a layer keeps (engine.saved_memory)
# what one layer keeps for backward per token without checkpointing, in values of the model's dtype: the two
# LayerNorms' inputs, the attention's q, k, v and output, the GeLU's input (4 x hidden), and the casts around
# them, about 16 x hidden (the frozen projections keep nothing: their weight gradient is never taken). It is a
# guess, wrong both ways: the probe (engine.saved_memory) measures 10 on BLOOM's SDPA path and 33 on its eager
# path at L = 512 (docs/benchmarks.md). Plans use it only where no measurement is given (full, none)
VALUES_PER_TOKEN_LAYER = 20
SAFETY = 0.8  # of the free memory, the share the kept activations may take


@dataclass
class CheckpointPlan:
    """Which of the trained span's layers recompute in backward, and why."""

    mode: str  # full | selective | none (what ran; `auto` resolves to one of these)
    checkpointed: list[int]  # the layers that recompute
    asked: str = "auto"
    layer_gib: float | None = None  # what the largest layer of the span keeps without checkpointing
    free_gib: float | None = None  # the memory it was chosen from
    estimate: str = "formula"  # measured (a probing forward) | formula (VALUES_PER_TOKEN_LAYER)
    kept_bytes: int | None = None  # the plan's need: what is kept for backward, and backward's working layer

    def to_dict(self) -> dict:
        return asdict(self)


def free_bytes(device: torch.device) -> int:
    """Free memory where the activations go: the GPU's (after what this process holds), or the host's."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def optimizer_bytes(params) -> int:
    """What training adds for the trained parameters from its first step on: their gradients and AdamW's two
    moments, each the parameters' size."""
    return 3 * sum(p.numel() * p.element_size() for p in params)


def layer_bytes(hidden: int, tokens: int, dtype: torch.dtype) -> int:
    """Estimated activations one layer keeps for backward without checkpointing."""
    return VALUES_PER_TOKEN_LAYER * hidden * tokens * torch.empty((), dtype=dtype).element_size()


def plan_checkpointing(mode: str, *, n_layer: int, lowest: int, hidden: int, tokens: int, dtype: torch.dtype,
                       free: int, reserve: int = 0, transient: int = 0,
                       saved: SavedBytes | None = None) -> CheckpointPlan:
    """The plan for layers lowest..n_layer-1 trained with micro-batches of `tokens` tokens, given `free` bytes
    of which `reserve` are held for the whole step (the prefix cache, the optimizer's state) and `transient` are
    needed only while no layer backpropagates (the loss's chunks: backward's working layer reuses them). `saved`:
    what each layer keeps, measured (`engine.saved_memory`) in sequences of the micro-batch's length; without it
    a layer is estimated at VALUES_PER_TOKEN_LAYER values a token."""
    if mode not in MODES:
        raise InputError(f"checkpointing must be one of {', '.join(MODES)} (got {mode!r})")
    span = list(range(lowest, n_layer))
    element = torch.empty((), dtype=dtype).element_size()
    recomputed = hidden * tokens * element  # what a checkpointed layer keeps: its input
    if saved is not None:
        measured = saved.for_tokens(tokens)
        kept = [measured.per_layer[layer] for layer in span]
        # kept in every plan: the shared bias, the final norm's input, anything below the lowest target (nothing)
        always = measured.shared + measured.outside + sum(measured.per_layer[:lowest])
    else:
        kept, always = [layer_bytes(hidden, tokens, dtype)] * len(span), 0
    room = SAFETY * (free - reserve - transient)
    # backward holds one layer's activations more while it runs (a checkpointed layer's rebuilt ones, or the
    # gradients of the one it is in), in memory the loss's transient chunks have left by then
    working = max(0, max(kept, default=0) - transient)

    def need(k: int) -> int:  # the top k layers keep theirs, the others their inputs
        return always + sum(kept[len(span) - k:]) + (len(span) - k) * recomputed + working

    if mode == "none":
        keep = len(span)
    elif mode == "full":
        keep = 0
    else:
        limit = len(span) - 1 if mode == "selective" else len(span)  # selective recomputes at least one layer
        keep = max((k for k in range(limit + 1) if need(k) <= room), default=0)
    checkpointed = span[: len(span) - keep]
    resolved = "full" if len(checkpointed) == len(span) else "none" if not checkpointed else "selective"
    return CheckpointPlan(resolved, checkpointed, mode, round(max(kept, default=0) / 2**30, 4), round(free / 2**30, 2),
                          "formula" if saved is None else "measured", need(keep))


def plan_for_training(mode: str, model, adapter, block: torch.Tensor, *, sdpa: bool, lowest: int, tokens: int,
                      free: int, reserve: int, chunk_tokens: int) -> CheckpointPlan:
    """The plan a training pass runs with: in the `MEASURED` modes from what each layer keeps, measured on the
    training `block` through the pass's attention path (`sdpa`: engine.fastpath.fast_kernels) and, in a
    distributed run, rank 0's figures on every rank; the loss's chunks (engine.loss.peak_bytes) as transient."""
    from .distributed import broadcast
    from .fastpath import fast_kernels
    from .loss import peak_bytes

    saved = None
    if mode in MEASURED:
        with fast_kernels(model, adapter, sdpa):
            saved = measure_saved_bytes(model, adapter, block)
        saved = SavedBytes.from_dict(broadcast(saved.to_dict()))  # every rank the same plan
    return plan_checkpointing(mode, n_layer=adapter.n_layer, lowest=lowest, hidden=adapter.hidden_size, tokens=tokens,
                              dtype=next(model.parameters()).dtype, free=free, reserve=reserve,
                              transient=peak_bytes(model.lm_head, chunk_tokens), saved=saved)


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing with input gradients off: transformers forces them on, but
    with frozen embeddings nothing below the lowest trainable layer needs them, so backward stops there."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # the name since transformers 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.disable_input_require_grads()


def disable_checkpointing(model) -> None:
    (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def apply_checkpointing(model, adapter, plan: CheckpointPlan) -> None:
    """Switch on transformers' non-reentrant checkpointing for the plan's layers only (`enable_checkpointing`
    for the model, then off again on the layers that keep their activations)."""
    if not plan.checkpointed:
        return
    enable_checkpointing(model)
    keep = set(range(adapter.n_layer)) - set(plan.checkpointed)
    for layer, block in enumerate(adapter.blocks(model)):
        if layer in keep:
            block.gradient_checkpointing = False
