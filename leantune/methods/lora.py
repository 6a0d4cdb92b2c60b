"""LoRA: a low-rank update ``(alpha / r) · B A`` in parallel with a frozen weight."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import MethodConfig, config_field
from ..core.forms import LowRank
from ..core.weights import WEIGHT_TYPES, weight_view
from ..registry import register


def pattern_value(patterns: dict[str, Any], path: str, default: Any) -> Any:
    """HF PEFT's rule for ``rank_pattern``/``alpha_pattern``: first key that matches the path's end."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


@register
@dataclass
class LoRA(MethodConfig):
    """LoRA (Hu et al., 2021). ``h = W x + (alpha / r) · B A x``; A Kaiming-uniform, B zero.

    r: rank; alpha: scale numerator; dropout: on the adapter's input;
    rank_pattern / alpha_pattern: per-module overrides, keys matched against the
    end of the module path as in HF PEFT; init: ``"lora"`` (B = 0) or ``"random"``.
    """

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    rank_pattern: dict[str, int] = config_field({})
    alpha_pattern: dict[str, float] = config_field({})
    init: str = "lora"

    name: ClassVar[str] = "lora"
    fused_linear: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = "LORA"
    site_types: ClassVar[tuple[type, ...]] = WEIGHT_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        for label, r in [("r", self.r), *((f"rank_pattern[{k!r}]", v) for k, v in self.rank_pattern.items())]:
            if not isinstance(r, int) or r <= 0:
                raise ValueError(f"{self.name}: {label} must be a positive integer, got {r!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{self.name}: dropout must be in [0, 1), got {self.dropout}")

    def rank_for(self, path: str) -> int:
        return int(pattern_value(self.rank_pattern, path, self.r))

    def scale_for(self, path: str, r: int) -> float:
        return float(pattern_value(self.alpha_pattern, path, self.alpha)) / r

    def make_delta(self, path: str, module: nn.Module) -> LowRank:
        view = weight_view(module)
        r = self.rank_for(path)
        if r > min(view.in_features, view.out_features):
            warnings.warn(
                f"{self.name}: rank {r} at {path} exceeds min(in, out) = "
                f"{min(view.in_features, view.out_features)}; the extra rank is wasted parameters",
                stacklevel=3,
            )
        return LowRank(view, r, self.scale_for(path, r), self.dropout, self.init)

    # --- HF PEFT interop --------------------------------------------------------
    def peft_keys(self, delta: LowRank) -> dict[str, str]:
        if delta.view.kind == "embedding":
            return {"A": "lora_embedding_A", "B": "lora_embedding_B"}
        return {"A": "lora_A.weight", "B": "lora_B.weight"}

    def peft_config(self, paths: list[str]) -> dict[str, Any]:
        return {
            "r": self.r,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": paths,
            "exclude_modules": None,
            "rank_pattern": dict(self.rank_pattern),
            "alpha_pattern": dict(self.alpha_pattern),
            "use_rslora": False,
            "use_dora": False,
            "bias": "none",
            "init_lora_weights": True,
        }

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], **common: Any) -> LoRA:
        unsupported = [k for k in ("use_dora", "use_rslora") if cfg.get(k)]
        if cfg.get("bias", "none") != "none":
            unsupported.append(f"bias={cfg['bias']!r}")
        if unsupported:
            raise ValueError(f"this PEFT LoRA adapter uses {', '.join(unsupported)}, which leantune's lora does not read")
        return cls(
            r=int(cfg.get("r", 8)),
            alpha=float(cfg.get("lora_alpha", 8)),
            dropout=float(cfg.get("lora_dropout", 0.0)),
            rank_pattern=dict(cfg.get("rank_pattern") or {}),
            alpha_pattern=dict(cfg.get("alpha_pattern") or {}),
            **common,
        )
