"""Sibling Linear sites that read one input, run as one stacked site.

A decoder layer feeds one tensor to several projections: ``q``, ``k`` and ``v``; ``gate`` and
``up``. Run apart, each LoRA site reads that input twice more in its backward (for ``x Aᵀ``
and ``A``'s gradient) and runs its own thin products. Stacked, the weights merge into one
``W' = (W₁ + s₁B₁A₁; W₂ + s₂B₂A₂; …)`` (each by the merge kernel, written in place, no
copy), the forward is one product, and the backward reads the input twice in all:
``x (A₁; A₂; …)ᵀ`` and the stacked ``A`` gradient. Each sibling keeps its own output and
gradient tensor (views of the one product going forward), so nothing downstream has to
assemble one gradient for the stack: session 23 measured that assembly (rotary embeddings'
backward fused with it) at 5 ms a 3B step on an H100. The input gradient adds the siblings'
products ``gᵢ Wᵢ`` and the deltas' ``(gᵢ sᵢBᵢ) A`` into one buffer, with no merge.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import merge_kernel
from .inplace import addmm_into
from .merge_kernel import merged_weight


class StackedLowRankLinear(torch.autograd.Function):
    """``forward(x, scales, *weights, *As, *Bs)``: each ``x (Wᵢ + sᵢBᵢAᵢ)ᵀ``, as column views
    of one product, for frozen weights (and no bias) and one low-rank delta per weight.
    Factors keep their own dtype, as in :class:`.lowrank_linear.LowRankLinear`."""

    @staticmethod
    def forward(ctx, x, scales, *tensors):
        weights, a_s, b_s = _split3(tensors)
        flat = x.reshape(-1, x.shape[-1])
        stacked = torch.empty(sum(w.shape[0] for w in weights), x.shape[-1], dtype=x.dtype, device=x.device)
        at = 0
        for w, a, b, s in zip(weights, a_s, b_s, scales, strict=True):
            merged_weight(w, a, b, s, out=stacked, at=at)
            at += w.shape[0]
        out = (flat @ stacked.T).reshape(*x.shape[:-1], at)
        ctx.scales, ctx.x_shape = scales, x.shape
        ctx.save_for_backward(flat, *tensors)
        return out.split([w.shape[0] for w in weights], dim=-1)

    @staticmethod
    def backward(ctx, *grads):
        flat, *tensors = ctx.saved_tensors
        weights, a_s, b_s = _split3(tensors)
        gs = [g.reshape(-1, g.shape[-1]) for g in grads]
        dtype = gs[0].dtype
        a = torch.cat([t.to(dtype) for t in a_s])
        # every sibling's gradient at its x Aᵢᵀ, scale included
        g_xa = torch.cat([g @ (b.to(dtype) * s) for g, b, s in zip(gs, b_s, ctx.scales, strict=True)], dim=-1)
        grad_x = None
        if ctx.needs_input_grad[0]:
            for g, w in zip(gs, weights, strict=True):
                grad_x = g @ w if grad_x is None else addmm_into(grad_x, g, w)
            grad_x = addmm_into(grad_x, g_xa, a).reshape(ctx.x_shape)
        m = len(weights)
        wants_a, wants_b = ctx.needs_input_grad[2 + m:2 + 2 * m], ctx.needs_input_grad[2 + 2 * m:]
        grad_a = g_xa.T @ flat if any(wants_a) else None
        xa = flat @ a.T if any(wants_b) else None
        grads_a, grads_b, col = [], [], 0
        for g, ta, tb, s, want_a, want_b in zip(gs, a_s, b_s, ctx.scales, wants_a, wants_b, strict=True):
            rank = ta.shape[0]
            grads_a.append(grad_a[col:col + rank].to(ta.dtype) if want_a else None)
            grads_b.append(((g.T @ xa[:, col:col + rank]) * s).to(tb.dtype) if want_b else None)
            col += rank
        return grad_x, None, *[None] * m, *grads_a, *grads_b


def _split3(tensors: Sequence[torch.Tensor]) -> tuple[Sequence[torch.Tensor], ...]:
    m = len(tensors) // 3
    return tensors[:m], tensors[m:2 * m], tensors[2 * m:]


def stack_pays(x: torch.Tensor, weights: Sequence[torch.Tensor], ranks: Sequence[int]) -> bool:
    """Whether siblings run stacked: only where the merge kernel runs (compiled, on CUDA) and
    the forward merges (``T > K`` for ``T`` tokens, as :func:`.lowrank_linear.merge_pays`
    decides for one site)."""
    if not torch.compiler.is_compiling() or not all(merge_kernel.available(w, r) for w, r in zip(weights, ranks, strict=True)):
        return False
    return x.numel() // x.shape[-1] > x.shape[-1]


def stacked_linear(x: torch.Tensor, weights: Sequence[torch.Tensor],
                   factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]]) -> tuple[torch.Tensor, ...]:
    """Each sibling's ``x Wᵢᵀ + sᵢ (x Aᵢᵀ) Bᵢᵀ`` through :class:`StackedLowRankLinear`."""
    a_s, b_s, scales = zip(*factors, strict=True)
    return StackedLowRankLinear.apply(x, tuple(scales), *weights, *a_s, *b_s)
