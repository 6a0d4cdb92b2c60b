"""Prefix tuning and P-Tuning v2: trainable keys and values before every attention layer's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..core.virtual_tokens import Prefix, VirtualTokenConfig
from ..registry import register


@register
@dataclass
class PrefixTuning(VirtualTokenConfig):
    """Prefix tuning (Li & Liang, 2021): every attention layer attends to
    ``num_virtual_tokens`` extra trained keys and values, fed to the model as a
    pre-filled key/value cache. With ``projection`` they are computed by HF PEFT's
    MLP (``Linear → tanh → Linear``, hidden width ``projection_dim``, default the key
    width) from ``num_virtual_tokens`` embeddings, which steadies training;
    ``lt.fold(model)`` then replaces the MLP by the prefixes it computes. Matches
    HF PEFT's PREFIX_TUNING; a prefix still behind its MLP is saved in leantune's
    layout (PEFT stores only the MLP's output), a folded one in PEFT's.
    """

    num_virtual_tokens: int = 20
    projection: bool = True
    projection_dim: int | None = None

    name: ClassVar[str] = "prefix_tuning"
    peft_type: ClassVar[str | None] = "PREFIX_TUNING"
    uses_prefix: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        for label, v in (("num_virtual_tokens", self.num_virtual_tokens), ("projection_dim", self.projection_dim)):
            if v is not None and (not isinstance(v, int) or v <= 0):
                raise ValueError(f"{self.name}: {label} must be a positive integer, got {v!r}")
        if self.projection:
            self.peft_type = None  # type: ignore[misc]  # PEFT has no layout for the unfolded MLP

    def make_delta(self, path: str, module: nn.Module) -> Prefix:
        width = (self.projection_dim or self._kv.width) if self.projection else None
        return Prefix(self.num_virtual_tokens, self._kv, width)

    def folded(self) -> PrefixTuning | None:
        if not self.projection:
            return None
        return self._carry(dataclasses.replace(self, projection=False, projection_dim=None))

    # --- HF PEFT interop --------------------------------------------------------
    def peft_keys(self, delta: Prefix) -> dict[str, str]:
        return {"weight": "prompt_embeddings"}

    def peft_config(self, paths: list[str]) -> dict[str, Any]:
        return {**super().peft_config(paths), "num_virtual_tokens": self.num_virtual_tokens,
                "prefix_projection": False, "encoder_hidden_size": self._facts["token_dim"], "init_weights": None}

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], **common: Any) -> PrefixTuning:
        cls.check_peft_config(cfg)
        # PEFT saves the prefixes after its MLP, so every PEFT prefix loads folded.
        return cls(num_virtual_tokens=int(cfg["num_virtual_tokens"]), projection=False, **common)


@register
@dataclass
class PTuningV2(PrefixTuning):
    """P-Tuning v2 (Liu et al., 2022): deep prompts — free key/value prefixes at
    every layer, no reparameterisation — usually with a new classification head
    (``task="seq-cls"``). HF PEFT's PREFIX_TUNING without ``prefix_projection``.
    """

    projection: bool = False

    name: ClassVar[str] = "p_tuning_v2"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.projection:
            raise ValueError("p_tuning_v2 has no reparameterisation; use prefix_tuning for prefixes behind an MLP")
