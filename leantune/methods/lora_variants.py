"""LoRA variants that change the scale, the composition or what trains: rsLoRA, DoRA, LoRA-FA, DyLoRA.

Length: four methods in one file (about 65 lines a method, DoRA's magnitude form the longest).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..api import adapter_paths, adapters
from ..config import MethodConfig
from ..core.factored import Factored, from_matrix, per_output, weight_matrix
from ..core.forms import LowRank
from ..core.weights import WeightView, weight_view
from ..registry import register
from .lora import LoRA, pattern_value

# --- rsLoRA ------------------------------------------------------------------------


@register
@dataclass
class RsLoRA(LoRA):
    """rsLoRA (Kalajdzievski, 2023): LoRA with scale ``alpha / sqrt(r)``, so high ranks keep
    learning instead of being damped by ``1/r``. HF PEFT: ``LoraConfig(use_rslora=True)``."""

    name: ClassVar[str] = "rslora"

    def scale_for(self, path: str, r: int) -> float:
        return float(pattern_value(self.alpha_pattern, path, self.alpha)) / math.sqrt(r)

    def peft_config(self, paths: list[str]) -> dict[str, Any]:
        return {**super().peft_config(paths), "use_rslora": True}

    @classmethod
    def peft_claims(cls, cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("use_rslora")) and not cfg.get("use_dora")

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], **common: Any) -> RsLoRA:
        return super().from_peft_config({**cfg, "use_rslora": False}, **common)


# --- DoRA --------------------------------------------------------------------------


class DoRADelta(LowRank):
    """``h' = (m / ‖W + s·BA‖) ⊙ (W x + s·B A x) + bias``, the norm per output channel and detached
    from the graph (DoRA §4.3), computed as HF PEFT does: on top of the incoming ``h``."""

    def __init__(self, view: WeightView, r: int, scale: float, dropout: float, init: str, base: nn.Module):
        super().__init__(view, r, scale, dropout, init)
        norm = self.weight_norm(base)
        self.magnitude = nn.Parameter(norm.view(1, -1, *([1] * len(view.a_shape_tail))) if view.kind == "conv" else norm)
        self._merged_norm: torch.Tensor | None = None

    def _delta_matrix(self) -> torch.Tensor:
        return (self.B.detach().float().flatten(1) @ self.A.detach().float().flatten(1)) * self.scale

    @torch.no_grad()
    def weight_norm(self, base: nn.Module) -> torch.Tensor:
        weight = weight_matrix(self.view, base)  # the delta may not be on the base's device yet (adapt moves it)
        return torch.linalg.norm(weight + self._delta_matrix().to(weight.device), dim=1)

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype
        if self.view.kind != "embedding":
            x = self.dropout(x.to(dtype))
        lora = self.view.apply_lowrank(base, x, self.A.to(dtype), self.B.to(dtype)) * self.scale
        factor = per_output(self.view, (self.magnitude.view(-1) / self.weight_norm(base)).to(dtype), h)
        if self.view.kind != "embedding" and self.training and isinstance(self.dropout, nn.Dropout):
            plain = base(x)  # the base on the dropped-out input, as PEFT recomputes it
        else:
            plain = h
        bias = getattr(base, "bias", None)
        if bias is not None:
            plain = plain - per_output(self.view, bias.to(dtype), h)
        return h + (factor - 1) * plain + factor * lora

    def _merged(self, base: nn.Module, norm: torch.Tensor) -> torch.Tensor:
        factor = (self.magnitude.detach().float().view(-1) / norm)[:, None]
        return factor * (weight_matrix(self.view, base) + self._delta_matrix())

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        merged = self._merged(base, self.weight_norm(base))
        return from_matrix(self.view, merged - weight_matrix(self.view, base), base).float()

    def merge(self, base: nn.Module) -> None:
        self._merged_norm = self.weight_norm(base)
        base.weight.data = from_matrix(self.view, self._merged(base, self._merged_norm), base)

    def unmerge(self, base: nn.Module) -> None:
        factor = (self.magnitude.detach().float().view(-1) / self._merged_norm)[:, None]
        original = weight_matrix(self.view, base) / factor - self._delta_matrix()
        base.weight.data = from_matrix(self.view, original, base)
        self._merged_norm = None


@register
@dataclass
class DoRA(LoRA):
    """DoRA (Liu et al., 2024): ``W' = m ⊙ (W + s·B A) / ‖W + s·B A‖`` per output channel; the
    magnitude ``m`` (init ``‖W‖``) and the LoRA pair train. ``rslora`` uses ``alpha / sqrt(r)``.
    HF PEFT: ``LoraConfig(use_dora=True)``."""

    rslora: bool = False

    name: ClassVar[str] = "dora"
    fused_linear: ClassVar[bool] = False  # the magnitude divides by the adapted weight's column norms

    def scale_for(self, path: str, r: int) -> float:
        return float(pattern_value(self.alpha_pattern, path, self.alpha)) / (math.sqrt(r) if self.rslora else r)

    def make_delta(self, path: str, module: nn.Module) -> DoRADelta:
        r = self.rank_for(path)
        return DoRADelta(weight_view(module), r, self.scale_for(path, r), self.dropout, self.init, module)

    def peft_keys(self, delta: LowRank) -> dict[str, str]:
        return {**super().peft_keys(delta), "magnitude": "lora_magnitude_vector"}

    def peft_config(self, paths: list[str]) -> dict[str, Any]:
        return {**super().peft_config(paths), "use_dora": True, "use_rslora": self.rslora}

    @classmethod
    def peft_claims(cls, cfg: dict[str, Any]) -> bool:
        return bool(cfg.get("use_dora"))

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], **common: Any) -> DoRA:
        config = super().from_peft_config({**cfg, "use_dora": False, "use_rslora": False}, **common)
        config.rslora = bool(cfg.get("use_rslora"))
        return config


# --- LoRA-FA -----------------------------------------------------------------------


class FrozenAProjection(torch.autograd.Function):
    """``scale · (x Aᵀ) Bᵀ`` with A frozen: backward reads ``x Aᵀ`` (r columns), never ``x``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
        xa = F.linear(x, a)
        ctx.save_for_backward(xa, a, b)
        ctx.scale = scale
        return F.linear(xa, b) * scale

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        xa, a, b = ctx.saved_tensors
        grad_xa = (grad @ b) * ctx.scale
        grad_x = grad_xa @ a if ctx.needs_input_grad[0] else None
        grad_b = grad.reshape(-1, grad.shape[-1]).T @ xa.reshape(-1, xa.shape[-1]) * ctx.scale if ctx.needs_input_grad[2] else None
        return grad_x, None, grad_b, None


