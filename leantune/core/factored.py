"""Low-rank deltas whose factors are built from other tensors.

Many low-rank methods do not train two free matrices: VeRA scales frozen shared
ones, NOLA mixes random bases, SVFit trains singular values, PiSSA subtracts a
frozen copy of its start. Each is ``h + scale · B A x`` for an ``(A, B)`` that the
method computes from its own tensors. :class:`Factored` is that form written
once: a subclass says only how to build ``(A, B)`` (:meth:`Factored.factors`);
the forward (the module's own operator, the base's dtype), merging, the engine's
fused Linear path and export as plain LoRA come from here. Factors use LowRank's
layout (``A``: r × in, ``B``: out × r; conv kernels on ``A``).
"""

from __future__ import annotations

import torch
from torch import nn

from .site import Delta
from .weights import WeightView


class Factored(Delta):
    """``h + scale · B A x`` with ``(A, B) = self.factors()``; merges as ``W += scale · B A``."""

    mergeable = True

    def __init__(self, view: WeightView, scale: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        self.view = view
        self.on_linear = view.kind == "linear"  # a plain bool, which torch.compile's guards skip while unchanged
        self.scale = scale
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(A, B)`` pair applied right now, differentiable in the trained tensors."""
        raise NotImplementedError

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        dtype = h.dtype if h.is_floating_point() else torch.float32
        if self.view.kind != "embedding":
            x = self.dropout(x.to(dtype))
        a, b = self.factors()
        return h + self.view.apply_lowrank(base, x, a.to(dtype), b.to(dtype)) * self.scale

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        a, b = self.factors()
        return self.view.lowrank_weight(a.float(), b.float()) * self.scale

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """For the engine's fused Linear path: ``(A, B, scale)`` when :meth:`post` is the plain form."""
        dropping = self.training and isinstance(self.dropout, nn.Dropout)
        if not self.on_linear or dropping or type(self).post is not Factored.post:
            return None
        return (*self.factors(), self.scale)

    def lowrank_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, scale)`` with ``ΔW = scale · B A`` exactly, for export as plain LoRA."""
        a, b = self.factors()
        return a.detach(), b.detach(), self.scale


class Residual(Factored):
    """Trainable ``(A, B)`` started from given factors, minus a frozen copy of that start.

    ``h + scale · (B A − B₀ A₀) x`` equals the base output at init and, after
    training, equals "base weight minus ``scale · B₀ A₀`` (the residual) plus
    ``scale · B A``" — PiSSA's and CorDA's model — without changing the base
    weight, so ``disabled``, other adapters and deletion see the original base.
    As one rank-2r pair ``[A; A₀], [B, −B₀]`` it is exactly the plain LoRA that
    HF PEFT exports for these methods.
    """

    def __init__(self, view: WeightView, a: torch.Tensor, b: torch.Tensor, scale: float, dropout: float = 0.0):
        super().__init__(view, scale, dropout)
        a, b = to_lowrank_layout(view, a, b)
        self.A = nn.Parameter(a.clone())
        self.B = nn.Parameter(b.clone())
        self.register_buffer("A0", a.clone())
        self.register_buffer("B0", b.clone())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.A, self.A0.to(self.A.dtype)]), torch.cat([self.B, -self.B0.to(self.B.dtype)], dim=1)


def weight_matrix(view: WeightView, module: nn.Module) -> torch.Tensor:
    """The base weight as an fp32 ``out × in`` matrix (conv kernels flattened into ``in``)."""
    w = module.weight.detach().float()
    if view.kind == "conv":
        return w.flatten(1)
    if view.kind in ("conv1d_t", "embedding"):
        return w.T
    return w


def from_matrix(view: WeightView, matrix: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: an ``out × in`` matrix in ``module.weight``'s layout and dtype."""
    if view.kind == "conv":
        matrix = matrix.reshape(module.weight.shape)
    elif view.kind in ("conv1d_t", "embedding"):
        matrix = matrix.T
    return matrix.to(module.weight.dtype)


def to_lowrank_layout(view: WeightView, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Matrices ``a`` (r × in·k) and ``b`` (out × r) in the view's low-rank layout."""
    if view.kind != "conv":
        return a, b
    kernel = view.a_shape_tail
    return a.reshape(a.shape[0], view.in_features, *kernel), b.reshape(*b.shape, *([1] * len(kernel)))


def per_output(view: WeightView, vector: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``vector`` (out) shaped to broadcast over the output channels of ``like``."""
    if view.kind == "conv":
        return vector.view(1, -1, *([1] * (like.dim() - 2)))
    return vector
