"""PaCA: fine-tune a random subset of each weight's input columns, with no adapter module."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import MethodConfig
from ..core.sparse import ColumnDelta, path_seed, random_support
from ..core.weights import LINEAR_TYPES, weight_view
from ..registry import register


@register
@dataclass
class PaCA(MethodConfig):
    """PaCA (Woo et al., 2025): train ``r`` randomly chosen input columns of each weight.

    The trained columns are a column delta (``out × r`` values), so merging gives
    exactly the weight PaCA trains in place; backward keeps only the ``r`` input
    features those columns read (``N × r``), not the whole input. ``seed`` picks
    the columns, differently for every module.
    """

    r: int = 8
    seed: int = 0

    name: ClassVar[str] = "paca"
    mergeable: ClassVar[bool] = True
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"{self.name}: r (columns per weight) must be a positive integer, got {self.r!r}")

    def make_delta(self, path: str, module: nn.Module) -> ColumnDelta:
        view = weight_view(module)
        if self.r > view.in_features:
            raise ValueError(f"{self.name}: r={self.r} exceeds the {view.in_features} input columns of {path}; "
                             "lower r or exclude the module")
        return ColumnDelta(view, random_support(view.in_features, self.r, path_seed(self.seed, path)))
