"""Loading a base model and its tokenizer by Hugging Face id or local folder.

A local folder is always read offline (``local_files_only``), so a typo in a
path is a clear error instead of a failed download attempt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, looks_local

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def _where(name: str) -> tuple[str, dict[str, Any]]:
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path), {"local_files_only": True}
    if looks_local(name):
        raise ConfigError(f"no model folder at {name!r}")
    return name, {}


def load_tokenizer(name: str) -> Any:
    """The tokenizer at ``name``; causal models without a pad token pad with EOS."""
    from transformers import AutoTokenizer

    where, kwargs = _where(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"no tokenizer could be loaded from {name!r} (set model.tokenizer): {err}") from err
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"the tokenizer of {name!r} has neither a pad nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name: str, auto_class: str, dtype: str = "auto", **kwargs: Any) -> nn.Module:
    """``transformers.<auto_class>.from_pretrained(name)``, ``dtype`` kept from the checkpoint unless set."""
    import transformers

    where, extra = _where(name)
    try:
        return getattr(transformers, auto_class).from_pretrained(where, dtype=DTYPES[dtype], **extra, **kwargs)
    except (OSError, ValueError) as err:
        raise ConfigError(f"model {name!r} could not be loaded as {auto_class}: {err}") from err
