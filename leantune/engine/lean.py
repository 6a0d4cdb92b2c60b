"""Lean mode: keep almost no activations per layer, recompute the rest in backward.

Full gradient checkpointing keeps each layer's input and re-runs the whole
layer in backward. Lean mode checkpoints each decoder layer so that under
``torch.compile`` only what backward reads is recomputed. By default it keeps
only each layer's input and re-runs attention in backward too: lean mode is for
when memory is what runs out. ``keep_attention=True`` also keeps the attention
kernel's outputs, one hidden-sized tensor more per layer, to skip that re-run
(the part whose cost grows with the square of the sequence): on an H100, 4 × 1024
tokens, the re-run cost about 3 % of the step and saved 0.17 GiB at 1B, 0.53 GiB
at 3B (docs/bench/device_log_issue6.md, session 8). Gradients are unchanged: it is
the same function.

``layers=n`` checkpoints only the first ``n`` decoder layers (selective checkpointing):
the others keep what default training keeps and skip the re-run, so memory left over
buys speed, one layer at a time. The first layers are the ones checkpointed because
the last layers' backward runs first and frees their activations before any re-run.
On an H100, 1B Llama, 4 × 1024 tokens, one process: lean on 10 of 16 layers ran at 1.53×
HF PEFT with gradient checkpointing at 0.72× its memory; lean on all, 1.33× at 0.58×
(docs/bench/device_log_issue6.md, session 9).

Keeping the non-widening products too (q, k, v, o) would re-run a sixth less,
but the fused path's unmerged form updates those outputs in place, and a kept
tensor must not change after it is kept.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

_ATTENTION_OPS = {
    getattr(torch.ops.aten, name).default
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu")
    if hasattr(torch.ops.aten, name)
}

_CACHE_ARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


def keep_attention_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Keep the attention kernel's outputs; recompute everything else."""
    return CheckpointPolicy.MUST_SAVE if op in _ATTENTION_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def recompute_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """Recompute whatever backward reads."""
    return CheckpointPolicy.PREFER_RECOMPUTE


def _let_compile_skip_replayed_side_effects() -> None:
    """Let ``torch.compile`` trace a checkpointed layer whose forward changes Python state.

    transformers 5.25 requires ``kernels`` (optional before), whose ``use_kernelized_func``
    makes every attention forward set and reset a context variable; dynamo refuses such a
    write inside ``checkpoint`` unless told not to replay it in backward, which a write the
    forward undoes itself never needs. The setting is process-wide: dynamo reads it while
    it traces the caller's compiled function, which no code of ours wraps.
    """
    config = torch._dynamo.config
    if hasattr(config, "skip_fwd_side_effects_in_bwd_under_checkpoint"):
        config.skip_fwd_side_effects_in_bwd_under_checkpoint = True


def _checkpointed(forward: Callable, keep_attention: bool) -> Callable:
    _let_compile_skip_replayed_side_effects()
    context = partial(create_selective_checkpoint_contexts,
                      keep_attention_policy if keep_attention else recompute_policy)

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        # The recompute would write a key/value cache a second time: train without one.
        kwargs.update({k: None for k in _CACHE_ARGS if kwargs.get(k) is not None})
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        return checkpoint(forward, *args, use_reentrant=False, context_fn=context, **kwargs)

    run.leantune_lean = True
    run.leantune_keeps_attention = keep_attention
    return run


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers model (its ``_no_split_modules`` classes)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [m for m in model.modules() if type(m).__name__ in names]


def configure(model: nn.Module, *, lean: bool, keep_attention: bool = False, layers: int | None = None) -> nn.Module:
    """Switch lean mode on (``lean=True``) or back to the default (keep every
    activation: the fastest step); ``keep_attention=True`` keeps attention's outputs in
    lean mode, trading memory for a step a few per cent faster; ``layers=n`` makes only the
    first ``n`` decoder layers lean (see the module's docstring). Returns ``model``."""
    found = decoder_layers(model)
    if lean and not found:
        raise ValueError("lean mode needs a transformers model whose decoder layers it can find "
                         "(its _no_split_modules); found none")
    if layers is not None and not (lean and 1 <= layers <= len(found)):
        raise ValueError(f"layers={layers!r}: lean mode checkpoints between 1 and all {len(found)} decoder layers "
                         "of this model; pass lean=True with such a count, or layers=None for all")
    lean_count = len(found) if layers is None else layers
    for index, layer in enumerate(found):
        make_lean = lean and index < lean_count
        wrapped = layer.__dict__.get("forward")
        if getattr(wrapped, "leantune_lean", False):
            if make_lean and wrapped.leantune_keeps_attention == keep_attention:
                continue
            del layer.forward
        if make_lean:
            layer.forward = _checkpointed(layer.forward, keep_attention)
    return model
