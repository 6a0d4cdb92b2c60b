"""Forms: what computes a delta. Each form is one :class:`Delta` subclass that
any method can instantiate with its own shapes, scale and initialisation."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .site import Delta
from .weights import WeightView


class LowRank(Delta):
    """``h + scale · B A x`` on a weight site (parallel add); merges as ``W += scale · B A``.

    Parameters use HF PEFT's layouts (``A``: r × in, ``B``: out × r; conv kernels
    on ``A``), so PEFT adapters map one-to-one.
    """

    mergeable = True
    # ``post`` is exactly ``scale · B A x``: false for subclasses that change a hook. A class
    # attribute, so a compiled step checks one value instead of running a Python guard per site.
    plain_hooks = True

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        cls.plain_hooks = cls.post is LowRank.post and cls.pre is Delta.pre and cls.module is Delta.module

    def __init__(self, view: WeightView, r: int, scale: float, dropout: float = 0.0, init: str = "lora") -> None:
        super().__init__()
        a_shape, b_shape = view.lowrank_shapes(r)
        self.view = view
        self.on_linear = view.kind == "linear"  # a plain bool, which torch.compile's guards skip while unchanged
        self.r = r
        self.scale = scale
        self.A = nn.Parameter(torch.empty(a_shape))
        self.B = nn.Parameter(torch.empty(b_shape))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset(init)

    def reset(self, init: str) -> None:
        """``lora``: the usual zero product (B = 0; for embeddings A = 0, B normal);
        ``random``: both factors random, so the delta starts non-zero (tests, probes)."""
        with torch.no_grad():
            if init == "random":
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
                nn.init.normal_(self.B, std=0.02)
            elif init != "lora":
                raise ValueError(f"unknown low-rank init {init!r}; use 'lora' or 'random'")
            elif self.view.kind == "embedding":
                nn.init.zeros_(self.A)
                nn.init.normal_(self.B)
            else:
                nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
                nn.init.zeros_(self.B)

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        # Compute in the base's dtype (bf16 stays bf16); parameters keep their own precision.
        dtype = h.dtype if h.is_floating_point() else self.A.dtype
        if self.view.kind != "embedding":
            x = self.dropout(x.to(dtype))
        out = self.view.apply_lowrank(base, x, self.A.to(dtype), self.B.to(dtype)) * self.scale
        return h + out

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.view.lowrank_weight(self.A.float(), self.B.float()) * self.scale

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, scale)`` when :meth:`post` is exactly ``scale · B A x`` on a Linear right
        now (no dropout in play), so the engine may fuse it; ``None`` otherwise."""
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        if not self.on_linear or dropping or not self.plain_hooks:
            return None
        return self.A, self.B, self.scale


class Replace(Delta):
    """A trainable copy that runs instead of the base module (HF PEFT's ``modules_to_save``)."""

    mergeable = True

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.trained = copy.deepcopy(base)
        for p in self.trained.parameters():
            p.requires_grad_(True)
        self._originals: dict[str, torch.Tensor] | None = None

    def module(self, base: nn.Module) -> nn.Module:
        return self.trained

    def merge(self, base: nn.Module) -> None:
        self._originals = {k: v.detach().clone() for k, v in base.state_dict().items()}
        base.load_state_dict(self.trained.state_dict())

    def unmerge(self, base: nn.Module) -> None:
        if self._originals is not None:
            base.load_state_dict(self._originals)
            self._originals = None


class Stack(Delta):
    """Several deltas of one adapter at one site (composed methods): hooks chain in order."""

    def __init__(self, parts: list[Delta]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.mergeable = all(p.mergeable for p in parts)

    def pre(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            x = p.pre(base, x)
        return x

    def module(self, base: nn.Module) -> nn.Module:
        for p in self.parts:
            base = p.module(base)
        return base

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        for p in self.parts:
            h = p.post(base, x, h)
        return h

    def post_call(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        for p in self.parts:
            h = p.post_call(base, x, h, args, kwargs)
        return h

    def merge(self, base: nn.Module) -> None:
        for p in self.parts:
            p.merge(base)

    def unmerge(self, base: nn.Module) -> None:
        for p in reversed(self.parts):
            p.unmerge(base)

    def folded(self) -> Stack:
        parts = [p.folded() for p in self.parts]
        return self if all(a is b for a, b in zip(parts, self.parts, strict=True)) else Stack(parts)
