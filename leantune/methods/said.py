"""SAID: train a few numbers in a random subspace of all the targeted weights."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core.sparse import SPARSE_SITE_TYPES, ProjectedDelta, path_seed
from ..core.weights import weight_view
from ..registry import register


@register
@dataclass
class SAID(MethodConfig):
    """Structure-aware intrinsic dimension (Aghajanyan et al., 2021): ``θ = θ₀ + P z``.

    One vector ``z`` of ``d`` values, shared by every targeted weight, is mapped
    into each weight by a fixed random projection regenerated from ``seed`` (a
    hashed ``±1`` projection, never stored); each weight also learns one scale
    (the "structure-aware" part). Trainable: ``d`` plus one number per weight.
    """

    d: int = 1024
    seed: int = 0

    name: ClassVar[str] = "said"
    mergeable: ClassVar[bool] = True
    site_types: ClassVar[tuple[type, ...]] = SPARSE_SITE_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.d, int) or self.d <= 0:
            raise ValueError(f"{self.name}: d (intrinsic dimension) must be a positive integer, got {self.d!r}")

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        # One z per adapter, created here and handed to every site's delta.
        self._z = nn.Parameter(torch.zeros(self.d))

    def make_delta(self, path: str, module: nn.Module) -> ProjectedDelta:
        return ProjectedDelta(weight_view(module), self._z, path_seed(self.seed, path))
