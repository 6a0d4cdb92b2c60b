"""HF PEFT adapter layout: key names and ``adapter_config.json`` both ways.

A method that exists in PEFT sets ``peft_type`` and provides ``peft_keys``,
``peft_config`` and ``from_peft_config``; everything else (prefixes,
``modules_to_save`` heads, task names, target lists) is handled here once.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import MethodConfig
from ..core.forms import Replace
from ..core.site import Delta
from ..registry import methods

PREFIX = "base_model.model."
TASK_TO_PEFT = {
    "seq-cls": "SEQ_CLS",
    "token-cls": "TOKEN_CLS",
    "causal-lm": "CAUSAL_LM",
    "seq2seq-lm": "SEQ_2_SEQ_LM",
    "qa": "QUESTION_ANS",
    "feature": "FEATURE_EXTRACTION",
}
PEFT_TO_TASK = {v: k for k, v in TASK_TO_PEFT.items()}


def peft_key(config: MethodConfig, path: str, delta: Delta, local: str) -> str:
    """PEFT's name for tensor ``local`` of ``delta`` at ``path`` (adapter name stripped)."""
    if isinstance(delta, Replace):
        return PREFIX + path + "." + local.removeprefix("trained.")
    return PREFIX + path + "." + config.peft_keys(delta)[local]


def adapter_config(config: MethodConfig, paths: list[str], heads: list[str], model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT and transformers read for this adapter."""
    from ..core.site import iter_sites
    from ..core.weights import GPT2_CONV1D

    fan_in_fan_out = bool(GPT2_CONV1D) and any(
        isinstance(site.base, GPT2_CONV1D) for p, site in iter_sites(model) if p in paths
    )
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": config.peft_type,
        "task_type": TASK_TO_PEFT.get(config.task or ""),
        "base_model_name_or_path": name_or_path,
        "inference_mode": True,
        "modules_to_save": heads or None,
        "fan_in_fan_out": fan_in_fan_out,
        **config.peft_config(paths),
    }


def config_from_peft(cfg: dict[str, Any]) -> MethodConfig:
    """A leantune config equivalent to a PEFT ``adapter_config.json``."""
    peft_type = cfg.get("peft_type")
    by_type = {c.peft_type: c for c in methods().values() if c.peft_type}
    if peft_type not in by_type:
        known = ", ".join(sorted(by_type)) or "none"
        raise ValueError(f"PEFT adapter type {peft_type!r} is not readable by leantune (readable: {known})")
    targets = cfg.get("target_modules")
    if targets is None:
        raise ValueError("adapter_config.json has no target_modules; leantune cannot place the adapter")
    common = {
        "targets": targets if isinstance(targets, str) else list(targets),
        "exclude": cfg.get("exclude_modules"),
        "modules_to_save": list(dict.fromkeys(cfg.get("modules_to_save") or [])) or None,
        "task": PEFT_TO_TASK.get(cfg.get("task_type") or ""),
    }
    return by_type[peft_type].from_peft_config(cfg, **common)
