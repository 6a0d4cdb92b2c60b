"""Fused ``x Wᵀ + b + Σ s·(x Aᵀ) Bᵀ`` for Linear weight sites with low-rank deltas.

Autograd of the unfused form keeps one saved tensor per operator and runs a
separate add for every delta; with a frozen ``W`` most of that is waste. This
Function saves only what its backward reads (``x``, only when some factor or ``W``
trains, and ``x Aᵀ`` where the forward computed it), and has two forms, chosen for the
forward and the backward apart (:func:`merge_pays`):

- merged (compiled on CUDA, enough tokens): the base product runs on ``W' = W + Σ s·B A``
  (forward) or its transpose (backward), merged by one kernel (``merge_kernel.py``) that
  reads the factors in their own dtype, and never kept. No pass over the activations is
  added.
- unmerged (CPU, eager, few tokens, the wide side of a weight): the deltas are added onto
  the base product's output in place (:func:`.inplace.addmm_into`, which stays in place
  when compiled), and their input gradient onto the base's ``grad_y W`` the same way.

The factors' gradients take four thin products either way. Both forms are plain PyTorch
around the kernel, so they trace under ``torch.compile``.
Measured on an H100 under ``torch.compile``, 1B Llama, 4 × 1024 tokens, one process: merged
both ways 66,224 tok/s (1.303× HF PEFT compiled), unmerged 61,046 (1.201×), same peak memory
(docs/bench/device_log_issue6.md, session 5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import merge_kernel
from .inplace import addmm_into
from .merge_kernel import merged_weight

Factors = tuple[torch.Tensor, torch.Tensor, float]
Forms = tuple[bool, bool]  # (merge in the forward, merge in the backward)


class LowRankLinear(torch.autograd.Function):
    """``forward(x, weight, bias, scales, forms, *factors)`` with ``factors = (A₁, B₁, A₂, B₂, …)``.

    Factors may be kept in a higher precision than ``x``; they are cast to
    ``x``'s dtype for the arithmetic and their gradients are returned in their
    own dtype, as the unfused ``LowRank.post`` does. All deltas run as one of rank
    ``Σ r`` (:func:`_operands`), so a site's factors take the same thin products however
    many adapters are active. ``forms`` says, for the forward and for the backward, whether
    the base product runs on ``W' = W + Σ s·B A`` (merged for the call and dropped, not
    kept), which pays when it moves fewer bytes than the unmerged form (:func:`merge_pays`).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scales, forms, *factors):
        a, b, scale = _operands(factors, scales, x.dtype)
        flat = x.reshape(-1, x.shape[-1])
        if forms[0]:
            out, xa = F.linear(flat, merged_weight(weight, a, b, scale), bias), None
        else:
            out, xa = _on_activations(flat, weight, bias, *_cast(a, b, scale, x.dtype))
        wants = ctx.needs_input_grad
        wants_a, wants_b = any(wants[5::2]), any(wants[6::2])
        ctx.scales, ctx.scale, ctx.merged_backward, ctx.x_shape = scales, scale, forms[1], x.shape
        ctx.ranks, ctx.dtypes = [f.shape[0] for f in factors[::2]], [f.dtype for f in factors]
        keep_x = wants[1] or wants_a or (xa is None and wants_b)
        ctx.save_for_backward(flat if keep_x else None, weight, a, b, xa if wants_b else None)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, weight, a, b, xa = ctx.saved_tensors
        wants = ctx.needs_input_grad
        g = grad_out.reshape(-1, grad_out.shape[-1])
        wants_a = any(wants[5::2])
        ca, csb = _cast(a, b, ctx.scale, g.dtype)
        # the deltas' share of the gradient at x Aᵀ, scales included
        g_xa = g @ csb if wants_a or (wants[0] and not ctx.merged_backward) else None
        grad_x = None
        if wants[0]:
            if ctx.merged_backward:
                grad_x = g @ merged_weight(weight, a, b, ctx.scale, transposed=True).T
            else:
                grad_x = addmm_into(g @ weight, g_xa, ca)
            grad_x = grad_x.reshape(ctx.x_shape)
        grad_a = g_xa.T @ flat if wants_a else None
        grad_b = None
        if any(wants[6::2]):
            grad_b = g.T @ (flat @ ca.T if xa is None else xa)
        grads: list[torch.Tensor | None] = []
        row = 0
        for i, (s, rank) in enumerate(zip(ctx.scales, ctx.ranks, strict=True)):
            ga = grad_a[row:row + rank] if wants[5 + 2 * i] else None
            gb = grad_b[:, row:row + rank] * s if wants[6 + 2 * i] else None
            grads += [None if ga is None else ga.to(ctx.dtypes[2 * i]), None if gb is None else gb.to(ctx.dtypes[2 * i + 1])]
            row += rank
        grad_w = g.T @ flat if wants[1] else None
        grad_bias = g.sum(0) if wants[2] else None
        return (grad_x, grad_w, grad_bias, None, None, *grads)


