"""Residual prompt tuning: prompt vectors through a shallow MLP with a skip connection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.virtual_tokens import Prompt, PromptConfig
from ..registry import register
from .prompt_tuning import PromptTuning


class ResidualPrompt(Prompt):
    """``P' = LayerNorm(W_up ReLU(W_down P)) + P``, one MLP shared by all prompt tokens."""

    def __init__(self, initial: torch.Tensor, bottleneck: int, dropout: float) -> None:
        super().__init__(initial)
        d = initial.shape[1]
        self.mlp = nn.Sequential(nn.Linear(d, bottleneck), nn.ReLU(), nn.Linear(bottleneck, d),
                                 nn.Dropout(dropout), nn.LayerNorm(d))

    def prompt(self) -> torch.Tensor:
        return self.mlp(self.weight) + self.weight

    def folded(self) -> Prompt:
        training = self.training
        self.eval()  # no dropout in the prompt that is kept
        with torch.no_grad():
            plain = Prompt(self.prompt())
        self.train(training)
        return plain


@register
@dataclass
class ResidualPromptTuning(PromptConfig):
    """Residual Prompt Tuning (Razdaibiedina et al., 2023): the prompt is
    reparameterised by a bottleneck MLP (width ``bottleneck``, ReLU, then dropout
    and LayerNorm) plus a residual connection, which steadies and speeds up
    prompt tuning. Initialised from vocabulary embeddings as in the paper.
    ``lt.fold(model)`` keeps only the prompt it computes (then plain prompt tuning,
    saved in HF PEFT's layout).
    """

    init: str = "vocab"
    bottleneck: int = 400
    dropout: float = 0.0

    name: ClassVar[str] = "residual_prompt"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.bottleneck, int) or self.bottleneck <= 0:
            raise ValueError(f"{self.name}: bottleneck must be a positive integer, got {self.bottleneck!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.name}: dropout must be in [0, 1), got {self.dropout}")

    def make_delta(self, path: str, module: nn.Module) -> ResidualPrompt:
        return ResidualPrompt(self.initial(module), self.bottleneck, self.dropout)

    def folded(self) -> PromptTuning:
        return PromptTuning.like(self)
