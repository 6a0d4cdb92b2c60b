"""Causal-LM cross-entropy that never holds the whole sequence's logits.

With a 128k vocabulary the logits of 4 × 1024 tokens are 0.5 G values: 1 GiB in
bf16 and 2 GiB more once upcast to fp32 for the loss, and as much again for
their gradient. Here the output projection, the loss and its gradient run one
block of rows at a time, so only a block's logits ever exist. The gradient is
computed in the forward pass while the block's logits are at hand and kept
(one hidden-sized tensor), which spares the backward pass a second product with
the vocabulary-sized weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import ce_kernel
from .causal_mask import DEFAULT_POSITIONS

IGNORE_INDEX = -100
# Logit values per block (2^26: 0.25 GiB in fp32); rows per block = this // vocabulary size.
BLOCK_ELEMENTS = 1 << 26
# Config attributes of families whose logits are not plain ``hidden @ Wᵀ``.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``hidden @ weightᵀ`` against ``targets``, block by block.

    ``forward(hidden (N, H), weight (V, H), targets (N,), rows, with_grad)``.
    Logits are computed in ``hidden``'s dtype and upcast to fp32 for the
    softmax, as transformers' loss does (on CUDA in one Triton kernel per block:
    engine/ce_kernel.py). Targets equal to ``IGNORE_INDEX`` do not count.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows, with_grad):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for fp64 inputs
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1).to(acc)
        safe = targets.masked_fill(~valid, 0)
        need_h, need_w = with_grad and ctx.needs_input_grad[0], with_grad and ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        total = hidden.new_zeros((), dtype=acc)
        for start in range(0, hidden.shape[0], rows):
            h, t, v = hidden[start:start + rows], safe[start:start + rows], valid[start:start + rows]
            losses, g = ce_kernel.cross_entropy_rows(h @ weight.T, t, v / count if need_h or need_w else None)
            total = total + (losses * v).sum()
            if need_h:
                grad_h[start:start + rows] = g @ weight
            if need_w:
                grad_w += g.T @ h
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype) if need_w else None)
        return total / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return (
            grad_h * grad_loss if grad_h is not None else None,
            grad_w * grad_loss if grad_w is not None else None,
            None, None, None,
        )


def chunked_causal_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, labels: torch.Tensor,
                           chunk: int | None = None) -> torch.Tensor:
    """transformers' causal-LM loss (position t predicts ``labels[t + 1]``, mean over
    tokens whose label is not -100) of ``hidden @ lm_head_weightᵀ``, in blocks of
    ``chunk`` rows (default: as many as keep a block near 2^26 logits)."""
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match hidden states {tuple(hidden.shape[:-1])}")
    targets = F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX).reshape(-1)
    rows = chunk or max(1, BLOCK_ELEMENTS // lm_head_weight.shape[0])
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_head_weight.requires_grad)
    flat = hidden.reshape(-1, hidden.shape[-1])
    return LinearCrossEntropy.apply(flat, lm_head_weight, targets, rows, with_grad)


def _plain_head(model: nn.Module) -> nn.Linear | None:
    head = model.get_output_embeddings()
    config = getattr(model, "config", None)
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return head


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, labels: torch.Tensor,
                   chunk: int | None = None, **inputs) -> torch.Tensor:
    """The loss ``model(input_ids, labels=labels).loss`` would give, without full logits.

    Runs the transformers model's decoder, then :func:`chunked_causal_lm_loss`
    with its output head. Falls back to the model's own loss where the head is
    not a plain bias-free Linear (an adapted head, a bias) or the family
    transforms its logits (soft-capping, scaling).
    """
    head = _plain_head(model)
    if head is None:
        return model(input_ids=input_ids, labels=labels, **inputs).loss
    inputs.setdefault("use_cache", False)  # a training step needs no cache (and lean mode forbids writing one)
    own_positions = inputs.get("position_ids") is None
    DEFAULT_POSITIONS.on = own_positions  # lets lt.compile skip the mask (engine/causal_mask.py)
    try:
        hidden = model.get_decoder()(input_ids=input_ids, **inputs)[0]
    finally:
        DEFAULT_POSITIONS.on = False
    return chunked_causal_lm_loss(hidden, head.weight, labels, chunk)
