"""Running the same loop under ``torchrun``: DDP or FSDP2 over gloo (CPU) or NCCL (GPU); rank 0 writes.

Only rank 0 touches the run folder (checkpoints, metrics, plots, adapters);
the other ranks take part in the collectives that decide what it writes (RNG
states, whether to stop, and under FSDP2 the gathering of sharded tensors).

``training.distributed`` picks the wrapper: ``ddp`` (the default under
``torchrun``) keeps a whole model per process and averages gradients;
``fsdp2`` (``torch.distributed.fsdp.fully_shard``) shards every parameter, frozen
base and adapter alike, across the processes, so a base too large for one
device fits on several. For FSDP2:

* the runner keeps the model on the CPU until :meth:`Dist.wrap`; ``fully_shard``
  then moves one group at a time to the device and keeps only this rank's
  shard there, so no GPU holds the whole base (given blocks to shard: a model
  without ``_no_split_modules`` is one group, gathered whole for each forward).
* each transformer block (the model's ``_no_split_modules`` classes) is sharded
  *after* ``lt.adapt``, so a block's sites and deltas travel with it, then the
  root. A group may mix frozen and trainable parameters (FSDP2 only asks
  trainable ones to share a dtype); gradients are reduce-scattered for the
  trainable ones only.
* during a block's forward and backward FSDP2 swaps plain unsharded tensors in
  for its DTensor parameters, so the engine's fused low-rank path
  (``engine/lowrank_linear.py``) runs unchanged.
* the causal-LM chunked loss reads the output head's weight outside
  ``forward``; it is registered as an FSDP forward method
  (:data:`SHARDED_LOSS`), so the root's parameters are gathered around it too.
* ``precision: bf16`` becomes ``MixedPrecisionPolicy(param_dtype=bf16,
  reduce_dtype=fp32)`` instead of autocast: shards (the optimizer's master
  weights) keep their dtype, the all-gather and the compute run in bf16, the
  gradient reduction in fp32. Autocast would all-gather fp32 (twice the traffic
  and unsharded memory) and turn off the fused path. ``fp16`` (which needs a
  grad scaler that knows about shards) is refused.
* adapters and checkpoints are written from full state dicts
  (``get_model_state_dict``/``get_optimizer_state_dict`` with
  ``full_state_dict=True, cpu_offload=True``): every rank gathers, rank 0
  writes, and the files are those a single process writes, so a run can resume
  under another world size or wrapper. Resuming loads the adapter into the
  unsharded model on every rank and the optimizer with ``set_optimizer_state_dict``.
* evaluation runs on every rank (each forward needs every shard); rank 0's
  metrics are the run's.
* with ``grad_accum`` > 1 every micro-batch's gradients are reduce-scattered
  into the (fp32) shards; adapter gradients are small, and skipping the sync
  would accumulate unsharded bf16 gradients instead.
* methods whose schedules reshape or re-mask the adapter while training
  (AdaLoRA, SpIEL, IST) are refused by the runner: they touch adapter tensors
  between steps, which are shards here.
"""

from __future__ import annotations

import contextlib
import gc
import os
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..engine import causal_lm_loss
from ..engine.lean import decoder_layers
from ..engine.loss import _plain_head

# The attribute under which an FSDP2-sharded causal LM carries the chunked loss as a forward method.
SHARDED_LOSS = "leantune_causal_lm_loss"


