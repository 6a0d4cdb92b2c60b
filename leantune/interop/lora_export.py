"""Export any low-rank adapter as a plain HF PEFT LoRA folder.

PiSSA, CorDA, VeRA, NOLA, AdaLoRA, DyLoRA, ... all end as ``ΔW = scale · B A``
relative to the original base weights; written as a LoRA (rank pattern and
alpha pattern per module where they differ) it loads in PEFT, transformers and
vLLM and in ``lt.load_adapter``, with no method-specific code on the reader's side.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..api import adapter_paths, adapters
from ..core.forms import LowRank, Replace
from ..core.site import Delta
from ..methods.lora import LoRA
from ..storage import PEFT_CONFIG, WEIGHTS, write_dir_atomically, write_json
from .peft_format import PREFIX, adapter_config


def lowrank_factors(delta: Delta) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(A, B, scale)`` with the delta's weight change ``scale · B A``; a clear error if it has none."""
    get = getattr(delta, "lowrank_factors", None)
    if get is not None:
        return get()
    if type(delta) is LowRank:
        return delta.A.detach(), delta.B.detach(), delta.scale
    raise TypeError(
        f"{type(delta).__name__} is not a low-rank change of the base weight, so it cannot be written as a "
        "LoRA; merge it into the base instead (lt.merge then lt.unload)"
    )


def export_lora(model: nn.Module, path: str | os.PathLike, name: str = "default") -> Path:
    """Write adapter ``name`` as a plain HF PEFT LoRA folder at ``path``."""
    have = adapters(model)
    if name not in have:
        raise KeyError(f"no adapter named {name!r}; this model has {sorted(have) or 'none'}")
    record = have[name]
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    scales: dict[str, float] = {}
    for path_, _, delta in adapter_paths(model, name):
        if isinstance(delta, Replace):
            for local, value in delta.trained.state_dict().items():
                tensors[f"{PREFIX}{path_}.{local}"] = value.detach().cpu().contiguous().clone()
            continue
        a, b, scale = lowrank_factors(delta)
        if a.shape[0] == 0:  # a module pruned to rank 0 changes nothing
            continue
        keys = LoRA().peft_keys(delta)
        tensors[f"{PREFIX}{path_}.{keys['A']}"] = a.cpu().contiguous().clone()
        tensors[f"{PREFIX}{path_}.{keys['B']}"] = b.cpu().contiguous().clone()
        ranks[path_], scales[path_] = a.shape[0], scale
    if not ranks:
        raise ValueError(f"adapter {name!r} has no low-rank deltas to export")
    r = Counter(ranks.values()).most_common(1)[0][0]
    scale = Counter(scales[p] for p in ranks if ranks[p] == r).most_common(1)[0][0]
    lora = LoRA(
        r=r,
        alpha=scale * r,
        rank_pattern={re.escape(p): k for p, k in ranks.items() if k != r},
        alpha_pattern={re.escape(p): scales[p] * ranks[p] for p in ranks if scales[p] != scale or ranks[p] != r},
        targets=list(ranks),
        task=record.config.task,
    )

    def fill(folder: Path) -> None:
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
        write_json(folder / PEFT_CONFIG, adapter_config(lora, list(ranks), record.heads, model))

    return write_dir_atomically(path, fill)
