"""UniPELT: LoRA, a prefix and an adapter, each behind a learned gate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core.forms_extra import io_widths
from ..core.gates import Gated
from ..core.site import Delta
from ..core.virtual_tokens import KVShape, Prefix
from ..registry import register
from .adapters import Pfeiffer
from .lora import LoRA
from .prefix_tuning import PrefixTuning


class GatedPrefix(Prefix):
    """A prefix whose keys and values are scaled per layer by ``σ(g_l)`` (``g`` learned, 0 at init)."""

    def __init__(self, n: int, shape: KVShape, projection_dim: int | None) -> None:
        super().__init__(n, shape, projection_dim)
        self.gate = nn.Parameter(torch.zeros(shape.layers))

    def prefix(self) -> torch.Tensor:
        return super().prefix() * torch.sigmoid(self.gate).view(-1, 1, 1, 1, 1)


class _GatedLoRA(LoRA):
    def make_delta(self, path: str, module: nn.Module) -> Delta:
        return Gated(super().make_delta(path, module), io_widths(module)[0], reads="input")


class _GatedAdapter(Pfeiffer):
    def make_delta(self, path: str, module: nn.Module) -> Delta:
        return Gated(super().make_delta(path, module), io_widths(module)[1], reads="output")


class _GatedPrefixTuning(PrefixTuning):
    def make_delta(self, path: str, module: nn.Module) -> Prefix:
        return GatedPrefix(self.num_virtual_tokens, self._kv, self._kv.width if self.projection else None)


@register
@dataclass
class UniPELT(MethodConfig):
    """UniPELT (Mao et al., 2022): LoRA (rank ``r``, ``alpha``) on the attention query and
    value projections, a prefix of ``num_virtual_tokens`` (through an MLP, as prefix
    tuning) and a sequential bottleneck adapter after every FFN (hidden ÷ ``reduction``),
    each behind a learned gate so the model picks the mix per task. ``targets`` moves
    the LoRA part; ``exclude`` applies to LoRA and adapter. LoRA and adapter
    gates are ``σ(w·z + b)`` per token, ``z`` the module's input (LoRA) or the FFN output
    (adapter), which replaces LoRA's ``alpha / r`` when ``alpha = r``. The prefix lives in
    a key/value cache shared by all positions, so its gate is a learned scalar per layer
    (the authors' code averages a gate over each sequence's tokens instead, which
    would let a decoder's earlier tokens see later ones).
    """

    r: int = 8
    alpha: float = 8.0
    num_virtual_tokens: int = 10
    reduction: int = 16

    name: ClassVar[str] = "unipelt"

    def components(self) -> list[MethodConfig]:
        return [
            _GatedLoRA(r=self.r, alpha=self.alpha, targets=self.targets or ["@attn_q", "@attn_v"],
                       exclude=self.exclude),
            _GatedPrefixTuning(num_virtual_tokens=self.num_virtual_tokens),
            _GatedAdapter(reduction=self.reduction, exclude=self.exclude),
        ]
