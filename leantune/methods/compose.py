"""User-composed methods: several presets attached as one adapter.

``lt.Compose([lt.LoRA(targets=["q_proj"]), lt.IA3()])`` trains, saves, loads,
merges (when every part can) and switches like a built-in method. Parts that
land on the same module are stacked there in the given order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import MethodConfig
from ..registry import config_from_dict, register_combinator


@register_combinator
@dataclass(init=False)
class Compose(MethodConfig):
    """A method made of other methods' configs (``parts``), attached under one name."""

    parts: list[MethodConfig] = field(default_factory=list)

    name: ClassVar[str] = "compose"

    def __init__(self, parts: list[MethodConfig | dict[str, Any]], **common: Any) -> None:
        self.parts = list(parts)
        MethodConfig.__init__(self, **common)  # runs __post_init__

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.parts:
            raise ValueError("Compose needs at least one part, e.g. Compose([LoRA(), IA3()])")
        self.parts = [self._part(p) for p in self.parts]
        if any(isinstance(p, Compose) for p in self.parts):
            raise ValueError("Compose parts must be plain methods; flatten nested Compose configs")

    @staticmethod
    def _part(part: MethodConfig | dict[str, Any]) -> MethodConfig:
        return part if isinstance(part, MethodConfig) else config_from_dict(part)

    @property
    def mergeable(self) -> bool:  # type: ignore[override]
        return all(p.mergeable for p in self.parts)

    def components(self) -> list[MethodConfig]:
        return [c for p in self.parts for c in p.components()]  # presets (mam, unipelt) bring their own parts

    def folded(self) -> Compose | None:
        parts = [p.folded() for p in self.parts]
        if all(f is None for f in parts):
            return None
        return Compose([f or p for f, p in zip(parts, self.parts, strict=True)], targets=self.targets, exclude=self.exclude,
                       modules_to_save=self.modules_to_save, task=self.task)

    def head_modules(self) -> list[str]:
        names = [*super().head_modules(), *(h for p in self.parts for h in p.head_modules())]
        return list(dict.fromkeys(names))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["parts"] = [p.to_dict() for p in self.parts]
        return out
