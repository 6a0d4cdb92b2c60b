"""DSEE: a low-rank update plus a sparse residual on the weight's largest entries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..core.forms import Stack
from ..core.sparse import SPARSE_SITE_TYPES, SparseDelta, logical_weight, magnitude_support
from ..core.weights import weight_view
from ..registry import register
from .lora import LoRA


@register
@dataclass
class DSEE(LoRA):
    """DSEE (Chen et al., 2023): ``ΔW = (alpha / r) · B A + S``.

    ``B A`` is LoRA (every LoRA field applies); ``S`` has ``sparse_entries``
    trainable values at the largest-``|W|`` positions of each weight. Both parts
    sit in one stacked delta and merge together.
    """

    sparse_entries: int = 64

    name: ClassVar[str] = "dsee"
    fused_linear: ClassVar[bool] = False  # the sparse delta runs beside the low-rank one
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = None
    site_types: ClassVar[tuple[type, ...]] = SPARSE_SITE_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sparse_entries, int) or self.sparse_entries <= 0:
            raise ValueError(f"{self.name}: sparse_entries must be a positive integer, got {self.sparse_entries!r}")

    def make_delta(self, path: str, module: nn.Module) -> Stack:
        view = weight_view(module)
        weight = logical_weight(module, view)
        sparse = SparseDelta(view, magnitude_support(weight, min(self.sparse_entries, weight.numel()), True))
        return Stack([super().make_delta(path, module), sparse])
