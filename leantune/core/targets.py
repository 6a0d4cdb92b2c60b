"""Target matching: which modules of a model a method acts on.

Accepts what HF PEFT users know: a list of module-name suffixes, a regex string
(full match on the module path), or ``"all-linear"`` (every Linear / GPT-2
Conv1D except the output head), minus ``exclude`` in the same forms.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .site import iter_base_modules
from .weights import LINEAR_TYPES

Pattern = str | Sequence[str] | None


def name_matches(path: str, pattern: Pattern) -> bool:
    """True if ``path`` is selected by ``pattern`` (suffix list or full-match regex)."""
    if pattern is None:
        return False
    if isinstance(pattern, str):
        return re.fullmatch(pattern, path) is not None
    return any(path == t or path.endswith("." + t) for t in pattern)


def output_head_paths(model: nn.Module) -> set[str]:
    """Paths of the output head (``get_output_embeddings``), which ``all-linear`` skips."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if head is None:
        return set()
    heads = {path for path, m in iter_base_modules(model) if m is head}
    return heads


def _describe_available(model: nn.Module, limit: int = 40) -> str:
    leaves = sorted({path.rsplit(".", 1)[-1] for path, m in iter_base_modules(model) if not list(m.children())})
    shown = ", ".join(leaves[:limit]) + (" ..." if len(leaves) > limit else "")
    return f"module names in this model (last name part): {shown}"


def resolve_targets(
    model: nn.Module,
    targets: Pattern,
    exclude: Pattern = None,
    site_types: tuple[type, ...] = (),
    skip: set[str] | frozenset[str] = frozenset(),
    method: str = "this method",
) -> list[str]:
    """Module paths selected by ``targets`` minus ``exclude`` and ``skip``.

    Raises a ValueError listing the model's module names when nothing matches,
    and a TypeError when a selected module is of a type the method cannot adapt.
    """
    if isinstance(targets, str) and targets == "all-linear":
        heads = output_head_paths(model)
        chosen = [p for p, m in iter_base_modules(model) if isinstance(m, LINEAR_TYPES) and p not in heads]
    else:
        if isinstance(targets, str):
            try:
                re.compile(targets)
            except re.error as err:
                raise ValueError(f"targets={targets!r} is not a valid regular expression: {err}") from err
        chosen = [p for p, _ in iter_base_modules(model) if name_matches(p, targets)]
    chosen = [p for p in chosen if not name_matches(p, exclude) and p not in skip]
    if not chosen:
        raise ValueError(
            f"targets={targets!r} (exclude={exclude!r}) match no module for {method}; "
            f"{_describe_available(model)}"
        )
    if site_types:
        modules = dict(iter_base_modules(model))
        wrong = [f"{p} ({type(modules[p]).__name__})" for p in chosen if not isinstance(modules[p], site_types)]
        if wrong:
            kinds = ", ".join(sorted({t.__name__ for t in site_types}))
            raise TypeError(
                f"{method} cannot adapt {', '.join(wrong[:5])}{' ...' if len(wrong) > 5 else ''}: "
                f"it supports {kinds}; narrow `targets` or add these to `exclude`"
            )
    return chosen
