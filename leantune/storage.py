"""Saving and loading adapters: safetensors + JSON, written atomically.

Methods that HF PEFT has are written in PEFT's layout (``adapter_config.json``,
PEFT key names) so PEFT, transformers and vLLM load them; every folder also
carries ``leantune_config.json`` with the exact leantune config.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from .api import adapt, adapter_paths, adapters, delete_adapter
from .config import MethodConfig
from .interop.peft_format import PREFIX, adapter_config, config_from_peft, peft_key
from .registry import config_from_dict

WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
LEANTUNE_CONFIG = "leantune_config.json"


def write_dir_atomically(dest: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a folder under a temporary name, then swap it in place of ``dest``.

    If ``fill`` fails, the temporary folder is removed and an existing ``dest``
    is untouched; a reader never sees a half-written folder.
    """
    dest = Path(dest).absolute()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        fill(tmp)
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it owner-only; give it a normal folder's mode
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.replace(dest, old / dest.name)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def _adapter_tensors(model: nn.Module, name: str, config: MethodConfig) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path, _, delta in adapter_paths(model, name):
        for local, value in delta.state_dict().items():
            key = peft_key(config, path, delta, local) if config.peft_type else f"{path}.{local}"
            tensors[key] = value.detach().to("cpu").contiguous().clone()
    return tensors


def _write_one(folder: Path, model: nn.Module, name: str) -> None:
    record = adapters(model)[name]
    folder.mkdir(parents=True, exist_ok=True)
    save_file(_adapter_tensors(model, name, record.config), str(folder / WEIGHTS), metadata={"format": "pt"})
    if record.config.peft_type:
        write_json(folder / PEFT_CONFIG, adapter_config(record.config, record.paths, record.heads, model))
    write_json(
        folder / LEANTUNE_CONFIG,
        {"leantune_version": __version__, "adapter_name": name, "config": record.config.to_dict(),
         "paths": record.paths, "heads": record.heads},
    )


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str | None = None) -> Path:
    """Save one adapter (``name``) or all of them to ``path``.

    One adapter is written at ``path``; with several, ``default`` (or the first)
    goes at ``path`` and the others in ``path/<name>``, as HF PEFT does.
    The previous contents of ``path`` are replaced only once the new folder is complete.
    """
    have = adapters(model)
    if not have:
        raise ValueError("this model has no adapters to save; attach one with lt.adapt(model, config)")
    names = [name] if name is not None else list(have)
    for n in names:
        if n not in have:
            raise KeyError(f"no adapter named {n!r}; this model has {sorted(have)}")
    root = "default" if "default" in names else names[0]

    def fill(tmp: Path) -> None:
        for n in names:
            _write_one(tmp if n == root else tmp / n, model, n)

    return write_dir_atomically(path, fill)


def read_adapter_config(folder: Path) -> MethodConfig:
    """The leantune config stored in an adapter folder (leantune's or HF PEFT's)."""
    if (folder / LEANTUNE_CONFIG).is_file():
        return config_from_dict(json.loads((folder / LEANTUNE_CONFIG).read_text())["config"])
    if (folder / PEFT_CONFIG).is_file():
        return config_from_peft(json.loads((folder / PEFT_CONFIG).read_text()))
    raise FileNotFoundError(
        f"{folder} has no {LEANTUNE_CONFIG} or {PEFT_CONFIG}; is this an adapter folder? "
        f"It contains: {sorted(p.name for p in folder.iterdir()) or 'nothing'}"
    )


def _check_folder(folder: Path) -> None:
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not (folder / WEIGHTS).is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        if pickled:
            raise ValueError(
                f"{folder} holds only pickled weights ({', '.join(pickled)}). leantune loads safetensors only, "
                "because unpickling can run arbitrary code. If you trust the file, convert it: "
                "safetensors.torch.save_file(torch.load(path, weights_only=True), 'adapter_model.safetensors')"
            )
        raise FileNotFoundError(
            f"{folder} is missing {WEIGHTS}; it contains: {sorted(p.name for p in folder.iterdir()) or 'nothing'}"
        )


def _fill_tensors(model: nn.Module, name: str, config: MethodConfig, saved: dict[str, torch.Tensor], folder: Path):
    expected: dict[str, tuple[str, torch.Tensor]] = {}
    for path, site, delta in adapter_paths(model, name):
        for local, target in delta.state_dict(keep_vars=True).items():
            key = peft_key(config, path, delta, local) if config.peft_type else f"{path}.{local}"
            expected[key] = (path, target)
        if config.peft_type:  # PEFT also saves embedding layers it adapted (e.g. after a vocabulary resize)
            for local, target in site.base.state_dict(keep_vars=True).items():
                key = f"{PREFIX}{path}.base_layer.{local}"
                if key in saved:
                    expected[key] = (path, target)
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"adapter in {folder} does not fit this model: "
            + (f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}; " if missing else "")
            + (f"tensors for modules this model lacks {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}; "
               if unexpected else "")
            + "was it saved for a different base model?"
        )
    for key, (path, target) in expected.items():
        value = saved[key]
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"adapter tensor {key} has shape {tuple(value.shape)} but module {path} of this model needs "
                f"{tuple(target.shape)}: the adapter was saved for a different base model (or a different rank)"
            )
        with torch.no_grad():
            target.copy_(value.to(target.dtype))


def load_adapter(
    model: nn.Module, path: str | os.PathLike, name: str = "default", is_trainable: bool = False
) -> nn.Module:
    """Attach the adapter saved in ``path`` (leantune's or HF PEFT's format) as ``name``.

    Loaded adapters are frozen unless ``is_trainable``; on any error the model is
    left as it was.
    """
    folder = Path(path)
    _check_folder(folder)
    config = read_adapter_config(folder)
    saved = load_file(str(folder / WEIGHTS))
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    adapt(model, config, name=name, _strict_heads=False)
    try:
        _fill_tensors(model, name, config, saved, folder)
    except BaseException:
        delete_adapter(model, name)
        for n, p in model.named_parameters():
            p.requires_grad_(flags.get(n, p.requires_grad))
        raise
    for _, _, delta in adapter_paths(model, name):
        for p in delta.parameters():
            p.requires_grad_(is_trainable)
    return model
