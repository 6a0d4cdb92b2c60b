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
    """PEFT's name for tensor ``local`` of ``delta`` at ``path`` (adapter name stripped).

    Prompt-learning methods keep their tensors at model level under bare names
    (``prompt_embeddings``) and their ``modules_to_save`` under ``base_model.``.
    """
    if isinstance(delta, Replace):
        prefix = "base_model." if config.peft_prompt_learning else PREFIX
        return prefix + path + "." + local.removeprefix("trained.")
    mapped = config.peft_keys(delta)[local]
    if config.peft_prompt_learning:
        return mapped
    if mapped.startswith("/"):  # a model-level tensor shared by all layers (VeRA's ``base_model.vera_A``)
        return mapped[1:]
    return PREFIX + path + "." + mapped


def adapter_config(config: MethodConfig, paths: list[str], heads: list[str], model: nn.Module) -> dict[str, Any]:
    """The ``adapter_config.json`` PEFT and transformers read for this adapter."""
    from ..core.site import iter_sites
    from ..core.weights import GPT2_CONV1D, WEIGHT_TYPES

    bases = [site.base for p, site in iter_sites(model) if p in paths]
    # PEFT's weight-site tuners read ``fan_in_fan_out``; the others (LN tuning, prompts) reject it.
    weight_sites = any(isinstance(b, WEIGHT_TYPES) for b in bases)
    fan_in_fan_out = bool(GPT2_CONV1D) and any(isinstance(b, GPT2_CONV1D) for b in bases)
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None) or None
    return {
        "peft_type": config.peft_type,
        "task_type": TASK_TO_PEFT.get(config.task or ""),
        "base_model_name_or_path": name_or_path,
        "inference_mode": True,
        "modules_to_save": heads or None,
        **({"fan_in_fan_out": fan_in_fan_out} if weight_sites else {}),
        **config.peft_config(paths),
    }


def config_from_peft(cfg: dict[str, Any]) -> MethodConfig:
    """A leantune config equivalent to a PEFT ``adapter_config.json``."""
    peft_type = cfg.get("peft_type")
    candidates = [c for c in methods().values() if c.peft_type == peft_type]
    if not candidates:
        known = ", ".join(sorted({c.peft_type for c in methods().values() if c.peft_type}))
        raise ValueError(f"PEFT adapter type {peft_type!r} is not readable by leantune (readable: {known})")
    # A variant PEFT marks with a flag (LoRA's use_dora / use_rslora) is read by the method that claims
    # it; otherwise the method named like the type (``prefix_tuning`` for PREFIX_TUNING) reads it.
    claimed = [c for c in candidates if getattr(c, "peft_claims", None) and c.peft_claims(cfg)]
    named = [c for c in candidates if c.name == str(peft_type).lower()]
    reader = (claimed or named or candidates)[0]
    targets = cfg.get("target_modules")
    if targets is None and not reader.peft_prompt_learning:
        raise ValueError("adapter_config.json has no target_modules; leantune cannot place the adapter")
    common = {
        "targets": targets if isinstance(targets, str) or targets is None else list(targets),
        "exclude": cfg.get("exclude_modules"),
        "modules_to_save": list(dict.fromkeys(cfg.get("modules_to_save") or [])) or None,
        "task": PEFT_TO_TASK.get(cfg.get("task_type") or ""),
    }
    return reader.from_peft_config(cfg, **common)
