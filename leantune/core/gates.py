"""Learned gates: an input-dependent scale on any delta that composes with a site's output.

The design space's "scale" dimension takes a constant, a learned scalar or a
learned gate; :class:`Gated` is the last, for any form, so a composed method
(UniPELT) can put LoRA, an adapter or anything else behind a gate.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .site import Delta


class Gated(Delta):
    """``h + σ(w·z + b) · (inner(h) − h)``: the inner delta's change to the output,
    scaled per token by a learned gate that reads ``z``, the site's input
    (``reads="input"``) or output (``"output"``). Only the output change is gated;
    the inner delta's ``pre``/``module`` hooks run as they are.
    """

    def __init__(self, inner: Delta, width: int, reads: str = "input") -> None:
        super().__init__()
        if reads not in ("input", "output"):
            raise ValueError(f"unknown gate input {reads!r}; use 'input' or 'output'")
        self.inner = inner
        self.gate = nn.Linear(width, 1)
        self.reads = reads

    def pre(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.inner.pre(base, x)

    def module(self, base: nn.Module) -> nn.Module:
        return self.inner.module(base)

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        z = x if self.reads == "input" else h
        g = torch.sigmoid(F.linear(z, self.gate.weight.to(z.dtype), self.gate.bias.to(z.dtype)))
        return h + g.to(h.dtype) * (self.inner.post(base, x, h) - h)
