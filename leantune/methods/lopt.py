"""LoPT: a low-rank prompt matrix ``P = U V``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.virtual_tokens import Prompt, PromptConfig, VirtualTokens
from ..registry import register
from .prompt_tuning import PromptTuning


class LowRankPrompt(VirtualTokens):
    """``P = U V`` (``n × r`` times ``r × hidden``), started at the best rank-``r``
    approximation of an initial prompt (its truncated SVD, split evenly)."""

    def __init__(self, initial: torch.Tensor, r: int) -> None:
        super().__init__()
        self.n_prompt = initial.shape[0]
        u, s, vh = torch.linalg.svd(initial.float(), full_matrices=False)
        root = s[:r].sqrt()
        self.U = nn.Parameter(u[:, :r] * root)
        self.V = nn.Parameter(root[:, None] * vh[:r])

    def prompt(self) -> torch.Tensor:
        return self.U @ self.V

    def folded(self) -> Prompt:
        with torch.no_grad():
            return Prompt(self.prompt())


@register
@dataclass
class LoPT(PromptConfig):
    """LoPT, low-rank prompt tuning (Guo et al., 2024): the ``num_virtual_tokens × hidden``
    prompt is trained as ``U V`` of rank ``r``, with ``r · (n + hidden)`` parameters
    instead of ``n · hidden``. ``init`` as in prompt tuning, then truncated to rank ``r``.
    ``lt.fold(model)`` keeps the product (then plain prompt tuning, HF PEFT's layout).
    """

    r: int = 4

    name: ClassVar[str] = "lopt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or not 0 < self.r <= self.num_virtual_tokens:
            raise ValueError(f"{self.name}: r must be an integer in 1..num_virtual_tokens "
                             f"({self.num_virtual_tokens}), got {self.r!r}")

    def make_delta(self, path: str, module: nn.Module) -> LowRankPrompt:
        if self.r > module.embedding_dim:
            raise ValueError(f"{self.name}: r={self.r} exceeds the embedding width {module.embedding_dim}")
        return LowRankPrompt(self.initial(module), self.r)

    def folded(self) -> PromptTuning:
        return PromptTuning.like(self)