def _operands(factors: Sequence[torch.Tensor], scales: Sequence[float],
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(a, b, scale)`` with every delta as one of rank ``Σ r``: ``Σ sᵢ·Bᵢ Aᵢ = scale · b a``.
    One delta, the common case, stays as it is, in its own dtype: the merge kernel casts it as
    it reads it, so the merged forms run no cast kernel and no concatenation. Several are
    stacked in ``dtype``, ``(A₁; A₂; …)`` and ``(s₁B₁ | s₂B₂ | …)``, with scale 1."""
    if len(scales) == 1:
        return factors[0], factors[1], scales[0]
    a = torch.cat([factors[2 * i].to(dtype) for i in range(len(scales))])
    b = torch.cat([factors[2 * i + 1].to(dtype) * s for i, s in enumerate(scales)], dim=1)
    return a, b, 1.0


def _cast(a: torch.Tensor, b: torch.Tensor, scale: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``(a, scale · b)`` in ``dtype``, for the unmerged form's products."""
    b = b.to(dtype)
    return a.to(dtype), (b * scale if scale != 1.0 else b)


def merge_pays(x: torch.Tensor, weight: torch.Tensor, rank: int) -> Forms:
    """Whether to merge the deltas (of total rank ``rank``) into the weight, in the forward
    and in the backward: under torch.compile on CUDA, where the merge is one kernel, where
    that moves fewer bytes than adding them to the activations. For ``T`` tokens and an
    ``N × K`` weight, a merge reads ``W`` and writes ``W'``: 2·N·K elements. Unmerged, the
    forward reads and writes the output once more, 2·T·N (the ``x Aᵀ`` it computes is kept
    for ``B``'s gradient, which would otherwise compute it), and the backward the input
    gradient, 2·T·K. So the forward merges when ``T > K`` and the backward when ``T > N``:
    at 4 × 1024 tokens of a 1B Llama the MLP's wide sides stay unmerged (the down
    projection's forward, the gate and up projections' backward). Eager runs stay unmerged:
    launched from Python, the Triton kernel left the GPU waiting on the host for most of the
    step (H100, 1B Llama, 4 × 1024 tokens, one process: 22,723 tok/s merged against 39,352
    unmerged; device log, session 10)."""
    if not (torch.compiler.is_compiling() and merge_kernel.available(weight, rank)):
        return False, False
    rows = x.numel() // x.shape[-1]
    n, k = weight.shape
    return rows > k, rows > n


def _on_activations(flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                    sb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(``flat Wᵀ + b + (flat Aᵀ) (sB)ᵀ``, ``flat Aᵀ``): the deltas added onto the base
    product's output in place, for factors in ``flat``'s dtype (:func:`_cast`)."""
    xa = flat @ a.T
    return addmm_into(F.linear(flat, weight, bias), xa, sb.T), xa


def lowrank_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   factors: Sequence[Factors], merged: bool | Forms | None = None) -> torch.Tensor:
    """``x Wᵀ + b + Σ scale · (x Aᵀ) Bᵀ`` through :class:`LowRankLinear`; with grad mode off
    (inference, MeZO's forward-only steps) as plain operations, since there is no backward
    to save for, and torch.compile breaks the graph at the Function there. ``merged``
    chooses the merged-weight form, both ways (a bool) or for the forward and the backward
    apart (a pair); by default :func:`merge_pays` does."""
    flat = [t for a, b, _ in factors for t in (a, b)]
    scales = tuple(s for _, _, s in factors)
    if not torch.is_grad_enabled():
        out, _ = _on_activations(x.reshape(-1, x.shape[-1]), weight, bias,
                                 *_cast(*_operands(flat, scales, x.dtype), x.dtype))
        return out.reshape(*x.shape[:-1], out.shape[-1])
    if merged is None:
        merged = merge_pays(x, weight, sum(a.shape[0] for a, _, _ in factors))
    forms = (merged, merged) if isinstance(merged, bool) else tuple(merged)
    return LowRankLinear.apply(x, weight, bias, scales, forms, *flat)


def fused_forward(base: nn.Module, deltas: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor | None:
    """The site's output through the fused path, or ``None`` when it does not apply.

    It applies when the base is a plain ``nn.Linear`` in ``x``'s dtype, autocast
    is off, and every delta offers ``fused_factors()`` (a low-rank delta with
    no active dropout); otherwise the caller runs the unfused path.
    """
    factors = fusable_factors(base, deltas, x)
    return None if factors is None else lowrank_linear(x, base.weight, base.bias, factors)


def fusable_factors(base: nn.Module, deltas: Sequence[nn.Module], x: torch.Tensor) -> list[Factors] | None:
    """Every delta's ``(A, B, scale)`` where the fused path applies to ``base`` on ``x``
    (:func:`fused_forward`), else ``None``."""
    if type(base) is not nn.Linear or x.dtype != base.weight.dtype or torch.is_autocast_enabled(x.device.type):
        return None
    factors = []
    for d in deltas:
        f = d.fused_factors()
        if f is None:
            return None
        factors.append(f)
    return factors
