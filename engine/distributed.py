"""Running across several processes with PyTorch's own distributed engine (started by `torchrun`).

Every rank runs the same program on the same inputs. The frozen base is sharded with FSDP2 (`fully_shard` on
each transformer block; the embeddings, final norm and LM head stay whole on every rank), so a model larger
than one device fits, and each block's weights are gathered only while it runs. The trainable head slices are
small and replicated: each rank trains on its share of every global batch and one all-reduce of their
gradients per optimizer step makes every rank take the same step. Statistics (diagnosis sums, losses) are
reduced over ranks, so every rank holds the same numbers and makes the same decisions. Only rank 0 writes
files (`engine.atomic` drops the other ranks' writes) and events.

Outside `torchrun` (or with one process) every function here is the single-process identity.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

from .errors import InputError

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank of size, the backend, and the device it computes on."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.size > 1

    def record(self) -> dict[str, Any]:
        """What a report and a session say about how the run was spread."""
        return {"world_size": self.size, "backend": self.backend}


def launched() -> bool:
    """Whether `torchrun` started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> World:
    """The current world (single-process unless a process group of more than one is initialised)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                 dist.get_backend())


def init_from_env(device: str | None = None) -> World:
    """Join the process group `torchrun` set up (NCCL on CUDA, gloo on CPU); a no-op in a single process.
    Returns the world; each rank computes on cuda:LOCAL_RANK when it uses CUDA."""
    import torch.distributed as dist

    if not launched():
        return World()
    if dist.is_initialized():
        return world()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device != "cpu" and torch.cuda.is_available() and not (device or "").startswith("cpu")
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise InputError(f"rank {local} has no GPU of its own ({torch.cuda.device_count()} visible): start "
                             "torchrun with --nproc-per-node at most the number of GPUs")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return world()


def rank_device(device: str | None) -> str | None:
    """The device a rank loads onto: its own GPU when the run uses CUDA (`--device cuda` means cuda:LOCAL_RANK)."""
    w = world()
    if not w.active or device == "cpu" or (device is None and not torch.cuda.is_available()):
        return device
    if device not in (None, "auto", "cuda"):
        raise InputError(f"--device {device} names one GPU, but under torchrun each rank uses its own: pass "
                         "--device cuda (or leave it out)")
    return f"cuda:{w.local_rank}"


def shutdown(together: bool = True) -> None:
    """Leave the process group. `together` (a clean end, every rank here): wait for the others first, since
    a rank that tears its group down while another still talks to it can abort (gloo: "terminate called
    without an active exception"). After an error a rank leaves at once: the others may be in another
    collective."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if together:
            dist.barrier()
        dist.destroy_process_group()


# --- collectives (identity in one process) -------------------------------------------------------------
def all_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (and return it)."""
    if world().active:
        reduce_in_place(tensor, "sum")
    return tensor


def reduce_in_place(tensor: torch.Tensor, op: str) -> None:
    """All-reduce (`sum`, `min` or `max`) on the backend's device: NCCL has no CPU tensors, so a host tensor
    goes through this rank's GPU there and comes back."""
    import torch.distributed as dist

    ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
    if tensor.device.type == "cpu" and dist.get_backend() == "nccl":
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(staged, op=ops[op])
        tensor.copy_(staged)
    else:
        dist.all_reduce(tensor, op=ops[op])


def any_rank(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True on every rank when it is true on some rank (cancellation, errors: every rank stops together)."""
    if not world().active:
        return flag
    t = all_sum(torch.tensor([1.0 if flag else 0.0], device=device))
    return bool(t.item() > 0)


def least(value: float) -> float:
    """The smallest of every rank's `value` (free memory: every rank then makes the same plan)."""
    if not world().active:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    reduce_in_place(t, "min")
    return float(t.item())


def broadcast(value: T) -> T:
    """Rank 0's `value` (any JSON-like object) on every rank."""
    if not world().active:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T | None:
    """`fn()` on rank 0 alone (creating a run directory, say); the other ranks get None. An error of rank 0's
    is raised on every rank, so none of them waits for a rank that has stopped."""
    from .errors import HeadSurgeonError

    w = world()
    if not w.active:
        return fn()
    result, error = None, None
    if w.main:
        try:
            result = fn()
        except HeadSurgeonError as exc:
            error = exc
    message = broadcast(str(error) if error is not None else None)
    if error is not None:
        raise error
    if message is not None:
        raise InputError(message)
    return result


def spread(items: list[T]) -> Iterator[tuple[T, bool]]:
    """This rank's share of `items` as (item, real) pairs. Every rank yields as many pairs as the busiest one,
    so that the sharded blocks' all-gathers pair up: a rank with fewer items gets `items[0]` with real False,
    to run and drop. In one process: every item, real."""
    w = world()
    mine = items[w.rank :: w.size]
    yield from ((item, True) for item in mine)
    for _ in range(-(-len(items) // w.size) - len(mine)):
        yield items[0], False


# --- the sharded base ------------------------------------------------------------------------------
def shard_model(model: nn.Module, adapter, device_type: str) -> None:
    """FSDP2 on every transformer block of `model`, then on its body as the root of those groups, over a mesh
    of `device_type` ("cuda" or "cpu": where the shards will live). Everything outside the blocks
    (embeddings, norms, the tied LM head) stays whole on every rank, so the body and the LM head can be
    called on their own, as diagnosis and the chunked loss do. Needs an initialised process group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .arch import base_model

    mesh = init_device_mesh(device_type, (world().size,))
    blocks = adapter.blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh)
    body = base_model(model)
    in_blocks = {id(p) for p in blocks.parameters()}
    whole = {p for p in model.parameters() if id(p) not in in_blocks}
    fully_shard(body, mesh=mesh, ignored_params=whole)


def is_sharded(param: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """The global rows [start, stop) of a dim-0 sharded parameter this rank holds (FSDP2 chunks as
    `torch.chunk`: ceil(n / size) rows each, the last ranks' possibly fewer or none)."""
    n, w = param.shape[0], world()
    chunk = -(-n // w.size)
    start = min(w.rank * chunk, n)
    stop = min(start + chunk, n)
    held = param.to_local().shape[0]
    if held != stop - start:  # pragma: no cover - a sharding layout other than FSDP2's
        raise RuntimeError(f"unexpected shard of {held} rows for rows {start}:{stop} of {n}")
    return start, stop


@contextmanager
def whole(param: torch.Tensor) -> Iterator[torch.Tensor]:
    """The parameter as one plain tensor to read or edit in place. A sharded one is gathered (every rank must
    call this together) and this rank's rows are written back on exit; a plain one is its own data."""
    if not is_sharded(param):
        yield param.data
        return
    full = param.detach().full_tensor()
    yield full
    start, stop = local_rows(param)
    with torch.no_grad():
        param.to_local().copy_(full[start:stop])
