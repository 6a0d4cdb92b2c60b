"""Methods that move rank between layers while training: AdaLoRA (prune) and IncreLoRA (grow).

Both are the SVD form ``B diag(E) A`` driven by the one rank-budget mechanism in
:mod:`leantune.core.rank_budget`; training loops drive it through ``MethodConfig.schedule`` (``lt.rank_budget`` by hand).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..config import MethodConfig, config_field
from ..core.rank_budget import BudgetPlan, GrowToBudget, PruneToBudget, RankBudget, SVDLowRank, rank_budget
from ..core.weights import LINEAR_TYPES, weight_view
from ..registry import register
from .lora import pattern_value


@dataclass
class _BudgetFields(MethodConfig):
    """Fields of the rank-budget schedule shared by the adaptive methods (see core/rank_budget.py)."""

    alpha: float = 8.0
    dropout: float = 0.0
    tinit: int = 0
    tfinal: int = 0
    delta_t: int = 1
    beta1: float = 0.85
    beta2: float = 0.85
    orth_reg_weight: float = 0.5
    total_step: int | None = None

    mergeable: ClassVar[bool] = True
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"{self.name}: beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"{self.name}: orth_reg_weight must be >= 0, got {self.orth_reg_weight}")
        if self.delta_t <= 0:
            raise ValueError(f"{self.name}: delta_t must be a positive number of steps, got {self.delta_t}")

    def schedule(self, model: nn.Module, name: str, total_steps: int | None) -> RankBudget:
        """The rank budget over the run (``total_step`` from the config when set, else the loop's)."""
        return rank_budget(model, name, None if self.total_step is not None else total_steps)

    def _plan(self, target: int, total_step: int | None, policy: PruneToBudget | GrowToBudget) -> BudgetPlan:
        total = total_step if total_step is not None else self.total_step
        if total is None or total <= 0:
            raise ValueError(f"{self.name}: the rank budget needs total_step (training steps): "
                             f"lt.rank_budget(model, total_step=...) or {type(self).__name__}(total_step=...)")
        return BudgetPlan(target, self.tinit, self.tfinal, self.delta_t, self.beta1, self.beta2,
                          self.orth_reg_weight, total, policy)


@register
@dataclass
class AdaLoRA(_BudgetFields):
    """AdaLoRA (Zhang et al., 2023): ``ΔW = B diag(E) A · alpha / init_r`` per module, starting at
    ``init_r`` components; the rank budget prunes singular values by importance down to an average
    of ``target_r`` on a cubic schedule (``tinit`` warm-up, ``tfinal`` fixed end, every ``delta_t``
    steps); ``budget.penalty()`` is the orthogonality regulariser (``orth_reg_weight``).
    ``rank_pattern``: per-module ranks of an adapter that was pruned and saved (HF PEFT's pattern).
    HF PEFT: ``AdaLoraConfig``."""

    init_r: int = 12
    target_r: int = 8
    rank_pattern: dict[str, int] = config_field({})

    name: ClassVar[str] = "adalora"
    fused_linear: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = "ADALORA"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_r <= 0 or not 0 < self.target_r <= self.init_r:
            raise ValueError(f"adalora: need 0 < target_r <= init_r, got target_r={self.target_r}, init_r={self.init_r}")
        if any(not isinstance(r, int) or not 0 <= r <= self.init_r for r in self.rank_pattern.values()):
            raise ValueError(f"adalora: rank_pattern ranks must be integers in [0, init_r], got {self.rank_pattern}")

    def make_delta(self, path: str, module: nn.Module) -> SVDLowRank:
        scale = (self.alpha if self.alpha > 0 else self.init_r) / (self.init_r + 1e-5)  # HF PEFT's scaling / ranknum
        r = int(pattern_value(self.rank_pattern, path, self.init_r))
        return SVDLowRank(weight_view(module), r, scale, self.dropout)

    def budget_plan(self, total_step: int | None) -> BudgetPlan:
        return self._plan(self.target_r, total_step, PruneToBudget())

    # --- HF PEFT interop --------------------------------------------------------
    def peft_keys(self, delta: SVDLowRank) -> dict[str, str]:
        return {"A": "lora_A", "E": "lora_E", "B": "lora_B"}

    def peft_config(self, paths: list[str]) -> dict[str, Any]:
        ranks = {p: int(pattern_value(self.rank_pattern, p, self.init_r)) for p in paths}
        pattern = {f"{p}.lora_E": [True] * r + [False] * (self.init_r - r) for p, r in ranks.items() if r != self.init_r}
        return {
            "r": self.init_r, "init_r": self.init_r, "target_r": self.target_r, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "tinit": self.tinit, "tfinal": self.tfinal, "deltaT": self.delta_t,
            "beta1": self.beta1, "beta2": self.beta2, "orth_reg_weight": self.orth_reg_weight,
            "total_step": self.total_step or self.tinit + self.tfinal + 1,  # PEFT insists on a valid schedule
            "rank_pattern": pattern or None, "target_modules": paths, "exclude_modules": None, "bias": "none",
            "init_lora_weights": True, "use_rslora": False, "use_dora": False,
        }

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], **common: Any) -> AdaLoRA:
        if cfg.get("bias", "none") != "none":
            raise ValueError(f"this PEFT AdaLoRA adapter uses bias={cfg['bias']!r}, which leantune's adalora does not read")
        pattern = {re.escape(k.removesuffix(".lora_E")): sum(map(bool, v)) for k, v in (cfg.get("rank_pattern") or {}).items()}
        return cls(
            init_r=int(cfg.get("init_r", 12)), target_r=int(cfg.get("target_r", 8)),
            alpha=float(cfg.get("lora_alpha", 8)), dropout=float(cfg.get("lora_dropout", 0.0)),
            tinit=int(cfg.get("tinit", 0)), tfinal=int(cfg.get("tfinal", 0)), delta_t=int(cfg.get("deltaT", 1)),
            beta1=float(cfg.get("beta1", 0.85)), beta2=float(cfg.get("beta2", 0.85)),
            orth_reg_weight=float(cfg.get("orth_reg_weight", 0.5)), total_step=cfg.get("total_step"),
            rank_pattern=pattern, **common,
        )


@register
@dataclass
class IncreLoRA(_BudgetFields):
    """IncreLoRA (Zhang et al., 2023): every module starts with ``init_r`` active components of
    ``max_r``; every ``delta_t`` steps the rank budget gives more to the modules with the highest
    importance, until the average rank reaches ``target_r``. ``ΔW = B diag(E) A · alpha / max_r``;
    new components start with E = 0, so the output does not jump."""

    init_r: int = 2
    target_r: int = 4
    max_r: int = 8
    delta_t: int = 10
    orth_reg_weight: float = 0.1

    name: ClassVar[str] = "increlora"
    fused_linear: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.init_r <= self.target_r <= self.max_r:
            raise ValueError(f"increlora: need 0 < init_r <= target_r <= max_r, got "
                             f"{self.init_r}, {self.target_r}, {self.max_r}")

    def make_delta(self, path: str, module: nn.Module) -> SVDLowRank:
        return SVDLowRank(weight_view(module), self.max_r, self.alpha / self.max_r, self.dropout, active=self.init_r)

    def budget_plan(self, total_step: int | None) -> BudgetPlan:
        return self._plan(self.target_r, total_step, GrowToBudget())
