"""Method registry: name -> config class, with suggestions for typos."""

from __future__ import annotations

import difflib

from .config import MethodConfig

_METHODS: dict[str, type[MethodConfig]] = {}
_COMBINATORS: dict[str, type[MethodConfig]] = {}


def register(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make a finished method available by name."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} needs a `name`")
    if cls.name in _METHODS and _METHODS[cls.name] is not cls:
        raise ValueError(f"method {cls.name!r} is already registered")
    _METHODS[cls.name] = cls
    return cls


def register_combinator(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator for configs built from other configs (``Compose``): loadable, not a method."""
    _COMBINATORS[cls.name] = cls
    return cls


def config_from_dict(saved: dict) -> MethodConfig:
    """Rebuild a config from ``MethodConfig.to_dict()`` output."""
    fields = dict(saved)
    name = fields.pop("method")
    cls = _COMBINATORS.get(name) or get_method(name)
    return cls(**fields)


def methods() -> dict[str, type[MethodConfig]]:
    """Every registered method: name -> config class."""
    return dict(sorted(_METHODS.items()))


def get_method(name: str) -> type[MethodConfig]:
    """The config class for ``name``; an error that suggests the nearest names otherwise."""
    key = name.strip().lower().replace("-", "_")
    if key in _METHODS:
        return _METHODS[key]
    near = difflib.get_close_matches(key, list(_METHODS), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
    raise KeyError(f"unknown method {name!r}.{hint} Known methods: {', '.join(sorted(_METHODS))}")
