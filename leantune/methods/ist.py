"""IST: importance-aware sparse tuning, a wrapper that works with any method.

``lt.IST(wraps=lt.LoRA(r=8))`` attaches the wrapped method's deltas unchanged;
what IST adds is its schedule (which blocks each step updates), which every
training loop runs through ``MethodConfig.schedule``.

Length: the config (~70 lines) and its schedule (~110): the shared schedule interface
(core/schedule.py) carries the loop side; what is left is IST's own sampling and probing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..api import adapter_paths
from ..config import MethodConfig
from ..core.families import block_of
from ..core.schedule import Schedule
from ..core.site import Site
from ..registry import config_from_dict, get_method, register

COMMON = ("targets", "exclude", "modules_to_save", "task")


@register
@dataclass
class IST(MethodConfig):
    """Importance-aware Sparse Tuning (Yao et al., 2024) around ``wraps`` (a config, its dict, or a name).

    Each step updates only the deltas of ``update_layers`` transformer blocks (default: half),
    sampled without replacement with probabilities ``softmax(z / temperature)`` of the
    standardised importance scores ``z``; the others get no gradient, so backward skips them.
    Every ``probe_every`` steps the scores are refreshed by response suppression: the loss with
    ``probe_layers`` random blocks' deltas switched off minus the loss with them on is those
    blocks' reward, folded in with an exponential moving average (``decay``). Deltas outside
    the blocks (heads, a final norm) train every step. ``targets``, ``exclude``,
    ``modules_to_save`` and ``task`` given here override the wrapped method's.
    """

    wraps: Any = "lora"
    update_layers: int | None = None
    probe_every: int = 10
    probe_layers: int | None = None
    decay: float = 0.9
    temperature: float = 1.0
    seed: int = 0
    inner: MethodConfig = field(init=False, repr=False, compare=False)

    name: ClassVar[str] = "ist"
    fused_linear: ClassVar[bool] = True  # with its default wrapped LoRA; otherwise as the wrapped method

    def __post_init__(self) -> None:
        super().__post_init__()
        inner = self.wraps
        if isinstance(inner, str):
            inner = get_method(inner)()
        elif isinstance(inner, dict):
            inner = config_from_dict(inner)
        if not isinstance(inner, MethodConfig) or isinstance(inner, IST):
            raise ValueError(f"ist: wraps must be another method (a config, its dict or a name), got {self.wraps!r}")
        self.inner = dataclasses.replace(inner, **{k: getattr(self, k) for k in COMMON if getattr(self, k) is not None})
        self.wraps = self.inner.to_dict()
        if self.probe_every < 1 or not 0 <= self.decay < 1 or self.temperature <= 0:
            raise ValueError("ist: need probe_every >= 1, 0 <= decay < 1 and temperature > 0")

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return self.inner.mergeable

    def components(self) -> list[MethodConfig]:
        return self.inner.components()

    def head_modules(self) -> list[str]:
        return self.inner.head_modules()

    def folded(self) -> MethodConfig | None:
        inner = self.inner.folded()
        return None if inner is None else dataclasses.replace(self, wraps=inner.to_dict())

    def schedule(self, model: nn.Module, name: str, total_steps: int | None) -> ISTSchedule:
        return ISTSchedule(model, name, self, self.inner.schedule(model, name, total_steps))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.pop("inner")
        return out


class ISTSchedule(Schedule):
    """IST's layer sampling and importance probing for adapter ``name`` (see :class:`IST`)."""

    distributed_ok = False  # the trained set changes every step; DDP needs a fixed one

    def __init__(self, model: nn.Module, name: str, config: IST, inner: Schedule | None = None) -> None:
        self.name, self.inner = name, inner
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
            raise ValueError(f"ist needs adapter {name!r} in at least 2 transformer blocks; it has {n}")
        self.update_layers = config.update_layers or max(1, n // 2)
        self.probe_layers = config.probe_layers or self.update_layers
        if not (0 < self.update_layers <= n and 0 < self.probe_layers <= n):
            raise ValueError(f"ist: update_layers and probe_layers must be in 1..{n} (blocks with deltas)")
        self.config = config
        self.importance = torch.zeros(n)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.selected: list[str] = []
        self.resample()

    def probabilities(self) -> torch.Tensor:
        """Sampling probability of each block (uniform while the scores are equal)."""
        z = (self.importance - self.importance.mean()) / (self.importance.std(unbiased=False) + 1e-12)
        return torch.softmax(z / self.config.temperature, 0)

    def resample(self) -> None:
        """Draw the blocks the next step updates and switch gradients to them alone."""
        picked = torch.multinomial(self.probabilities(), self.update_layers, replacement=False,
                                   generator=self.generator)
        self.selected = [self.blocks[i] for i in picked.tolist()]
        self._train({id(p) for b in self.selected for p in self.params[b]})

    def _train(self, trained: set[int] | None) -> None:
        for block in self.blocks:
            for p in self.params[block]:
                p.requires_grad_(trained is None or id(p) in trained)

    def loss_term(self, loss: torch.Tensor) -> torch.Tensor | float:
        return self.inner.loss_term(loss) if self.inner else 0.0

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, loss_of: Callable[[], float]) -> None:
        if self.inner:
            self.inner.after_step(step, optimizer, loss_of)
        if step % self.config.probe_every == 0:
            self.probe(loss_of)
        self.resample()

    @torch.no_grad()
    def probe(self, loss_of: Callable[[], float]) -> None:
        """Update the importance of a random set of blocks by suppressing their deltas."""
        picked = torch.randperm(len(self.blocks), generator=self.generator)[: self.probe_layers]
        with_deltas = loss_of()
        with self.suppressed([self.blocks[i] for i in picked.tolist()]):
            without = loss_of()
        decay = self.config.decay
        self.importance[picked] = decay * self.importance[picked] + (1 - decay) * (without - with_deltas)

    @contextmanager
    def suppressed(self, blocks: list[str]) -> Iterator[None]:
        """Inside the block, adapter ``name`` is inactive in ``blocks``."""
        sites = [s for b in blocks for s in self.sites[b]]
        saved = [s.active for s in sites]
        for s in sites:
            s.active = tuple(n for n in s.active if n != self.name)
        try:
            yield
        finally:
            for s, active in zip(sites, saved, strict=True):
                s.active = active

    def finish(self) -> None:
        """Every delta of the adapter trainable again (the adapter as the wrapped method left it)."""
        self._train(None)
        if self.inner:
            self.inner.finish()

    def state_dict(self) -> dict[str, Any]:
        return {"importance": self.importance.clone(), "generator": self.generator.get_state(),
                "selected": list(self.selected), "inner": self.inner.state_dict() if self.inner else {}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.importance = state["importance"].clone()
        self.generator.set_state(state["generator"])
        self.selected = list(state["selected"])
        self._train({id(p) for b in self.selected for p in self.params[b]})
        if self.inner:
            self.inner.load_state_dict(state["inner"])
