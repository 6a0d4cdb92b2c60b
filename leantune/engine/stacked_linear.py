"""Sibling Linear sites that read one input, run as one stacked site.

A decoder layer feeds one tensor to several projections: ``q``, ``k`` and ``v``; ``gate`` and
``up``. Run apart, each LoRA site reads that input twice more in its backward (for ``x Aᵀ``
and ``A``'s gradient), each merges its own weight, and autograd adds their input gradients
up afterwards. Stacked, the weights merge into one ``W' = (W₁ + s₁B₁A₁; W₂ + s₂B₂A₂; …)``
(each by the merge kernel, written in place, no copy), the forward is one product, and the
backward reads the input twice in all: ``x (A₁; A₂; …)ᵀ`` and the stacked ``A`` gradient. The
``B`` side runs as one block-diagonal product, whose wasted blocks cost FLOPs on a rank-r
inner dimension, not bytes. The input gradient is one product with the stacked weight
(merged again, transposed) or, where that moves more bytes, the siblings' products added
into one buffer (:func:`stack_forms`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import merge_kernel
from .merge_kernel import merged_weight


class StackedLowRankLinear(torch.autograd.Function):
    """``forward(x, scales, merged_backward, *weights, *As, *Bs)``: ``x (W₁ + s₁B₁A₁; …)ᵀ`` as
    one ``… × ΣN`` tensor, for frozen weights (and no bias) and one low-rank delta per weight.
    Factors keep their own dtype, as in :class:`.lowrank_linear.LowRankLinear`."""

    @staticmethod
    def forward(ctx, x, scales, merged_backward, *tensors):
        weights, a_s, b_s = _split3(tensors)
        flat = x.reshape(-1, x.shape[-1])
        stacked = torch.empty(sum(w.shape[0] for w in weights), x.shape[-1], dtype=x.dtype, device=x.device)
        for at, w, a, b, s in _placed(weights, a_s, b_s, scales):
            merged_weight(w, a, b, s, out=stacked, at=at)
        out = flat @ stacked.T
        ctx.scales, ctx.merged_backward, ctx.x_shape = scales, merged_backward, x.shape
        ctx.save_for_backward(flat, *tensors)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        flat, *tensors = ctx.saved_tensors
        weights, a_s, b_s = _split3(tensors)
        g = grad_out.reshape(-1, grad_out.shape[-1])
        a = torch.cat([t.to(g.dtype) for t in a_s])
        sb = torch.block_diag(*[t.to(g.dtype) * s for t, s in zip(b_s, ctx.scales, strict=True)])
        g_xa = g @ sb  # every sibling's gradient at its x Aᵀ, scales included, in one product
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = g @ _transposed_stack(weights, a_s, b_s, ctx.scales).T if ctx.merged_backward \
                else _summed_input_grad(g, weights, g_xa, a)
            grad_x = grad_x.reshape(ctx.x_shape)
        m = len(weights)
        wants_a, wants_b = ctx.needs_input_grad[3 + m:3 + 2 * m], ctx.needs_input_grad[3 + 2 * m:]
        grad_a = g_xa.T @ flat if any(wants_a) else None
        # block-diagonal: sibling i's B gradient is block (i, i)
        grad_b = g.T @ (flat @ a.T) if any(wants_b) else None
        grads_a, grads_b, row, col = [], [], 0, 0
        for w, ta, tb, s, want_a, want_b in zip(weights, a_s, b_s, ctx.scales, wants_a, wants_b, strict=True):
            rank, n = ta.shape[0], w.shape[0]
            grads_a.append(grad_a[col:col + rank].to(ta.dtype) if want_a else None)
            grads_b.append((grad_b[row:row + n, col:col + rank] * s).to(tb.dtype) if want_b else None)
            row, col = row + n, col + rank
        return grad_x, None, None, *[None] * m, *grads_a, *grads_b


def _split3(tensors: Sequence[torch.Tensor]) -> tuple[Sequence[torch.Tensor], ...]:
    m = len(tensors) // 3
    return tensors[:m], tensors[m:2 * m], tensors[2 * m:]


def _placed(weights, a_s, b_s, scales):
    """``(first row, W, A, B, scale)`` of each sibling in the stacked weight."""
    at = 0
    for w, a, b, s in zip(weights, a_s, b_s, scales, strict=True):
        yield at, w, a, b, s
        at += w.shape[0]


def _transposed_stack(weights, a_s, b_s, scales) -> torch.Tensor:
    """``W'ᵀ`` of the stack (``K × ΣN``), merged column block by column block."""
    w0 = weights[0]
    out = torch.empty(w0.shape[1], sum(w.shape[0] for w in weights), dtype=w0.dtype, device=w0.device)
    for at, w, a, b, s in _placed(weights, a_s, b_s, scales):
        merged_weight(w, a, b, s, transposed=True, out=out, at=at)
    return out


def _summed_input_grad(g: torch.Tensor, weights, g_xa: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``Σ gᵢ Wᵢ + g_xa A``, each product added into one buffer."""
    grad_x, row = None, 0
    for w in weights:
        gi = g[:, row:row + w.shape[0]]
        grad_x = gi @ w if grad_x is None else grad_x.addmm_(gi, w)
        row += w.shape[0]
    return grad_x.addmm_(g_xa, a)


def stack_forms(x: torch.Tensor, weights: Sequence[torch.Tensor], ranks: Sequence[int]) -> bool | None:
    """Whether siblings run stacked, and then whether the backward merges: ``None`` (run them
    apart) unless the merge kernel runs (compiled, on CUDA) and the forward merges (``T > K``
    for ``T`` tokens, as :func:`.lowrank_linear.merge_pays` decides for one site). The
    backward's input gradient either merges the stack again, writing and reading
    ``2·ΣN·K`` elements, or adds the ``m`` siblings' products and the deltas' into one
    buffer, ``2·m·T·K``: the first for ``q, k, v`` (``ΣN`` about twice ``K``), the second
    for ``gate, up`` (``ΣN`` five or more times ``K``)."""
    if not torch.compiler.is_compiling() or not all(merge_kernel.available(w, r) for w, r in zip(weights, ranks, strict=True)):
        return None
    rows, k = x.numel() // x.shape[-1], x.shape[-1]
    if rows <= k:
        return None
    return sum(w.shape[0] for w in weights) < len(weights) * rows


def stacked_linear(x: torch.Tensor, weights: Sequence[torch.Tensor], factors: Sequence[tuple[torch.Tensor, torch.Tensor, float]],
                   merged_backward: bool) -> tuple[torch.Tensor, ...]:
    """Each sibling's ``x Wᵢᵀ + sᵢ (x Aᵢᵀ) Bᵢᵀ`` through :class:`StackedLowRankLinear`, as
    column slices of the one stacked output."""
    a_s, b_s, scales = zip(*factors, strict=True)
    out = StackedLowRankLinear.apply(x, tuple(scales), merged_backward, *weights, *a_s, *b_s)
    return out.split([w.shape[0] for w in weights], dim=-1)
