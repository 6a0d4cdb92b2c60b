"""Running the same loop under ``torchrun``: DDP over gloo (CPU) or NCCL (GPU); rank 0 writes.

Only rank 0 touches the run folder (checkpoints, metrics, plots, adapters);
the other ranks take part in the collectives that decide what it writes (RNG
states, whether to stop).

FSDP2 (``torch.distributed.fsdp.fully_shard``) is not wired in. It would need:
sharding each transformer block *after* ``lt.adapt`` (so sites and deltas are
sharded with their block), adapter saving from full state dicts
(``torch.distributed.checkpoint.state_dict.get_model_state_dict`` with
``full_state_dict=True, cpu_offload=True``) and ``get/set_optimizer_state_dict``
for the optimizer, and a check that the engine's fused paths accept DTensor
parameters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model when there are several processes."""
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (a Ctrl-C seen by one rank stops all at the same step)."""
        if self.world == 1:
            return flag
        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def mean(self, value: float) -> float:
        """The average of ``value`` over ranks (the loss each rank saw)."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def local_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup(device: str = "auto") -> Dist:
    """Join the process group ``torchrun`` describes in the environment, or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=local_device(device))
    cuda = local_device(device).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu"))


def teardown(d: Dist) -> None:
    if d.world > 1 and dist.is_initialized():
        dist.destroy_process_group()
