"""Sibling sites: Linear sites of one parent that the model calls on one input, in turn.

The first sibling called (the leader) computes every sibling's output at once
(:mod:`..engine.stacked_linear`) and holds the others' until they are called. A sibling
takes the held output only when it is called on the very tensor the leader got, so a model
that feeds them different inputs (cross-attention's ``q`` against its ``k, v``) stays
correct; it just computes the others' share twice. The leader runs the stack only where
every sibling would take the engine's fused path and the merge pays
(:func:`..engine.stacked_linear.stack_pays`); otherwise each site runs alone.
"""

from __future__ import annotations

import torch
from torch import nn

from ..engine.lowrank_linear import fusable_factors
from ..engine.stacked_linear import stack_pays, stacked_linear
from .site import Site, iter_sites

# Names of projections that decoder layers call on one input, in the order they call them.
SIBLING_NAMES: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("w1", "w3"),
)


class SiblingStack:
    """The sites that run stacked (leader first), and the outputs held for the others."""

    def __init__(self, sites: tuple[Site, ...]) -> None:
        self.sites = sites
        self.held: list = []  # [input, outputs] from the leader's call until the last sibling's

    def output(self, site: Site, x):
        """``site``'s output from the stack, or ``None`` where ``site`` runs alone."""
        if site is self.sites[0]:
            self.held.clear()
            outputs = self._run(x)
            if outputs is None:
                return None
            self.held.extend((x, outputs))
            return outputs[0]
        if not self.held or self.held[0] is not x:
            return None
        index = self.sites.index(site)
        out = self.held[1][index]
        if index == len(self.sites) - 1:
            self.held.clear()
        return out

    def _run(self, x):
        if not torch.is_grad_enabled():  # no backward to share: each site's plain no-grad path
            return None
        factors, weights = [], []
        for site in self.sites:
            base = site._modules["base"]
            live = site.live_deltas()
            f = fusable_factors(base, live, x)
            if f is None or len(f) != 1 or base.bias is not None or base.weight.requires_grad:
                return None
            factors.append(f[0])
            weights.append(base.weight)
        if not stack_pays(x, weights, [a.shape[0] for a, _, _ in factors]):
            return None
        return stacked_linear(x, weights, factors)


def stack_siblings(model: nn.Module) -> int:
    """Link the sibling sites of ``model`` (:data:`SIBLING_NAMES`: Linear sites of one parent
    with one input width) so that they run stacked; returns how many stacks were linked."""
    count = 0
    for parent in model.modules():
        for names in SIBLING_NAMES:
            sites = tuple(parent._modules.get(n) for n in names)
            if not all(isinstance(s, Site) and type(s.base) is nn.Linear for s in sites):
                continue
            if len({s.base.in_features for s in sites}) != 1:
                continue
            stack = SiblingStack(sites)
            for s in sites:
                s.stack = stack
            count += 1
    return count


def unstack_siblings(model: nn.Module) -> None:
    """Undo :func:`stack_siblings`: every site runs alone again."""
    for _, site in iter_sites(model):
        site.stack = None
