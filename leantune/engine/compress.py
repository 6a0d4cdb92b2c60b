"""Activation compression (Mesa, Pan et al. 2021; S2A): keep a Linear's saved input in int8 or int4.

A Linear whose weight trains must keep its input for the weight gradient
``grad_Wᵀ = xᵀ g``; that kept input is often the largest tensor a method holds
(LST's ladders read full-width hidden states). Here the forward pass is exact
and only the kept copy is quantized: per input channel (LLM hidden states have
outlier channels, so one scale per channel loses far less than one per token),
symmetric, to int8 or to int4 packed two per byte. The input gradient
``g W`` needs no kept input and stays exact; the weight gradient sees the
de-quantized input (relative error ~ 1/254 of a channel's range at 8 bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = (8, 4)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)`` of a 2-D ``x`` (rows × channels): int8 codes, or int4 pairs packed in uint8."""
    if bits not in BITS:
        raise ValueError(f"activation compression supports {BITS} bits, not {bits!r}")
    top = 2 ** (bits - 1) - 1
    scales = x.abs().amax(0).float().clamp(min=1e-12) / top
    codes = torch.round(x.float() / scales).clamp_(-top, top).to(torch.int8)
    if bits == 4:
        if codes.shape[-1] % 2:
            codes = F.pad(codes, (0, 1))
        nibbles = (codes + 8).to(torch.uint8)  # -7..7 -> 1..15
        codes = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
    return codes, scales


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The inverse of :func:`quantize`, in ``dtype``."""
    if bits == 4:
        pairs = torch.stack([codes & 15, codes >> 4], -1).flatten(-2)[:, : scales.shape[0]]
        values = pairs.to(torch.int8) - 8
    else:
        values = codes
    return (values.float() * scales).to(dtype)


class CompressedLinear(torch.autograd.Function):
    """``x Wᵀ + b`` that keeps ``x`` quantized for the weight gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, weight, bias, bits):
        flat = x.reshape(-1, x.shape[-1])
        wants_w = ctx.needs_input_grad[1]
        codes, scales = quantize(flat.detach(), bits) if wants_w else (None, None)
        ctx.bits, ctx.x_shape, ctx.x_dtype = bits, x.shape, x.dtype
        ctx.save_for_backward(codes, scales, weight if ctx.needs_input_grad[0] else None)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        codes, scales, weight = ctx.saved_tensors
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = (g @ weight.to(g.dtype)).reshape(ctx.x_shape) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = g.T @ dequantize(codes, scales, ctx.bits, g.dtype)
        grad_b = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


def compressed_linear(x: torch.Tensor, layer: nn.Linear, bits: int | None) -> torch.Tensor:
    """``layer(x)``, keeping ``x`` in ``bits`` (8 or 4) for backward; ``bits=None``: plain ``layer(x)``."""
    if bits is None or not torch.is_grad_enabled():
        return layer(x)
    return CompressedLinear.apply(x, layer.weight, layer.bias, bits)