@dataclass
class Dist:
    """This process's place in the run: rank, world size, device, and how the model is spread
    (``single``, ``ddp`` or ``fsdp2``); ``precision`` is the run's, which FSDP2 applies itself."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    mode: str = "single"
    precision: str = "fp32"

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """FSDP2: parameters are DTensor shards outside forward/backward."""
        return self.mode == "fsdp2"

    @property
    def autocast_precision(self) -> str:
        """The precision the loop's autocast should use: none under FSDP2, whose policy casts instead."""
        return "fp32" if self.sharded else self.precision

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP around the model, or FSDP2 shards in place, when there are several processes."""
        if self.mode == "ddp":
            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp2":
            return self._shard(model)
        return model

    def _shard(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh(self.device.type, (self.world,))
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.precision == "bf16" else MixedPrecisionPolicy()
        blocks = decoder_layers(model)
        if not blocks:
            warnings.warn(f"FSDP2: {type(model).__name__} names no transformer blocks (_no_split_modules), so the "
                          "whole model is one group, gathered whole for every forward", stacklevel=2)
        for block in reversed(blocks):  # innermost first: a nested block joins its own group
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        lm = hasattr(model, "get_decoder") and hasattr(model, "get_output_embeddings")
        if lm and _plain_head(model) is not None:  # otherwise the task computes the loss from the model's logits
            setattr(model, SHARDED_LOSS, types.MethodType(causal_lm_loss, model))
            register_fsdp_forward_method(model, SHARDED_LOSS)
        return model

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

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (so every rank takes the same branch after an evaluation)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    # --- state under FSDP2 ------------------------------------------------------------------
    @contextlib.contextmanager
    def full_adapter(self, model: nn.Module) -> Iterator[None]:
        """Within the block, ``state_dict()`` of the model's deltas gives full CPU tensors on rank 0,
        so the ordinary adapter writers (``storage.save_adapter``) write what one process would.

        Every rank must enter (the gathering is collective); outside FSDP2 it does nothing.
        Only trainable parameters and buffers are gathered, never the frozen base.
        """
        if not self.sharded:
            yield
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from ..core.site import iter_sites

        _reshard(model)
        full = get_model_state_dict(model, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
        handles = []
        if self.main:
            for path, site in iter_sites(model):
                for name, delta in site.deltas.items():
                    handles.append(delta.register_state_dict_post_hook(_FullValues(full, f"{path}.deltas.{name}.")))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """``optimizer.state_dict()`` as one process would save it (parameters numbered in the
        optimizer's order). Under FSDP2 every rank must call it; rank 0 gets the gathered state."""
        if not self.sharded:
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        _reshard(model)
        full = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(
            full_state_dict=True, cpu_offload=True))
        if not self.main:
            return {}
        index = {name: i for i, name in enumerate(_optimizer_names(model, optimizer))}
        return {"state": {index[k]: v for k, v in full["state"].items()},
                "param_groups": [{**g, "params": [index[k] for k in g["params"]]} for g in full["param_groups"]]}

    def load_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """The inverse of :meth:`optimizer_state`; under FSDP2 each rank keeps its shard of ``state``."""
        if not self.sharded:
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        _reshard(model)
        names = _optimizer_names(model, optimizer)
        keyed = {"state": {names[i]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, keyed, options=StateDictOptions(full_state_dict=True))


class _FullValues:
    """A state-dict post-hook that swaps a delta's (sharded) tensors for gathered full ones."""

    def __init__(self, full: dict[str, Any], fqn_prefix: str) -> None:
        self.full, self.fqn_prefix = full, fqn_prefix

    def __call__(self, module: nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any) -> None:
        for key in list(state):
            if key.startswith(prefix):
                value = self.full.get(self.fqn_prefix + key[len(prefix):])
                if value is not None:
                    state[key] = value


def _reshard(model: nn.Module) -> None:
    """Put every FSDP2 group back into shards. A forward without backward (evaluation) leaves the
    root's group gathered, and then ``named_parameters()`` no longer yields the optimizer's DTensors."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each parameter the optimizer steps, in its state-dict numbering."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]


def local_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; anything else as named."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def setup(device: str = "auto", mode: str = "auto", precision: str = "fp32") -> Dist:
    """Join the process group ``torchrun`` describes in the environment, or run alone.

    ``mode`` (``training.distributed``): ``auto`` and ``ddp`` give DDP, ``fsdp2``
    FSDP2, when there are several processes; one process runs plain either way.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=local_device(device), precision=precision)
    cuda = local_device(device).type == "cuda"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), torch.device("cuda", local) if cuda else torch.device("cpu"),
                "fsdp2" if mode == "fsdp2" else "ddp", precision)


def teardown(d: Dist) -> None:
    """Leave the process group together once every rank is done.

    The barrier keeps a rank from destroying the group while rank 0 still writes the adapter;
    collecting garbage first frees the DDP reducer, whose reference to the group would otherwise
    outlive ``destroy_process_group`` and be freed as the interpreter shuts down, which gloo
    answers with ``terminate called without an active exception`` (SIGABRT).
    """
    if d.world > 1 and dist.is_initialized():
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()
