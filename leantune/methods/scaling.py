"""Scaling and selective tuning: vectors on outputs/inputs, trained norm layers.

All four are linear in the base weights and merge: BitFit's shift folds into the
bias, (IA)³'s scale into the weight, SSF's scale and shift into both, LN tuning's
copy into the norm's parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import MethodConfig
from ..core.families import expand_roles
from ..core.forms import Stack
from ..core.forms_extra import TunedCopy, VectorScale, VectorShift, output_width
from ..core.targets import name_matches
from ..core.weights import LINEAR_TYPES
from ..registry import register


@register
@dataclass
class BitFit(MethodConfig):
    """BitFit (Ben Zaken et al., 2022): train bias terms only.

    Each target gets a shift ``β`` (init 0) on its output, i.e. a trainable change of
    its bias. Merging adds ``β`` to the bias; where the base has no bias (Llama) merging
    creates one and unmerging removes it. Targets: Linear layers and LayerNorms.
    """

    name: ClassVar[str] = "bitfit"
    mergeable: ClassVar[bool] = True
    default_targets: ClassVar[str | list[str]] = "all-linear"
    site_types: ClassVar[tuple[type, ...]] = (*LINEAR_TYPES, nn.LayerNorm)

    def make_delta(self, path: str, module: nn.Module) -> VectorShift:
        return VectorShift(output_width(module))


@register
@dataclass
class IA3(MethodConfig):
    """(IA)³ (Liu et al., 2022; HF PEFT ``IA3``): learned vectors, init 1, rescale the outputs of
    the key and value projections and the input of the FFN down projection (the FFN intermediate
    activation). Merges into the weights.

    feedforward: targets whose *input* is scaled (HF PEFT's ``feedforward_modules``), same forms
    as ``targets``; ``None`` means ``"@ffn_out"``, ``[]`` none.
    """

    feedforward: str | list[str] | None = None

    name: ClassVar[str] = "ia3"
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = "IA3"
    default_targets: ClassVar[str | list[str]] = ["@attn_k", "@attn_v", "@ffn_out"]
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.feedforward, tuple):
            self.feedforward = list(self.feedforward)

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        chosen = "@ffn_out" if self.feedforward is None else self.feedforward
        pattern = expand_roles(model, chosen, self.name)
        self._feedforward = [p for p in paths if name_matches(p, pattern)]

    def make_delta(self, path: str, module: nn.Module) -> VectorScale:
        return VectorScale(module, "input" if path in self._feedforward else "output")

    # --- HF PEFT interop --------------------------------------------------------
    def peft_keys(self, delta: VectorScale) -> dict[str, str]:
        return {"scale": "ia3_l"}

    def peft_config(self, paths: list[str]) -> dict[str, Any]:
        return {
            "target_modules": paths,
            "exclude_modules": None,
            "feedforward_modules": [p for p in self._feedforward if p in paths],
            "init_ia3_weights": True,
        }

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], **common: Any) -> IA3:
        ff = cfg.get("feedforward_modules")
        return cls(feedforward=ff if isinstance(ff, str) or ff is None else list(ff), **common)


@register
@dataclass
class SSF(MethodConfig):
    """SSF (Lian et al., 2022): ``h ↦ γ ⊙ h + β`` after each target Linear, ``γ ~ N(1, std²)``,
    ``β ~ N(0, std²)``. Folded into that Linear at merge: ``W ← diag(γ) W``, ``b ← γ b + β``
    (a bias is created where the Linear has none)."""

    std: float = 0.02

    name: ClassVar[str] = "ssf"
    mergeable: ClassVar[bool] = True
    default_targets: ClassVar[str | list[str]] = "all-linear"
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.std < 0:
            raise ValueError(f"ssf: std must be >= 0, got {self.std}")

    def make_delta(self, path: str, module: nn.Module) -> Stack:
        return Stack([VectorScale(module, "output", 1.0, self.std), VectorShift(output_width(module), self.std)])


@register
@dataclass
class LNTuning(MethodConfig):
    """LayerNorm tuning (Zhao et al., 2023; HF PEFT ``LN_TUNING``): a trainable copy of each
    normalisation layer (LayerNorm, LlamaRMSNorm, ... via the ``@norm`` role) replaces it.
    Several active LN-tuning adapters add their changes; merging folds the copy into the norm."""

    name: ClassVar[str] = "ln_tuning"
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = "LN_TUNING"
    default_targets: ClassVar[str | list[str]] = "@norm"
    site_types: ClassVar[tuple[type, ...]] = (nn.Module,)

    def make_delta(self, path: str, module: nn.Module) -> TunedCopy:
        return TunedCopy(module)

    # --- HF PEFT interop --------------------------------------------------------
    def peft_keys(self, delta: TunedCopy) -> dict[str, str]:
        return {k: "ln_tuning_layers." + k.removeprefix("trained.") for k in delta.state_dict()}

    def peft_config(self, paths: list[str]) -> dict[str, Any]:
        return {"target_modules": paths, "exclude_modules": None}

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], **common: Any) -> LNTuning:
        return cls(**common)
