"""Publishing a trained adapter: merged into a full transformers model, or as a plain HF PEFT folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ..api import merge, unload
from ..storage import PEFT_CONFIG, WEIGHTS, load_adapter, read_adapter_config, write_dir_atomically
from .checkpoint import TASK_FILE
from .config import ConfigError
from .models import load_model, load_tokenizer
from .tasks import TASKS


def _task_facts(adapter: Path) -> tuple[str | None, list[Any]]:
    """(task, labels) recorded at training time, else the task in the adapter's config."""
    info_path = adapter / TASK_FILE
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        return info.get("task"), info.get("labels") or []
    return read_adapter_config(adapter).task, []


def merge_to_model(base: str, adapter: str | Path, out: str | Path) -> Path:
    """Fold ``adapter`` into ``base`` and write a full model (and its tokenizer) that plain
    ``AutoModelFor*.from_pretrained`` loads; the base's dtype is kept."""
    adapter = Path(adapter)
    task, labels = _task_facts(adapter)
    kwargs: dict[str, Any] = {}
    if labels:
        names = {i: str(v) for i, v in enumerate(labels)}
        kwargs = {"num_labels": len(labels), "id2label": names, "label2id": {v: i for i, v in names.items()}}
    try:
        tokenizer = load_tokenizer(base)
    except ConfigError:
        tokenizer = None  # a model without a tokenizer beside it merges all the same
    if task == "seq-cls" and tokenizer is not None:
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    auto_class = TASKS[task].auto_class if task in TASKS else "AutoModel"
    model = load_model(base, auto_class, "auto", **kwargs)
    unload(merge(load_adapter(model, adapter)))

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_dir_atomically(out, fill)


def export_adapter(adapter: str | Path, fmt: str, out: str | Path) -> Path:
    """``fmt="peft"``: only the files HF PEFT reads (``adapter_config.json``, ``adapter_model.safetensors``)."""
    adapter = Path(adapter)
    if fmt != "peft":
        raise ValueError(f"unknown export format {fmt!r}; the one format is 'peft'")
    config = read_adapter_config(adapter)
    if not (adapter / PEFT_CONFIG).is_file():
        raise ValueError(f"{adapter} has no {PEFT_CONFIG}, so HF PEFT cannot read it (leantune writes one for "
                         f"methods PEFT has; this adapter's method is {config.name!r}); load it with "
                         "lt.load_adapter, or merge it into the model (leantune merge)")

    def fill(tmp: Path) -> None:
        for name in (PEFT_CONFIG, WEIGHTS):
            shutil.copy2(adapter / name, tmp / name)

    return write_dir_atomically(out, fill)
