"""Experiment (session 21): keep the forward's merged weight ``W'`` for the backward.

Where a site merges both ways (``T > K`` and ``T > N``: at 4,096 tokens the attention
projections of a 1B or 3B Llama), main merges twice a step: ``W'`` for the forward, then
``W'ᵀ`` for the input gradient. Keeping the first saves the second merge's launch and its
read of ``W`` and write of ``W'ᵀ`` (2·N·K elements), at the cost of holding ``W'`` from the
forward to the backward (3B: about 1.4 GB). Session 19 measured a branch that did this
together with two other changes at +1.5 % (3B, H200); one of those, factor products with
fp32 outputs, lost on its own in session 21, so this one is measured alone. ``ab.py``
(session 20) switches it on for labels with ``+keep``. Exact: the backward multiplies by the
same rounded ``W'`` the forward used, as the transposed merge reproduces it.
"""

from __future__ import annotations

import sys

import torch.nn.functional as F

L = sys.modules["leantune.engine.lowrank_linear"]
_original_forward, _original_backward = L.LowRankLinear.forward, L.LowRankLinear.backward


def _keeps(forms, factors, needs_input_grad) -> bool:
    """One delta, merged both ways, ``W`` and bias frozen: the case this experiment changes."""
    return tuple(forms) == (True, True) and len(factors) == 2 and not any(needs_input_grad[1:3])


def forward(ctx, x, weight, bias, scales, forms, *factors):
    """Main's forward, but a site merged both ways saves ``W'`` where main saves ``W``."""
    if not _keeps(forms, factors, ctx.needs_input_grad):
        ctx.kept = False
        return _original_forward(ctx, x, weight, bias, scales, forms, *factors)
    a, b, scale = L._operands(factors, scales, x.dtype)
    flat = x.reshape(-1, x.shape[-1])
    merged = L.merged_weight(weight, a, b, scale)
    out = F.linear(flat, merged, bias)
    ctx.kept, ctx.scales, ctx.scale, ctx.x_shape = True, scales, scale, x.shape
    ctx.dtypes = [f.dtype for f in factors]
    ctx.save_for_backward(flat, merged, a, b)
    return out.reshape(*x.shape[:-1], out.shape[-1])


# What the sites this experiment leaves alone run backward, and the function that gives the kept
# sites' factor gradients ((uᵀx, s·gᵀv) in fp32), where another flag (``+fg``) supplies one.
_others: dict = {"backward": _original_backward, "factor_grads": None}


def backward(ctx, grad_out):
    """Main's merged backward with the kept ``W'``: ``grad_x = g W'``."""
    if not ctx.kept:
        return _others["backward"](ctx, grad_out)
    flat, merged, a, b = ctx.saved_tensors
    wants = ctx.needs_input_grad
    g = grad_out.reshape(-1, grad_out.shape[-1])
    ca, csb = L._cast(a, b, ctx.scale, g.dtype)
    g_xa = g @ csb
    grad_x = (g @ merged).reshape(ctx.x_shape) if wants[0] else None
    if _others["factor_grads"] is not None and wants[5] and wants[6]:
        grad_a, grad_b = _others["factor_grads"](g_xa, flat, g, flat @ ca.T, ctx.scales[0])
        return grad_x, None, None, None, None, grad_a.to(ctx.dtypes[0]), grad_b.to(ctx.dtypes[1])
    grad_a = (g_xa.T @ flat).to(ctx.dtypes[0]) if wants[5] else None
    grad_b = ((g.T @ (flat @ ca.T)) * ctx.scales[0]).to(ctx.dtypes[1]) if wants[6] else None
    return grad_x, None, None, None, None, grad_a, grad_b


def switch(on: bool, others_backward=None, factor_grads=None) -> None:
    """Put the experiment's forward and backward in place of main's (``on``) or back; with
    ``on``, the other sites run ``others_backward`` (main's by default) and the kept sites take
    their factor gradients from ``factor_grads`` where given."""
    _others.update(backward=others_backward or _original_backward, factor_grads=factor_grads if on else None)
    L.LowRankLinear.forward = staticmethod(forward if on else _original_forward)
    L.LowRankLinear.backward = staticmethod(backward if on else _original_backward)
