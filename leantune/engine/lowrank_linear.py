"""Fused ``x Wᵀ + b + Σ s·(x Aᵀ) Bᵀ`` for Linear weight sites with low-rank deltas.

Autograd of the unfused form keeps one saved tensor per operator and runs a
separate add for every delta; with a frozen ``W`` most of that is waste. This
Function saves only what its backward reads (``x``, only when some factor or ``W``
trains, and ``x Aᵀ`` per delta on the unmerged path), and has two forms:

- merged (CUDA, when :func:`merge_pays`): the base products run on ``W' = W + Σ s·B A``,
  merged by one kernel (``merge_kernel.py``) for the forward and again for the
  backward, never kept. No pass over the activations is added; the factors'
  gradients take four thin products.
- unmerged (CPU, few tokens): each delta is added onto the base product's output in
  place (``addmm_``), and its input gradient onto the base's ``grad_y W`` the same way.

Both are plain PyTorch around the kernel, so they trace under ``torch.compile``.
Measured on an H100 under ``torch.compile``, 1B Llama, 4 × 1024 tokens, one process: merged
66,224 tok/s (1.303× HF PEFT compiled), unmerged 61,046 (1.201×), same peak memory
(docs/bench/device_log_issue6.md, session 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import merge_kernel
from .merge_kernel import merged_weight

Factors = tuple[torch.Tensor, torch.Tensor, float]


class LowRankLinear(torch.autograd.Function):
    """``forward(x, weight, bias, scales, merged, *factors)`` with ``factors = (A₁, B₁, A₂, B₂, …)``.

    Factors may be kept in a higher precision than ``x``; they are cast to
    ``x``'s dtype for the arithmetic and their gradients are returned in their
    own dtype, as the unfused ``LowRank.post`` does. With ``merged``, the base
    products run on ``W' = W + Σ s·B A`` (merged for the call and dropped, not
    kept), which pays when the tokens outnumber the weight (:func:`merge_pays`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, merged, *factors):
        if merged:
            flat = x.reshape(-1, x.shape[-1])
            out = F.linear(flat, merged_weight(weight, *_stacked(factors, scales, x.dtype)), bias)
            out, projected = out.reshape(*x.shape[:-1], out.shape[-1]), []
        else:
            out, flat, projected = _forward(x, weight, bias, scales, factors)
        wants = ctx.needs_input_grad
        keep_x = wants[1] or any(wants[5:]) if merged else wants[1] or any(wants[5::2])
        ctx.scales, ctx.merged = scales, merged
        ctx.x_shape = x.shape
        ctx.save_for_backward(flat if keep_x else None, weight, *factors, *projected)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        flat, weight, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        factors, projected = rest[: 2 * n], rest[2 * n:]
        wants = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        if wants[0]:
            grad_x = (g @ merged_weight(weight, *_stacked(factors, ctx.scales, g.dtype), transposed=True).T
                      if ctx.merged else g @ weight)
        grads: list[torch.Tensor | None] = []
        for i, s in enumerate(ctx.scales):
            a_param, b_param = factors[2 * i], factors[2 * i + 1]
            a, b = a_param.to(g.dtype), b_param.to(g.dtype)
            g_xa = (g @ b).mul_(s)
            if grad_x is not None and not ctx.merged:
                grad_x.addmm_(g_xa, a)
            grad_a = (g_xa.T @ flat).to(a_param.dtype) if wants[5 + 2 * i] else None
            grad_b = None
            if wants[6 + 2 * i]:
                xa = flat @ a.T if ctx.merged else projected[i]
                grad_b = (g.T @ xa).mul_(s).to(b_param.dtype)
            grads += [grad_a, grad_b]
        grad_w = g.T @ flat if wants[1] else None
        grad_bias = g.sum(0) if wants[2] else None
        if grad_x is not None:
            grad_x = grad_x.reshape(ctx.x_shape)
        return (grad_x, grad_w, grad_bias, None, None, *grads)


def _stacked(factors: Sequence[torch.Tensor], scales: Sequence[float],
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(A₁; A₂; …) and (s₁B₁ | s₂B₂ | …) in ``dtype``: every delta as one rank-Σr product.
    One delta, the common case, needs no concatenation: two kernels and copies fewer per merge."""
    if len(scales) == 1:
        return factors[0].to(dtype), factors[1].to(dtype) * scales[0]
    a = torch.cat([factors[2 * i].to(dtype) for i in range(len(scales))])
    b = torch.cat([factors[2 * i + 1].to(dtype) * s for i, s in enumerate(scales)], dim=1)
    return a, b


def merge_pays(x: torch.Tensor, weight: torch.Tensor, rank: int) -> bool:
    """Whether merging the deltas into the weight moves fewer bytes than adding them to the
    activations (deltas of total rank ``rank``), on CUDA where the merge is one kernel. Merged: ``W`` read and ``W'`` written,
    forward and backward (4·N·K elements). Unmerged: the output and the input gradient read
    and written once more (2·T·(N + K)), and under torch.compile copied once as well (the
    compiled in-place GEMM writes a copy of its input)."""
    rows = x.numel() // x.shape[-1]
    n, k = weight.shape
    passes = 4 if torch.compiler.is_compiling() else 2
    return merge_kernel.available(weight, rank) and passes * rows * (n + k) > 4 * n * k


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scales: Sequence[float],
             factors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(output, flattened input, ``x Aᵀ`` per delta): the arithmetic of the forward pass."""
    flat = x.reshape(-1, x.shape[-1])
    out = F.linear(flat, weight, bias)
    projected = []
    for i, s in enumerate(scales):
        xa = flat @ factors[2 * i].to(x.dtype).T
        out.addmm_(xa, factors[2 * i + 1].to(x.dtype).T, alpha=s)
        projected.append(xa)
    return out.reshape(*x.shape[:-1], out.shape[-1]), flat, projected


def lowrank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   factors: Sequence[Factors], merged: bool | None = None) -> torch.Tensor:
    """``x Wᵀ + b + Σ scale · (x Aᵀ) Bᵀ`` through :class:`LowRankLinear`; with grad mode off
    (inference, MeZO's forward-only steps) as plain operations, since there is no backward
    to save for, and torch.compile breaks the graph at the Function there. ``merged``
    chooses the merged-weight form; by default :func:`merge_pays` does."""
    flat = [t for a, b, _ in factors for t in (a, b)]
    scales = tuple(s for _, _, s in factors)
    if not torch.is_grad_enabled():
        return _forward(x, weight, bias, scales, flat)[0]
    if merged is None:
        merged = merge_pays(x, weight, sum(a.shape[0] for a, _, _ in factors))
    return LowRankLinear.apply(x, weight, bias, scales, merged, *flat)


def fused_forward(base: nn.Module, deltas: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    """The site's output through the fused path, or ``None`` when it does not apply.

    It applies when the base is a plain ``nn.Linear`` in ``x``'s dtype, autocast
    is off, and every delta offers ``fused_factors()`` (a low-rank delta with
    no active dropout); otherwise the caller runs the unfused path.
    """
    if type(base) is not nn.Linear or x.dtype != base.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    factors = []
    for d in deltas:
        get = getattr(d, "fused_factors", None)
        f = get() if get is not None else None
        if f is None:
            return None
        factors.append(f)
    return lowrank_linear(x, base.weight, base.bias, factors)
