"""Data parallelism for organism pretraining, for runs started by `torchrun --nproc-per-node N`.

Every rank draws the same global batch from the same generator and trains on its own rows; gradients are
averaged with one all-reduce per step, so N ranks with global batch B follow the single-process run with
batch B (up to floating-point summation order) and every rank holds the same weights throughout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.errors import InputError


def launched_world_size() -> int:
    """Number of ranks torchrun started (1 for a plain process)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """False on every torchrun rank but 0: the ones that stay quiet."""
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class DataParallel:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, device_type: str) -> DataParallel:
        """One rank per process from torchrun's environment; a plain process is a world of one."""
        if launched_world_size() <= 1:
            return cls()
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), owns)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU (`cuda:LOCAL_RANK`) when training on CUDA."""
        if self.world > 1 and device.type == "cuda":
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of the global batch."""
        if batch.shape[0] % self.world:
            raise InputError(f"--batch-size {batch.shape[0]} is not divisible by the {self.world} ranks: "
                             f"use a multiple of {self.world}")
        rows = batch.shape[0] // self.world
        return batch[self.rank * rows:(self.rank + 1) * rows]

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a scalar over the ranks (for logging the global loss)."""
        if self.world == 1:
            return value
        value = value.detach().float().clone()
        dist.all_reduce(value)
        return value / self.world

    def _reduce_int(self, value: int, op, device: torch.device) -> int:
        if self.world == 1:
            return value
        t = torch.tensor([value], device=device)
        dist.all_reduce(t, op=op)
        return int(t.item())

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank if it is true on any (a stop decision all ranks must share)."""
        return bool(self._reduce_int(int(flag), dist.ReduceOp.MAX, device))

    def min_int(self, value: int, device: torch.device) -> int:
        """The smallest of the ranks' values, on every rank (a step count all ranks must share)."""
        return self._reduce_int(value, dist.ReduceOp.MIN, device)

    def close(self) -> None:
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
