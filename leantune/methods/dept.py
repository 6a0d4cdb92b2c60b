"""DePT: a shorter prompt plus a low-rank, position-wise update of the input embeddings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..api import adapter_paths
from ..core.virtual_tokens import Prompt, PromptConfig
from ..registry import register


class DecomposedPrompt(Prompt):
    """A prompt, and ``scale · (A B)[i]`` added to the embedding of the caller's token
    at position ``i`` (``A``: max_length × r, Kaiming-uniform; ``B``: r × hidden, zero)."""

    updates_embeddings = True

    def __init__(self, initial: torch.Tensor, max_length: int, r: int, scale: float) -> None:
        super().__init__(initial)
        self.A = nn.Parameter(torch.empty(max_length, r))
        self.B = nn.Parameter(torch.zeros(r, initial.shape[1]))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = scale

    def update_embeddings(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        end = start + embeds.shape[1]
        if end > self.A.shape[0]:
            raise ValueError(f"dept: input reaches token position {end - 1}, beyond max_length={self.A.shape[0]}; "
                             "raise max_length")
        update = (self.A[start:end] @ self.B) * self.scale
        return embeds + update.to(embeds.dtype)


@register
@dataclass
class DePT(PromptConfig):
    """DePT, decomposed prompt tuning (Shi & Lipani, 2024): a shorter prompt plus a
    low-rank update ``(alpha / sqrt(r)) · A B`` of the input token embeddings, by
    position up to ``max_length``. The two parts want different learning rates:
    training loops (``lt.param_groups(model, lr)``) give the prompt ``prompt_lr``,
    ``A`` and ``B`` ``low_rank_lr`` and a task head the run's rate.
    """

    num_virtual_tokens: int = 10
    r: int = 8
    alpha: float = 8.0
    max_length: int = 256
    prompt_lr: float = 3e-1
    low_rank_lr: float = 1e-4

    name: ClassVar[str] = "dept"

    def __post_init__(self) -> None:
        super().__post_init__()
        for label, v in (("r", self.r), ("max_length", self.max_length)):
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"{self.name}: {label} must be a positive integer, got {v!r}")

    def make_delta(self, path: str, module: nn.Module) -> DecomposedPrompt:
        return DecomposedPrompt(self.initial(module), self.max_length, self.r, self.alpha / math.sqrt(self.r))

    def param_groups(self, model: nn.Module, name: str = "default", lr: float | None = None) -> list[dict[str, Any]]:
        """Optimizer groups for adapter ``name``: its prompts at ``prompt_lr``, ``A`` and ``B`` at
        ``low_rank_lr``, anything else (a task head) at ``lr`` (default ``low_rank_lr``)."""
        groups: dict[str, list[nn.Parameter]] = {"prompt": [], "low_rank": [], "rest": []}
        for _, _, d in adapter_paths(model, name):
            for m in d.modules():
                if isinstance(m, DecomposedPrompt):
                    groups["prompt"].append(m.weight)
                    groups["low_rank"] += [m.A, m.B]
        parts = {id(p) for ps in groups.values() for p in ps}
        groups["rest"] = [p for _, _, d in adapter_paths(model, name) for p in d.parameters()
                          if p.requires_grad and id(p) not in parts]
        rates = {"prompt": self.prompt_lr, "low_rank": self.low_rank_lr, "rest": lr or self.low_rank_lr}
        return [{"params": [p for p in ps if p.requires_grad], "lr": rates[k]} for k, ps in groups.items() if ps]
