"""SpIEL: sparse fine-tuning at a fixed density whose support moves during training."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..api import adapter_paths, adapters
from ..config import MethodConfig
from ..core.schedule import Schedule
from ..core.sparse import (
    SPARSE_SITE_TYPES,
    GrowthTracker,
    SparseDelta,
    check_fraction,
    path_seed,
    random_support,
    support_size,
)
from ..core.weights import weight_view
from ..registry import register


@register
@dataclass
class SpIEL(MethodConfig):
    """SpIEL (Ansell et al., 2024): ``ΔW`` has values at ``density`` of each weight's entries.

    The support starts random (``seed``). Every ``update_every`` steps
    :class:`SpIELSchedule` drops the ``drop_fraction`` of entries with the
    smallest ``|ΔW|`` and regrows as many where the accumulated gradient is largest.
    """

    density: float = 0.01
    update_every: int = 100
    drop_fraction: float = 0.2
    seed: int = 0

    name: ClassVar[str] = "spiel"
    mergeable: ClassVar[bool] = True
    site_types: ClassVar[tuple[type, ...]] = SPARSE_SITE_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self.name, "density", self.density)
        check_fraction(self.name, "drop_fraction", self.drop_fraction)
        if not isinstance(self.update_every, int) or self.update_every <= 0:
            raise ValueError(f"{self.name}: update_every must be a positive integer, got {self.update_every!r}")

    def schedule(self, model: nn.Module, name: str, total_steps: int | None) -> SpIELSchedule:
        return SpIELSchedule(model, name)

    def make_delta(self, path: str, module: nn.Module) -> SparseDelta:
        view = weight_view(module)
        numel = view.out_features * view.in_features
        return SparseDelta(view, random_support(numel, support_size(numel, self.density), path_seed(self.seed, path)))


class SpIELSchedule(Schedule):
    """SpIEL's drop-and-grow for adapter ``name``; training loops call it after each optimizer step.

    Creating it attaches a :class:`GrowthTracker` to every delta of the adapter,
    so from then on each backward pass folds the weight gradient into a
    candidate list of at most as many entries as the delta has values (no dense
    gradient is kept between steps).
    """

    def __init__(self, model: nn.Module, name: str = "default") -> None:
        record = adapters(model).get(name)
        if record is None or not isinstance(record.config, SpIEL):
            raise ValueError(f"SpIELSchedule needs a spiel adapter named {name!r}; this model has "
                             f"{ {n: r.config.name for n, r in adapters(model).items()} or 'no adapters'}")
        self.config = record.config
        self.sites = [(site, d) for _, site, d in adapter_paths(model, name) if isinstance(d, SparseDelta)]
        self.name = name
        for _, delta in self.sites:
            delta.tracker = GrowthTracker(delta.values.numel())

    def step(self, step: int, optimizer: torch.optim.Optimizer | None = None) -> int:
        """At every ``update_every``-th step (counting from 1), move entries; returns how many moved.
        Pass the optimizer so the moved entries' state (Adam moments) restarts at zero."""
        if step <= 0 or step % self.config.update_every:
            return 0
        if any(self.name in site.merged for site, _ in self.sites):
            raise RuntimeError(f"adapter {self.name!r} is merged; unmerge(model) before moving its entries")
        return sum(delta.drop_and_grow(self.config.drop_fraction, optimizer) for _, delta in self.sites)

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, loss_of: Callable[[], float]) -> None:
        self.step(step, optimizer)

    def state_dict(self) -> dict[str, Any]:
        return {"trackers": [(d.tracker.index, d.tracker.score) for _, d in self.sites]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for (_, d), (index, score) in zip(self.sites, state["trackers"], strict=True):
            d.tracker.index, d.tracker.score = index, score
