"""Sites: the one place where a delta meets the base model.

A :class:`Site` wraps a module of the base model in place (same attribute path)
and holds the named deltas attached to it. Every method reuses the same three
hooks of :class:`Delta` — change the input, swap the module that runs, compose
with the output — so merge, unmerge, disable, multi-adapter activation and dtype
handling are written here once instead of once per method.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..engine.lowrank_linear import fused_forward


class Delta(nn.Module):
    """A trainable change to one base module, addressed by adapter name.

    Subclasses override only the hooks they need. ``base`` is passed in, never
    stored, so the base's parameters are not duplicated in the state dict.
    """

    mergeable: bool = False

    def pre(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Transform the site's input before the base runs (input sites)."""
        return x

    def module(self, base: nn.Module) -> nn.Module:
        """The module that computes the site's output (``replace`` composition)."""
        return base

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Compose with the base output ``h``; ``x`` is the site's original input."""
        return h

    def post_call(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        """:meth:`post`, for deltas that also read the site's other call arguments (a side network
        that re-runs a block needs the mask and position embeddings the block got)."""
        return self.post(base, x, h)

    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor, float] | None:
        """``(A, B, scale)`` when the delta is exactly ``scale · B A x`` on a Linear right now,
        so the engine may fuse it with the base product (engine/lowrank_linear.py); else ``None``."""
        return None

    def delta_weight(self, base: nn.Module) -> torch.Tensor | None:
        """The additive change to ``base.weight`` (fp32), for forms linear in the weight."""
        return None

    def merge(self, base: nn.Module) -> None:
        """Fold the delta into the base's weights. Additive forms need not override."""
        dw = self._require_delta_weight(base)
        base.weight.data += dw.to(base.weight.dtype)

    def unmerge(self, base: nn.Module) -> None:
        """Undo :meth:`merge`."""
        dw = self._require_delta_weight(base)
        base.weight.data -= dw.to(base.weight.dtype)

    def folded(self) -> Delta:
        """The plain delta this one computes, training-time reparameterisations folded
        away (``lt.fold``); the delta itself when there is nothing to fold."""
        return self

    def _require_delta_weight(self, base: nn.Module) -> torch.Tensor:
        dw = self.delta_weight(base)
        if dw is None:
            raise TypeError(f"{type(self).__name__} cannot be merged into the base weights")
        return dw


def _split_output(out):
    """Return (main tensor, rebuild function) for modules returning tuples."""
    if isinstance(out, tuple):
        return out[0], lambda h: (h, *out[1:])
    return out, lambda h: h


class Site(nn.Module):
    """A base module plus the named deltas attached to it."""

    # Siblings that run as one stacked site (core/siblings.py), or None: the site runs alone.
    stack = None

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base
        self.deltas = nn.ModuleDict()
        # Tuples, replaced rather than changed in place: every change then shows in the module's
        # ``__dict__``, which is what lets lt.compile's guards skip an unchanged site.
        self.active: tuple[str, ...] = ()
        self.merged: tuple[str, ...] = ()
        self.disabled = False

    # Code that reads module attributes (tied weights, config checks) keeps working.
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in {"base", "deltas"}:
                raise
            return getattr(super().__getattr__("base"), name)

    def live_deltas(self) -> list[Delta]:
        """The deltas that take part in the forward pass right now."""
        if self.disabled:
            return []
        deltas = self._modules["deltas"]  # not through __getattr__ (below): see forward
        return [deltas[n] for n in self.active if n in deltas and n not in self.merged]

    def forward(self, *args, **kwargs):
        # ``_modules`` directly: torch.compile traces a custom ``__getattr__`` and guards the
        # lookup on every call, where a plain dictionary read is skipped while unchanged.
        base = self._modules["base"]
        if self.stack is not None and len(args) == 1 and not kwargs:
            stacked = self.stack.output(self, args[0])
            if stacked is not None:
                return stacked
        live = self.live_deltas()
        if not live:
            return base(*args, **kwargs)
        if len(args) == 1 and not kwargs:  # the engine's fused path, where it applies
            fused = fused_forward(base, live, args[0])
            if fused is not None:
                return fused
        x, args, kwargs = self._take_input(args, kwargs)
        for d in live:
            x = d.pre(base, x)
        runner = base
        for d in live:
            runner = d.module(runner)
        out = runner(x, *args, **kwargs)
        h, rebuild = _split_output(out)
        original_input = x
        for d in live:
            h = d.post_call(base, original_input, h, args, kwargs)
        return rebuild(h)

    @staticmethod
    def _take_input(args: tuple, kwargs: dict):
        if args:
            return args[0], args[1:], kwargs
        for key in ("hidden_states", "input", "x", "input_ids"):
            if key in kwargs:
                kwargs = dict(kwargs)
                return kwargs.pop(key), (), kwargs
        raise TypeError("leantune Site: could not find the module's input tensor in its call arguments")

    # --- merge / unmerge, written once for every method -------------------------
    def merge(self, names: list[str] | None = None) -> None:
        for name in names if names is not None else list(self.active):
            if name in self.merged or name not in self.deltas:
                continue
            delta = self.deltas[name]
            if not delta.mergeable:
                raise TypeError(
                    f"adapter '{name}' ({type(delta).__name__}) cannot be merged: its form is not "
                    "linear in the base weights; keep it unmerged or unload it"
                )
            with torch.no_grad():
                delta.merge(self.base)
            self.merged = (*self.merged, name)

    def unmerge(self) -> None:
        with torch.no_grad():
            while self.merged:
                *rest, name = self.merged
                self.deltas[name].unmerge(self.base)
                self.merged = tuple(rest)


def iter_sites(model: nn.Module) -> Iterator[tuple[str, Site]]:
    """(path, site) for every site in the model."""
    for name, module in model.named_modules():
        if isinstance(module, Site):
            yield name, module


def iter_base_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Named modules as the user sees them: a site counts as the module it wraps."""
    for name, child in model.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if isinstance(child, Site):
            yield path, child.base
        else:
            yield path, child
            yield from iter_base_modules(child, path)


def base_module(model: nn.Module, path: str) -> nn.Module:
    """The user's module at ``path`` (a site's wrapped module if there is one)."""
    module = model.get_submodule(path)
    return module.base if isinstance(module, Site) else module


def _parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, attr = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), attr


def site_at(model: nn.Module, path: str) -> Site:
    """The site at ``path``, wrapping the module there first if needed."""
    module = model.get_submodule(path)
    if isinstance(module, Site):
        return module
    parent, attr = _parent(model, path)
    site = Site(module)
    setattr(parent, attr, site)
    return site


def remove_site(model: nn.Module, path: str) -> None:
    """Put the wrapped base module back at ``path``."""
    site = model.get_submodule(path)
    parent, attr = _parent(model, path)
    setattr(parent, attr, site.base)


@contextmanager
def all_disabled(model: nn.Module) -> Iterator[None]:
    """Every site runs its base module only (merged deltas are unfolded meanwhile)."""
    sites = [s for _, s in iter_sites(model)]
    remerge = {id(s): list(s.merged) for s in sites}
    for s in sites:
        s.unmerge()
        s.disabled = True
    try:
        yield
    finally:
        for s in sites:
            s.disabled = False
            if remerge[id(s)]:
                s.merge(remerge[id(s)])
