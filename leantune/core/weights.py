"""What every weight-bearing module looks like to a delta.

Forms that act on a weight (low-rank, vector, sparse) see the base through a
:class:`WeightView`: its logical (out, in) shape, how to run a low-rank pair in
the module's own operator, and how to turn an ``out × in`` update into the
module's weight layout. One view per module kind, shared by every method.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _gpt2_conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return ()
    return (Conv1D,)


GPT2_CONV1D = _gpt2_conv1d_type()
LINEAR_TYPES: tuple[type, ...] = (nn.Linear, *GPT2_CONV1D)
CONV_TYPES: tuple[type, ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
WEIGHT_TYPES: tuple[type, ...] = (*LINEAR_TYPES, nn.Embedding, *CONV_TYPES)


@dataclass(frozen=True)
class WeightView:
    """Shape facts of one base module: ``out_features × in_features`` logically."""

    kind: str  # "linear" | "conv1d_t" (GPT-2, weight stored in × out) | "embedding" | "conv"
    out_features: int
    in_features: int
    # Shapes of a low-rank pair in the module's own layout (HF PEFT's layout).
    a_shape_tail: tuple[int, ...] = ()

    def lowrank_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self.kind == "conv":
            kernel = self.a_shape_tail
            return (r, self.in_features, *kernel), (self.out_features, r, *([1] * len(kernel)))
        return (r, self.in_features), (self.out_features, r)

    def apply_lowrank(self, base: nn.Module, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B A x`` computed with the base module's operator (no scale)."""
        if self.kind == "embedding":
            after_a = F.embedding(
                x, a.T, padding_idx=base.padding_idx, max_norm=base.max_norm,
                norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse,
            )
            return after_a @ b.T
        if self.kind == "conv":
            conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[len(self.a_shape_tail)]
            mid = conv(x, a, stride=base.stride, padding=base.padding, dilation=base.dilation)
            return conv(mid, b)
        return F.linear(F.linear(x, a), b)

    def lowrank_weight(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """``B A`` in the base weight's layout."""
        if self.kind == "conv":
            return torch.einsum("or,ri...->oi...", b.flatten(1), a)
        return self.to_weight_layout(b.flatten(1) @ a)

    def to_weight_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """An ``out × in`` matrix in the base weight's storage layout."""
        if self.kind in ("conv1d_t", "embedding"):
            return matrix.T
        return matrix


def weight_view(module: nn.Module) -> WeightView:
    """The :class:`WeightView` of a supported module; a clear error otherwise."""
    describe = getattr(module, "leantune_weight_view", None)
    if describe is not None:  # modules that store their weight another way (core/quant.py's QuantLinear)
        return describe()
    if isinstance(module, nn.Linear):
        return WeightView("linear", module.out_features, module.in_features)
    if GPT2_CONV1D and isinstance(module, GPT2_CONV1D):
        fan_in, fan_out = module.weight.shape
        return WeightView("conv1d_t", fan_out, fan_in)
    if isinstance(module, nn.Embedding):
        return WeightView("embedding", module.embedding_dim, module.num_embeddings)
    if isinstance(module, CONV_TYPES):
        if module.groups != 1:
            raise ValueError(f"grouped convolutions (groups={module.groups}) are not supported as weight sites")
        return WeightView("conv", module.out_channels, module.in_channels, tuple(module.kernel_size))
    raise TypeError(
        f"{type(module).__name__} is not a weight site; supported: Linear, transformers Conv1D, "
        "Embedding, Conv1d/2d/3d"
    )
