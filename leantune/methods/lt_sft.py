"""LT-SFT: sparse fine-tuning of the entries that full fine-tuning changed most."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..api import adapt, adapter_paths
from ..config import MethodConfig
from ..core.site import base_module, iter_base_modules
from ..core.sparse import (
    SPARSE_SITE_TYPES,
    SparseDelta,
    check_fraction,
    magnitude_support,
    path_seed,
    random_support,
    support_size,
)
from ..core.targets import name_matches, resolve_targets
from ..core.weights import weight_view
from ..registry import register


@register
@dataclass
class LTSFT(MethodConfig):
    """LT-SFT (Ansell et al., 2022): a sparse ``ΔW`` on the "lottery ticket" of each weight.

    Run it with :class:`LTSFTPhases`: phase 1 trains the targeted weights in full;
    ``sparse_phase()`` keeps the ``density`` most-changed entries of each weight,
    puts the base weights back and attaches this adapter with values at zero
    (phase 2 retrains only those entries from the base). ``lt.adapt`` alone gives
    a random support of the same size (``seed``); a loaded adapter reads its saved
    support. LT-SFT deltas compose by addition: activate several together
    (``lt.set_active``) or merge them one after another.
    """

    density: float = 0.01
    seed: int = 0

    name: ClassVar[str] = "lt_sft"
    mergeable: ClassVar[bool] = True
    site_types: ClassVar[tuple[type, ...]] = SPARSE_SITE_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self.name, "density", self.density)

    def make_delta(self, path: str, module: nn.Module) -> SparseDelta:
        view = weight_view(module)
        numel = view.out_features * view.in_features
        return SparseDelta(view, random_support(numel, support_size(numel, self.density), path_seed(self.seed, path)))


class LTSFTPhases:
    """The two phases of LT-SFT on ``model`` (no adapter of it attached yet).

    Creating it starts phase 1: the targeted weights (and the task's heads) become
    trainable and everything else is frozen; their starting values are kept (one
    copy of the targeted weights). Train the model as usual, then call
    :meth:`sparse_phase`.
    """

    def __init__(self, model: nn.Module, config: LTSFT) -> None:
        names = config.head_modules()
        self.heads = [p for p, _ in iter_base_modules(model) if names and name_matches(p, names)]
        self.paths = resolve_targets(model, config.resolved_targets(model), config.exclude, config.site_types,
                                     skip=set(self.heads), method=config.name)
        self.model, self.config = model, config
        self.flags = {n: p.requires_grad for n, p in model.named_parameters()}
        self.views = [weight_view(base_module(model, p)) for p in self.paths]
        self.trained = [base_module(model, p).weight for p in self.paths]
        self.trained += [t for h in self.heads for t in base_module(model, h).parameters()]
        self.start = [t.detach().clone() for t in self.trained]
        for p in model.parameters():
            p.requires_grad_(False)
        for t in self.trained:
            t.requires_grad_(True)

    def sparse_phase(self, name: str = "default") -> nn.Module:
        """End phase 1: pick each weight's most-changed entries, restore the base, and attach
        adapter ``name`` on those entries with values at zero (phase 2). Returns the model."""
        supports = {}
        with torch.no_grad():
            for path, view, now, start in zip(self.paths, self.views, self.trained, self.start, strict=False):  # heads come after
                change = now - start if view.kind == "linear" else (now - start).T  # logical out x in
                supports[path] = magnitude_support(change, support_size(change.numel(), self.config.density), True)
            for now, start in zip(self.trained, self.start, strict=True):
                now.copy_(start)
        for n, p in self.model.named_parameters():
            p.requires_grad_(self.flags.get(n, p.requires_grad))
        adapt(self.model, self.config, name=name)
        for path, _, delta in adapter_paths(self.model, name):
            if isinstance(delta, SparseDelta):
                delta.indices.copy_(supports[path])
        return self.model
