"""The run folder: checkpoints that resume exactly, and the final and best adapters.

A checkpoint holds the adapter, the optimizer, scheduler and grad-scaler states,
every rank's RNG states and the step. It is written under a temporary name and
renamed into place (``write_dir_atomically``), so a process killed mid-save
leaves the previous checkpoint whole; resuming picks the newest complete one
and sweeps away half-written leftovers.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..api import adapters
from ..storage import save_adapter, write_dir_atomically, write_json
from .config import ConfigError

TASK_FILE = "leantune_task.json"
STATE_FILE = "state.json"
TRAINER_FILE = "trainer_state.pt"
ADAPTER_DIR = "adapter"
PREFIX = "step-"
# Test hook: seconds to sleep in the middle of writing a checkpoint, so a test can kill the process there.
DELAY_ENV = "LEANTUNE_TEST_SAVE_DELAY"


@dataclass(frozen=True)
class RunDir:
    """Where each part of a run lives under ``output.dir``."""

    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def best(self) -> Path:
        return self.root / "best"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def curves(self) -> Path:
        return self.root / "curves.png"

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"


def _write_adapter_files(folder: Path, model: nn.Module, info: dict[str, Any]) -> None:
    save_adapter(model, folder)
    write_json(folder / TASK_FILE, info)


def write_adapter(dest: Path, model: nn.Module, info: dict[str, Any]) -> Path:
    """An adapter folder plus the task facts (labels) that eval and merge rebuild the model from."""
    return write_dir_atomically(dest, lambda tmp: _write_adapter_files(tmp, model, info))


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (dropout, user callbacks)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))


def save_checkpoint(run: RunDir, step: int, model: nn.Module, trainer: dict[str, Any], state: dict[str, Any],
                    info: dict[str, Any], keep: int) -> Path:
    """Write ``checkpoints/step-NNNNNN`` atomically, then drop all but the newest ``keep``.

    ``trainer`` holds the optimizer/scheduler/scaler state dicts and the RNG
    states of every rank; ``state`` the JSON-able loop state (step, best metric).
    """
    delay = float(os.environ.get(DELAY_ENV, "0"))

    def fill(tmp: Path) -> None:
        _write_adapter_files(tmp / ADAPTER_DIR, model, info)
        time.sleep(delay)
        torch.save(trainer, tmp / TRAINER_FILE)
        write_json(tmp / STATE_FILE, {"step": step, **state})

    path = write_dir_atomically(run.checkpoints / f"{PREFIX}{step:06d}", fill)
    for old in complete_checkpoints(run)[:-keep]:
        _remove(old)
    return path


def _remove(folder: Path) -> None:
    """Rename first (atomic), then delete: a kill mid-delete never leaves a half checkpoint under a real name."""
    trash = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    os.replace(folder, trash / folder.name)
    shutil.rmtree(trash, ignore_errors=True)


def complete_checkpoints(run: RunDir) -> list[Path]:
    """Finished checkpoints, oldest first (half-written ones carry a hidden temporary name)."""
    if not run.checkpoints.is_dir():
        return []
    found = [p for p in run.checkpoints.glob(f"{PREFIX}*") if p.name[len(PREFIX):].isdigit()
             and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def sweep_leftovers(run: RunDir) -> None:
    """Delete temporary folders a killed save left behind."""
    if run.checkpoints.is_dir():
        for p in run.checkpoints.glob(".*"):
            shutil.rmtree(p, ignore_errors=True)


def latest_checkpoint(run: RunDir) -> Path:
    """The newest complete checkpoint, or an error saying there is none to resume."""
    found = complete_checkpoints(run)
    if not found:
        raise ConfigError(f"--resume: no checkpoint in {run.checkpoints} to resume from; start without --resume")
    return found[-1]


def read_state(checkpoint: Path) -> dict[str, Any]:
    """The loop state saved with ``checkpoint`` (step, best metric, method)."""
    return json.loads((checkpoint / STATE_FILE).read_text())


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """Optimizer, scheduler, scaler and RNG states (tensors and plain values only: safe to load)."""
    return torch.load(checkpoint / TRAINER_FILE, weights_only=True)


def method_of(model: nn.Module) -> dict[str, Any]:
    """The method config of the model's (single) adapter, for comparing runs."""
    return next(iter(adapters(model).values())).config.to_dict()
