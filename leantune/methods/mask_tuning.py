"""Mask tuning: learn which entries of frozen weights to keep, with binary masks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import MethodConfig
from ..core.sparse import SPARSE_SITE_TYPES, MaskDelta
from ..core.weights import weight_view
from ..registry import register


@register
@dataclass
class MaskTuning(MethodConfig):
    """Regularized mask tuning (Zheng et al., 2023; after Zhao et al., 2020).

    Each targeted weight gets a real-valued score per entry; the forward uses
    ``W ⊙ 1[score > 0]`` and the scores train straight-through, the weights stay
    frozen. Scores start at ``init_score`` (every mask 1, so training starts from
    the base). ``grad_dropout`` drops that fraction of score gradients each step
    (the regulariser; 0 turns it off). Merging multiplies the weights by the mask.
    """

    init_score: float = 0.01
    grad_dropout: float = 0.0

    name: ClassVar[str] = "mask_tuning"
    mergeable: ClassVar[bool] = True
    default_targets: ClassVar[str | list[str]] = ["@attn_q", "@attn_k", "@attn_v", "@attn_out"]
    site_types: ClassVar[tuple[type, ...]] = SPARSE_SITE_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_score <= 0:
            raise ValueError(f"{self.name}: init_score must be > 0 so that every mask starts at 1, "
                             f"got {self.init_score!r}")
        if not 0.0 <= self.grad_dropout < 1.0:
            raise ValueError(f"{self.name}: grad_dropout must be in [0, 1), got {self.grad_dropout!r}")

    def make_delta(self, path: str, module: nn.Module) -> MaskDelta:
        return MaskDelta(weight_view(module), self.init_score, self.grad_dropout)
