"""lt.compile's cheap guards: a site whose attributes have not changed is skipped with the module
that holds it (one dictionary check for the whole subtree), and every change the API makes to a
site still reaches the compiled function."""

from __future__ import annotations

import torch
from torch import nn

import leantune as lt
from leantune.core.site import Site, iter_sites

from .models import batch, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]


def _guard_nodes(fn) -> list:
    """Every node of the guard trees of ``fn``'s compiled frames."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    nodes, stack = [], [entry.guard_manager.root for entry in _debug_get_cache_entry_list(fn.__code__)]
    while stack:
        node = stack.pop()
        nodes.append(node)
        stack.extend(m for m in node.get_child_managers() if m is not None)
        if hasattr(node, "get_key_value_managers"):  # a dictionary's node holds its items apart
            stack.extend(m for pair in node.get_key_value_managers().values() for m in pair if m is not None)
    return nodes


def _model() -> nn.Module:
    model = tiny_llama()
    lt.adapt(model, lt.LoRA(r=4, alpha=8, targets=TARGETS, init="random"), name="a")
    lt.adapt(model, lt.LoRA(r=2, alpha=2, targets=TARGETS, init="random"), name="b")
    return model.eval()


def test_sites_are_checked_by_their_dictionaries_only_under_lt_compile():
    model = _model()
    ids = batch("llama")["input_ids"]

    def logits(input_ids):
        return model(input_ids=input_ids).logits

    for compiled, tag_safe in ((lt.compile(logits), True), (torch.compile(logits), False)):
        torch._dynamo.reset()
        compiled(ids)
        sites = [n for n in _guard_nodes(logits) if n.get_type_of_guarded_value() is Site]
        assert len(sites) == len(list(iter_sites(model))), "every site is guarded"
        # tag safe: under a node (the site, or a module above it) checked by its dictionaries alone
        assert [n.is_tag_safe() for n in sites] == [tag_safe] * len(sites)
        assert any(n.is_tag_safe_root() for n in sites) == tag_safe


def test_compiled_function_follows_every_change_to_the_adapters():
    torch.manual_seed(0)
    model = _model()
    ids = batch("llama")["input_ids"]

    def logits(input_ids):
        return model(input_ids=input_ids).logits

    compiled = lt.compile(logits)

    def agrees() -> bool:
        with torch.no_grad():
            return torch.allclose(compiled(ids), logits(ids), atol=1e-5)

    with lt.disabled(model), torch.no_grad():
        base = logits(ids)
    outputs = []
    steps = [
        lambda: lt.set_active(model, "a"),
        lambda: lt.set_active(model, ["a", "b"]),
        lambda: lt.merge(model, ["a"]),
        lambda: lt.unmerge(model),
        lambda: setattr(model.model.layers[0].self_attn.q_proj.deltas["b"], "scale", 3.0),
        lambda: lt.delete_adapter(model, "a"),
    ]
    assert agrees()
    for step in steps:
        step()
        assert agrees(), step
        outputs.append(compiled(ids).detach())
    with lt.disabled(model):
        assert torch.allclose(compiled(ids), base, atol=1e-5)
    assert agrees()
    assert all(not torch.allclose(o, base, atol=1e-4) for o in outputs), "each step changed the output"
