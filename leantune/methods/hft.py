"""HFT: Half Fine-Tuning — half of every block's weight matrices trained in full."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..config import MethodConfig
from ..core.families import block_of
from ..core.forms_extra import DenseUpdate
from ..core.targets import resolve_targets
from ..core.weights import LINEAR_TYPES
from ..registry import register

RULES = ("category", "random")


@register
@dataclass
class HFT(MethodConfig):
    """Half Fine-Tuning (Hui et al., 2024): in every transformer block half of the weight
    matrices are trained in full, the other half stay frozen (and keep the old knowledge).

    rule: ``"category"`` picks half of the block's attention matrices and half of its FFN
        matrices; ``"random"`` half of all its matrices. An odd count rounds down and up on
        alternate blocks, so the whole model trains exactly half where the block count is even.
    seed, round: the pick is drawn from both and so is reproducible from the saved config.
        One round is one adapter: to start the next, ``lt.merge`` + ``lt.unload``, then adapt
        ``HFT(round=round + 1)``.

    Each trained matrix gets a full update ``ΔW`` (and ``Δb``), zero at init and stored only for
    the trained half; merging adds it to the weight. Matrices outside the blocks stay frozen.
    """

    rule: str = "category"
    seed: int = 0
    round: int = 0

    name: ClassVar[str] = "hft"
    mergeable: ClassVar[bool] = True
    default_targets: ClassVar[str | list[str]] = "all-linear"
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rule not in RULES:
            raise ValueError(f"hft: rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.round < 0:
            raise ValueError(f"hft: round must be >= 0, got {self.round}")

    def resolved_targets(self, model: nn.Module) -> list[str]:
        candidates = resolve_targets(model, super().resolved_targets(model), self.exclude, self.site_types,
                                     method=self.name)
        chosen = self.select(candidates)
        if not chosen:
            raise ValueError(
                "hft found no transformer blocks (paths like '...layers.3...' or '...h.3...') among its "
                f"targets {candidates[:5]}; set `targets=` to the block matrices to split in half"
            )
        return chosen

    def select(self, paths: list[str]) -> list[str]:
        """The trained half of ``paths``, block by block, in the order of ``paths``."""
        groups: dict[str, dict[str, list[str]]] = {}
        for path in paths:
            block = block_of(path)
            if block is not None:
                groups.setdefault(block, {}).setdefault(self._category(path[len(block) + 1:]), []).append(path)
        chosen: set[str] = set()
        for index, (block, categories) in enumerate(groups.items()):
            for category, members in categories.items():
                k = (len(members) + (index + self.round) % 2) // 2
                rng = random.Random(f"{self.seed}:{self.round}:{block}:{category}")
                chosen.update(rng.sample(members, k))
        return [p for p in paths if p in chosen]

    def _category(self, inner: str) -> str:
        if self.rule == "random":
            return "all"
        parts = inner.lower().split(".")
        return "attention" if any("attn" in p or "attention" in p for p in parts) else "ffn"

    def make_delta(self, path: str, module: nn.Module) -> DenseUpdate:
        return DenseUpdate(module)
