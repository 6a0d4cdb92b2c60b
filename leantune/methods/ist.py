"""IST: importance-aware sparse tuning, a training-step wrapper around any adapter.

Not a method (it changes *which* deltas an optimizer step updates, not what a
delta is), so it is exposed as ``lt.IST`` rather than registered.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..api import adapter_paths
from ..core.families import block_of
from ..core.site import Site


class IST:
    """Importance-aware Sparse Tuning (Yao et al., 2024) for adapter ``name`` of ``model``.

    Each step updates only the deltas of ``update_layers`` transformer blocks, sampled
    without replacement with probabilities ``softmax(z / temperature)`` of the standardised
    importance scores ``z``; the others have ``requires_grad`` off, so the backward pass skips
    them. Every ``probe_every`` steps the scores are refreshed by response suppression: the
    loss with ``probe_layers`` random blocks' deltas switched off minus the loss with them on
    is those blocks' reward, folded in with an exponential moving average (``decay``).
    Deltas outside the blocks (heads, a final norm) train every step.

        ist = lt.IST(model, optimizer, update_layers=4)
        for batch in loader:
            loss = ist.step(batch)
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, name: str = "default",
                 update_layers: int | None = None, probe_every: int = 10, probe_layers: int | None = None,
                 decay: float = 0.9, temperature: float = 1.0, seed: int = 0) -> None:
        self.model, self.optimizer, self.name = model, optimizer, name
        self.sites: dict[str, list[Site]] = {}
        self.params: dict[str, list[nn.Parameter]] = {}
        for path, site, delta in adapter_paths(model, name):
            block = block_of(path)
            if block is not None:
                self.sites.setdefault(block, []).append(site)
                self.params.setdefault(block, []).extend(p for p in delta.parameters() if p.requires_grad)
        self.blocks = list(self.sites)
        n = len(self.blocks)
        if n < 2:
            raise ValueError(f"IST needs adapter {name!r} in at least 2 transformer blocks; it has {n}")
        self.update_layers = update_layers or max(1, n // 2)
        self.probe_layers = probe_layers or self.update_layers
        if not (0 < self.update_layers <= n and 0 < self.probe_layers <= n):
            raise ValueError(f"IST: update_layers and probe_layers must be in 1..{n} (blocks with deltas)")
        if probe_every < 1 or not 0 <= decay < 1 or temperature <= 0:
            raise ValueError("IST: need probe_every >= 1, 0 <= decay < 1 and temperature > 0")
        self.probe_every, self.decay, self.temperature = probe_every, decay, temperature
        self.importance = torch.zeros(n)
        self.generator = torch.Generator().manual_seed(seed)
        self.steps = 0
        self.selected: list[str] = []
        self.resample()

    def probabilities(self) -> torch.Tensor:
        """Sampling probability of each block (uniform while the scores are equal)."""
        z = (self.importance - self.importance.mean()) / (self.importance.std(unbiased=False) + 1e-12)
        return torch.softmax(z / self.temperature, 0)

    def resample(self) -> None:
        """Draw the blocks the next step updates and switch gradients to them alone."""
        picked = torch.multinomial(self.probabilities(), self.update_layers, replacement=False,
                                   generator=self.generator)
        self.selected = [self.blocks[i] for i in picked.tolist()]
        trained = {id(p) for b in self.selected for p in self.params[b]}
        for block in self.blocks:
            for p in self.params[block]:
                p.requires_grad_(id(p) in trained)

    def step(self, batch: dict) -> float:
        """One training step on ``batch`` (a model-input dict with labels); returns the loss."""
        loss = self.model(**batch).loss
        if loss is None:
            raise ValueError("IST.step needs a batch the model computes a loss for (include `labels`)")
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        if self.steps % self.probe_every == 0:
            self.probe(batch)
        self.resample()
        return float(loss.detach())

    @torch.no_grad()
    def probe(self, batch: dict) -> None:
        """Update the importance of a random set of blocks by suppressing their deltas."""
        picked = torch.randperm(len(self.blocks), generator=self.generator)[: self.probe_layers]
        with_deltas = float(self.model(**batch).loss)
        with self.suppressed([self.blocks[i] for i in picked.tolist()]):
            without = float(self.model(**batch).loss)
        self.importance[picked] = self.decay * self.importance[picked] + (1 - self.decay) * (without - with_deltas)

    @contextmanager
    def suppressed(self, blocks: list[str]) -> Iterator[None]:
        """Inside the block, adapter ``name`` is inactive in ``blocks``."""
        sites = [s for b in blocks for s in self.sites[b]]
        saved = [list(s.active) for s in sites]
        for s in sites:
            s.active = [n for n in s.active if n != self.name]
        try:
            yield
        finally:
            for s, active in zip(sites, saved, strict=True):
                s.active = active

    def finish(self) -> None:
        """Make every delta of the adapter trainable again (e.g. before saving a checkpoint to resume)."""
        for block in self.blocks:
            for p in self.params[block]:
                p.requires_grad_(True)
