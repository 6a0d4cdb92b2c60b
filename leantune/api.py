"""The public functions: attach, switch, fold and remove adapters.

Everything here works against sites and deltas, never against a particular
method, so a new method gets all of it by providing ``make_delta``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import MethodConfig
from .core.forms import Replace, Stack
from .core.schedule import Schedule
from .core.site import (
    Delta,
    Site,
    all_disabled,
    base_module,
    iter_base_modules,
    iter_sites,
    remove_site,
    site_at,
)
from .core.targets import name_matches, resolve_targets
from .registry import get_method, methods

__all__ = [
    "adapt", "trainable_parameters", "merge", "unmerge", "unload", "disabled", "set_active",
    "methods", "adapters", "delete_adapter", "adapter_paths", "fold", "schedules",
    "param_groups",
]


@dataclass
class AdapterRecord:
    """What ``adapt`` attached for one adapter name."""

    config: MethodConfig
    paths: list[str]
    heads: list[str]


@dataclass
class ModelState:
    """Bookkeeping kept on an adapted model (``model.leantune``)."""

    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    base_requires_grad: dict[str, bool] = field(default_factory=dict)


def _state(model: nn.Module) -> ModelState:
    state = getattr(model, "leantune", None)
    if state is None:
        state = ModelState({}, {n: p.requires_grad for n, p in model.named_parameters()})
        model.leantune = state
    return state


def adapters(model: nn.Module) -> dict[str, AdapterRecord]:
    """Adapter name -> record, for every adapter attached to ``model``."""
    state = getattr(model, "leantune", None)
    return dict(state.adapters) if state else {}


def _resolve_heads(model: nn.Module, config: MethodConfig, strict: bool) -> list[str]:
    names = config.head_modules()
    explicit = set(config.modules_to_save or [])
    all_paths = [p for p, _ in iter_base_modules(model)]
    found: list[str] = []
    for name in names:
        hits = [p for p in all_paths if name_matches(p, [name])]
        if not hits and strict and name in explicit:
            raise ValueError(
                f"modules_to_save entry {name!r} matches no module; top-level modules: "
                f"{', '.join(n for n, _ in model.named_children())}"
            )
        found.extend(h for h in hits if h not in found)
    return found


def _device_of(module: nn.Module) -> torch.device:
    # Buffers count too: a quantized base (core/quant.py) may hold its weight in buffers only.
    for t in (*module.parameters(), *module.buffers()):
        return t.device
    return torch.device("cpu")


def _attach(site: Site, name: str, delta: Delta) -> None:
    delta.to(_device_of(site.base))
    for p in delta.parameters():
        p.requires_grad_(True)
    site.deltas[name] = delta
    site.active = (*site.active, name)


def adapt(
    model: nn.Module,
    config: MethodConfig | str,
    name: str = "default",
    calibration: Iterable[dict] | None = None,
    *,
    _strict_heads: bool = True,
) -> nn.Module:
    """Attach a new adapter in place, freeze the base, and return the model.

    ``config`` is a method config (``lt.LoRA(r=16)``) or a method name.
    ``calibration`` is an iterable of model-input dicts, read by methods whose
    initialisation needs data and ignored by the others. The new adapter is
    active alongside any already active ones (see :func:`set_active`).
    """
    if isinstance(config, str):
        config = get_method(config)()
    if not isinstance(config, MethodConfig):
        raise TypeError(f"adapt() takes a method config such as lt.LoRA(...) or a method name, got {type(config).__name__}")
    state = _state(model)
    if name in state.adapters:
        raise ValueError(f"model already has an adapter named {name!r}; pick another name or delete_adapter() it")
    if any(site.merged for _, site in iter_sites(model)):
        raise RuntimeError("unmerge(model) before attaching a new adapter: merged weights would be adapted twice")
    heads = _resolve_heads(model, config, strict=_strict_heads)
    plan = []
    for part in config.components():
        part_paths = resolve_targets(
            model, part.resolved_targets(model), part.exclude, part.site_types, skip=set(heads), method=part.name
        )
        part.prepare(model, part_paths, calibration)
        plan.append((part, part_paths))
    for p in model.parameters():
        p.requires_grad_(False)
    deltas: dict[str, list[Delta]] = {}
    for part, part_paths in plan:
        for path in part_paths:
            deltas.setdefault(path, []).append(part.make_delta(path, base_module(model, path)))
    for path in heads:
        deltas[path] = [Replace(base_module(model, path))]
    for path, made in deltas.items():
        site = site_at(model, path)
        _attach(site, name, made[0] if len(made) == 1 else Stack(made))
    paths = [p for p in deltas if p not in heads]
    state.adapters[name] = AdapterRecord(config, paths, heads)
    return model


def adapter_paths(model: nn.Module, name: str) -> Iterator[tuple[str, Site, Delta]]:
    """(path, site, delta) for every place adapter ``name`` acts."""
    for path, site in iter_sites(model):
        if name in site.deltas:
            yield path, site, site.deltas[name]


def _is_trained(model: nn.Module, name: str) -> bool:
    """Adapter ``name`` is active somewhere and has parameters that require grad."""
    return any(name in site.active and any(p.requires_grad for p in delta.parameters())
               for _, site, delta in adapter_paths(model, name))


def param_groups(model: nn.Module, lr: float) -> list[dict]:
    """Optimizer groups for everything that trains in ``model``: each trained adapter's
    method decides its parts' rates (``MethodConfig.param_groups``); any other
    trainable tensor gets ``lr``. Pass them to any ``torch.optim`` optimizer."""
    groups = [g for name, record in adapters(model).items() if _is_trained(model, name)
              for g in record.config.param_groups(model, name, lr)]
    seen = {id(p) for g in groups for p in g["params"]}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    return [g for g in [*groups, {"params": rest, "lr": lr}] if g["params"]]


def schedules(model: nn.Module, total_steps: int | None = None) -> list[Schedule]:
    """The training-time schedules of every adapter on ``model`` whose method has one
    (AdaLoRA's rank budget, SpIEL's drop-and-grow, IST's layer sampling) among the adapters
    a step trains (active, with trainable parameters), for a run of
    ``total_steps`` optimizer steps; see core/schedule.py for how a loop drives them."""
    found = [record.config.schedule(model, name, total_steps) for name, record in adapters(model).items()
             if _is_trained(model, name)]
    return [s for s in found if s is not None]


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; shared tensors count once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def _known(model: nn.Module, names: Sequence[str]) -> list[str]:
    have = adapters(model)
    missing = [n for n in names if n not in have]
    if missing:
        raise KeyError(f"no adapter named {', '.join(map(repr, missing))}; this model has {sorted(have) or 'none'}")
    return list(names)


def merge(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Fold the active (or the named) adapters into the base weights."""
    chosen = _known(model, names) if names is not None else None
    _refuse_tied_merge(model, chosen)
    for _, site in iter_sites(model):
        site.merge(chosen)
    return model


def _refuse_tied_merge(model: nn.Module, names: Sequence[str] | None) -> None:
    """Folding a delta into a weight that another module shares would change both."""
    owners: dict[int, list[str]] = {}
    for pname, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(pname)
    for path, site in iter_sites(model):
        weight = getattr(site.base, "weight", None)
        wanted = [n for n in (names if names is not None else site.active) if n in site.deltas]
        if weight is None or not wanted or len(owners.get(id(weight), [])) < 2:
            continue
        if any(not isinstance(site.deltas[n], Replace) for n in wanted):
            others = [o for o in owners[id(weight)] if not o.startswith(path + ".")]
            raise ValueError(
                f"cannot merge into {path}: its weight is tied to {', '.join(others)}, so folding the delta "
                "would change both; exclude this module from the adapter or untie the weights first"
            )


def fold(model: nn.Module, names: Sequence[str] | None = None) -> nn.Module:
    """Fold training-time reparameterisations away (a prefix's MLP, a factorised or
    residual prompt): each delta becomes the plain one it computes, and the adapter's
    config the plain method's, so it runs cheaper and saves in HF PEFT's layout where
    PEFT has that method. Outputs do not change; training goes on from the plain form."""
    for name in _known(model, names) if names is not None else list(adapters(model)):
        record = model.leantune.adapters[name]
        config = record.config.folded()
        if config is None:
            continue
        for _, site, delta in list(adapter_paths(model, name)):
            trainable = any(p.requires_grad for p in delta.parameters())
            site.deltas[name] = plain = delta.folded()
            for p in plain.parameters():
                p.requires_grad_(trainable)
        record.config = config
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo :func:`merge`: take every folded delta back out of the base weights."""
    for _, site in iter_sites(model):
        site.unmerge()
    return model


def delete_adapter(model: nn.Module, name: str) -> nn.Module:
    """Remove one adapter; sites left without deltas give their base module back."""
    _known(model, [name])
    for path, site, _ in list(adapter_paths(model, name)):
        if name in site.merged:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge(model) before deleting it")
        del site.deltas[name]
        site.active = tuple(n for n in site.active if n != name)
        if not len(site.deltas):
            remove_site(model, path)
    del model.leantune.adapters[name]
    return model


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and give back the plain base model.

    Merged adapters stay folded in the weights (``merge`` then ``unload`` is
    "merge and unload"); unmerged ones are dropped. The base's original
    ``requires_grad`` flags are restored.
    """
    for path, _ in list(iter_sites(model)):
        remove_site(model, path)
    state = getattr(model, "leantune", None)
    if state is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(state.base_requires_grad.get(n, p.requires_grad))
        del model.leantune
    return model


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model behaves exactly as the base model."""
    with all_disabled(model):
        yield model


def set_active(model: nn.Module, names: str | Sequence[str]) -> nn.Module:
    """Make exactly these adapters active (their outputs add up, in this order)."""
    names = [names] if isinstance(names, str) else list(names)
    _known(model, names)
    if any(site.merged for _, site in iter_sites(model)):
        raise RuntimeError("unmerge(model) before switching adapters: merged deltas cannot be switched off")
    for _, site in iter_sites(model):
        site.active = tuple(n for n in names if n in site.deltas)
    return model
