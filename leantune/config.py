"""The base of every method's config: where it acts and what else trains."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from .core.families import expand_roles
from .core.schedule import Schedule
from .core.site import Delta
from .core.weights import WEIGHT_TYPES

TASK_HEADS = {
    "seq-cls": ("classifier", "score"),
    "token-cls": ("classifier", "score"),
    "qa": ("qa_outputs",),
}
TASKS = (*TASK_HEADS, "causal-lm", "seq2seq-lm", "feature")


@dataclass
class MethodConfig:
    """Fields every method accepts.

    targets: module-name suffixes, a full-match regex, or ``"all-linear"``;
        ``"@role"`` entries (``@attn_v``, ``@ffn_out``, ...) name modules by their
        role in common families (core/families.py); ``None`` means the method's default.
    exclude: modules to leave alone, same forms as ``targets``.
    modules_to_save: modules trained in full as a copy (e.g. a new head).
    task: ``"seq-cls"``/``"token-cls"``/``"qa"`` add the usual heads to
        ``modules_to_save``; ``"causal-lm"``, ``"seq2seq-lm"``, ``"feature"`` are recorded.
    """

    targets: str | list[str] | None = None
    exclude: str | list[str] | None = None
    modules_to_save: list[str] | None = None
    task: str | None = None

    name: ClassVar[str] = ""
    mergeable: ClassVar[bool] = False
    peft_type: ClassVar[str | None] = None
    # Its default config trains nn.Linear sites through the engine's fused low-rank product
    # (engine/lowrank_linear.py) when dropout is 0; checked for every method by the harness.
    fused_linear: ClassVar[bool] = False
    # HF PEFT keeps prompt-learning tensors at model level: no target_modules, bare key names.
    peft_prompt_learning: ClassVar[bool] = False
    default_targets: ClassVar[str | list[str]] = "all-linear"
    site_types: ClassVar[tuple[type, ...]] = WEIGHT_TYPES

    def __post_init__(self) -> None:
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)

    # --- the preset -----------------------------------------------------------
    def components(self) -> list[MethodConfig]:
        """The presets attached under one adapter name: itself, or a composition's parts."""
        return [self]

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        """Read the model (and calibration data) once before deltas are made."""

    def make_delta(self, path: str, module: nn.Module) -> Delta:
        """The delta this method attaches at ``path``."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, name: str, lr: float) -> list[dict[str, Any]]:
        """Optimizer groups for adapter ``name`` trained at ``lr``: one group, unless the
        method's parts want their own rates (DePT's prompt and low-rank update)."""
        from .api import adapter_paths  # the api builds on configs; import at call time

        params = [p for _, _, d in adapter_paths(model, name) for p in d.parameters() if p.requires_grad]
        return [{"params": params, "lr": lr}]

    def schedule(self, model: nn.Module, name: str, total_steps: int | None) -> Schedule | None:
        """What adapter ``name`` does between optimizer steps of a ``total_steps`` run
        (core/schedule.py), or ``None`` for a method that stays as attached."""
        return None

    def folded(self) -> MethodConfig | None:
        """The config of the adapter after ``lt.fold`` (whose deltas become ``Delta.folded()``),
        or ``None`` when this method has no training-time reparameterisation to fold."""
        return None

    # --- helpers shared by every method ----------------------------------------
    def resolved_targets(self, model: nn.Module) -> str | list[str]:
        """``targets`` (or the default) with ``@role`` entries expanded for this model family."""
        return expand_roles(model, self.default_targets if self.targets is None else self.targets, self.name)

    def head_modules(self) -> list[str]:
        """``modules_to_save`` plus the heads its task implies."""
        extra = list(TASK_HEADS.get(self.task or "", ()))
        return list(dict.fromkeys([*(self.modules_to_save or []), *extra]))

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.name, **dataclasses.asdict(self)}

    @classmethod
    def field_docs(cls) -> list[tuple[str, str, Any]]:
        """(name, type, default) of every field, for ``leantune methods``."""
        out = []
        for f in dataclasses.fields(cls):
            if not f.init:
                continue
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None  # type: ignore[misc]
            )
            out.append((f.name, str(f.type), default))
        return out


def config_field(default: Any, **kwargs: Any) -> Any:
    """A dataclass field whose mutable default is copied per instance."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), **kwargs)
    return field(default=default, **kwargs)
