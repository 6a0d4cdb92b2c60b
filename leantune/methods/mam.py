"""MAM adapter: prefix tuning on attention plus a scaled parallel adapter on the FFN."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..config import MethodConfig
from ..registry import register
from .adapters import ParallelAdapter
from .prefix_tuning import PrefixTuning


@register
@dataclass
class MAM(MethodConfig):
    """Mix-and-match adapter (He et al., 2022, "Towards a Unified View of PETL"): a
    key/value prefix of ``num_virtual_tokens`` in every attention layer (through an
    MLP while ``projection``; ``lt.fold`` removes it) and a scaled parallel adapter
    ``FFN(x) + scale · U σ(D x)`` (width ``r``, default hidden ÷ ``reduction``) beside
    every FFN block. ``targets``/``exclude`` place the adapter; the prefix needs none.
    """

    num_virtual_tokens: int = 30
    projection: bool = True
    r: int | None = None
    reduction: int = 2
    scale: float = 4.0

    name: ClassVar[str] = "mam"

    def components(self) -> list[MethodConfig]:
        return [
            PrefixTuning(num_virtual_tokens=self.num_virtual_tokens, projection=self.projection),
            ParallelAdapter(r=self.r, reduction=self.reduction, scale=self.scale,
                            targets=self.targets, exclude=self.exclude),
        ]

    def folded(self) -> MAM | None:
        return dataclasses.replace(self, projection=False) if self.projection else None
