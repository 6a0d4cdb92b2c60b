"""Tensors shared by every layer of one adapter: frozen random bases and shard pools.

VeRA, NOLA and MoS keep one set of tensors for all the layers they adapt and give
each layer only a few coefficients. Frozen random tensors are regenerated from a
seed on a CPU generator (identical on every machine), so an adapter stores only
its seed and coefficients. Layers of different shapes share one tensor sized to
the largest shape and read a slice of it, as HF PEFT's VeRA does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .site import base_module
from .weights import weight_view


class Bank(nn.Module):
    """Tensors shared by all deltas of one adapter.

    The first delta that attaches the bank owns it as a submodule, so its tensors
    are saved, loaded and moved between devices and dtypes exactly once; the other
    deltas hold a plain reference and always see the owner's current tensors.
    """

    def __init__(self) -> None:
        super().__init__()
        self._owned = False

    def attach(self, delta: nn.Module, attr: str = "bank") -> None:
        if not self._owned:
            delta.add_module(attr, self)
            self._owned = True
        else:
            object.__setattr__(delta, attr, self)  # a reference, not a submodule


def seeded_uniform(shape: Sequence[int], generator: torch.Generator, fan_in: int | None = None) -> torch.Tensor:
    """Kaiming-uniform values (gain √2) drawn from ``generator``; ``fan_in`` defaults to ``shape[1]``.

    This is HF PEFT's VeRA initialisation, so projections regenerated from the
    same seed are bit-identical to PEFT's.
    """
    fan = fan_in if fan_in is not None else math.prod(shape[1:])
    bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(fan)
    return torch.empty(tuple(shape)).uniform_(-bound, bound, generator=generator)


def generator(seed: int) -> torch.Generator:
    """A CPU generator, so the same seed gives the same tensors on every device."""
    return torch.Generator(device="cpu").manual_seed(int(seed))


def largest_shape(model: nn.Module, paths: Sequence[str]) -> tuple[int, int]:
    """The largest ``(out_features, in_features)`` over the modules at ``paths``."""
    views = [weight_view(base_module(model, p)) for p in paths]
    return max(v.out_features for v in views), max(v.in_features for v in views)
