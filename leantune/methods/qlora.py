"""QLoRA and LQ-LoRA: LoRA over a base whose Linear weights are stored in 4-bit NF4."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..core.quant import QuantLinear, QuantLowRank, lq_decompose, quantize_modules, replace_base
from ..core.site import base_module
from ..core.sparse import logical_weight
from ..core.weights import LINEAR_TYPES, weight_view
from ..registry import register
from .lora import LoRA


@register
@dataclass
class QLoRA(LoRA):
    """QLoRA (Dettmers et al., 2023): the targeted Linear / GPT-2 Conv1D weights are
    stored as 4-bit NF4 (blockwise absmax, block 64), frozen, and LoRA trains beside them
    in the adapter's own precision. Every LoRA field applies; the adapter saves as a
    plain HF PEFT LoRA.

    The quantized base is what ``lt.disabled`` and ``lt.unload`` give back.
    ``lt.merge`` de-quantizes the merged modules (with a warning) and never
    re-quantizes; ``lt.unmerge`` restores the 4-bit codes.
    """

    name: ClassVar[str] = "qlora"
    fused_linear: ClassVar[bool] = False  # the base is 4-bit, not an nn.Linear
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = "LORA"
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES
    quantizes_base: ClassVar[bool] = True

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        quantize_modules(model, paths)

    def make_delta(self, path: str, module: nn.Module) -> QuantLowRank:
        r = self.rank_for(path)
        return QuantLowRank(weight_view(module), r, self.scale_for(path, r), self.dropout, self.init)


@register
@dataclass
class LQLoRA(QLoRA):
    """LQ-LoRA (Guo et al., 2024): QLoRA initialised by splitting ``W ≈ Q + B A``.

    ``iters`` rounds alternate ``Q = NF4(W − B A)`` and ``B A = SVD_r(W − Q)``; the
    base keeps ``Q`` and the adapter starts at the best ``B A`` found, so the
    adapted model starts closer to ``W`` than QLoRA's ``Q``. A module already
    quantized (by another adapter) has lost ``W``: its adapter starts at zero.
    """

    iters: int = 4

    name: ClassVar[str] = "lq_lora"
    peft_type: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.iters, int) or self.iters <= 0:
            raise ValueError(f"{self.name}: iters must be a positive integer, got {self.iters!r}")

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        done = [p for p in paths if isinstance(base_module(model, p), QuantLinear)]
        quantize_modules(model, done)  # an error for merged modules, as in QLoRA
        if done:
            warnings.warn(f"{self.name}: {', '.join(done[:3])}{' ...' if len(done) > 3 else ''} already 4-bit, "
                          "so the adapter starts at zero there (plain QLoRA init)", UserWarning, stacklevel=3)
        self._factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path in paths:
            if path in done:
                continue
            module = base_module(model, path)
            r = self.rank_for(path)
            codes, b, a = lq_decompose(logical_weight(module, weight_view(module)), r, self.iters)
            root = math.sqrt(self.scale_for(path, r))  # scale · B A equals the SVD part
            self._factors[path] = (a / root, b / root)
            replace_base(model, path, QuantLinear.from_module(module, codes))

    def make_delta(self, path: str, module: nn.Module) -> QuantLowRank:
        delta = super().make_delta(path, module)
        if path in self._factors:
            a, b = self._factors.pop(path)
            with torch.no_grad():
                delta.A.copy_(a)
                delta.B.copy_(b)
        return delta