class LoRAFADelta(LowRank):
    """LoRA with ``A`` a frozen buffer (random at init, B = 0); on Linear-like sites the branch
    runs through :class:`FrozenAProjection` (or the engine's fused path, which also keeps no ``x``)."""

    def __init__(self, view: WeightView, r: int, scale: float, dropout: float, init: str) -> None:
        super().__init__(view, r, scale, dropout, init)
        a = self.A.detach()
        if view.kind == "embedding" and init == "lora":  # LoRA puts the zero on A there; A must be random
            a = torch.randn_like(a)
            nn.init.zeros_(self.B)
        del self.A
        self.register_buffer("A", a)

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.view.kind not in ("linear", "conv1d_t"):
            return super().post(base, x, h)
        dtype = h.dtype
        x = self.dropout(x.to(dtype))
        return h + FrozenAProjection.apply(x, self.A.to(dtype), self.B.to(dtype), self.scale)

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        return None if not self.on_linear or dropping else (self.A, self.B, self.scale)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.A, self.B.detach(), self.scale


@register
@dataclass
class LoRAFA(LoRA):
    """LoRA-FA (Zhang et al., 2023): LoRA with A frozen at its random init and only B trained, so
    the backward needs ``A x`` (r values per token) instead of the layer input. Saved in HF PEFT's
    LoRA layout (PEFT has LoRA-FA only as an optimizer)."""

    name: ClassVar[str] = "lora_fa"

    def make_delta(self, path: str, module: nn.Module) -> LoRAFADelta:
        r = self.rank_for(path)
        return LoRAFADelta(weight_view(module), r, self.scale_for(path, r), self.dropout, self.init)

    @classmethod
    def peft_claims(cls, cfg: dict[str, Any]) -> bool:
        return False  # a PEFT LoRA folder is plain LoRA; load it as such


# --- DyLoRA ------------------------------------------------------------------------


class DyLoRADelta(Factored):
    """LoRA whose rank is a nested prefix: ``(alpha / b) · B[:, :b] A[:b]``. While training with
    gradients on, each forward draws ``b`` uniformly from 1..r; otherwise ``b = self.rank``."""

    def __init__(self, view: WeightView, r: int, alpha: float, dropout: float, rank: int) -> None:
        super().__init__(view, 1.0, dropout)
        plain = LowRank(view, r, 1.0)
        self.A, self.B = plain.A, plain.B
        self.alpha = alpha
        self.rank = rank

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        r = self.A.shape[0]
        b = int(torch.randint(1, r + 1, ())) if self.training and torch.is_grad_enabled() else self.rank
        return self.A[:b], self.B[:, :b] * (self.alpha / b)


@register
@dataclass
class DyLoRA(MethodConfig):
    """DyLoRA (Valipour et al., 2023): LoRA trained on a random rank prefix ``b ≤ r`` each step,
    so every rank up to ``r`` works after training. ``eval_rank``: the rank used outside training
    (``None``: r); change it later with :func:`set_dylora_rank`. Scale ``alpha / b``."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    eval_rank: int | None = None

    name: ClassVar[str] = "dylora"
    fused_linear: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r <= 0:
            raise ValueError(f"dylora: r must be a positive integer, got {self.r}")
        if self.eval_rank is not None and not 1 <= self.eval_rank <= self.r:
            raise ValueError(f"dylora: eval_rank must be between 1 and r={self.r}, got {self.eval_rank}")

    def make_delta(self, path: str, module: nn.Module) -> DyLoRADelta:
        return DyLoRADelta(weight_view(module), self.r, self.alpha, self.dropout, self.eval_rank or self.r)


def set_dylora_rank(model: nn.Module, rank: int, name: str = "default") -> None:
    """Use rank ``rank`` (1..r) for DyLoRA adapter ``name`` outside training (unmerge first)."""
    deltas = [d for _, _, d in adapter_paths(model, name) if isinstance(d, DyLoRADelta)]
    if not deltas:
        raise ValueError(f"adapter {name!r} has no dylora deltas")
    r = deltas[0].A.shape[0]
    if not 1 <= rank <= r:
        raise ValueError(f"dylora rank must be between 1 and r={r}, got {rank}")
    for d in deltas:
        d.rank = rank
    adapters(model)[name].config.eval_rank = rank  # saved adapters reload at this rank


