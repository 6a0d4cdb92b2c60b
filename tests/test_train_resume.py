"""Checkpoints: a run stopped part-way and resumed ends bit-identical to one that never stopped."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from leantune.train.loop import Callback, StepInfo
from leantune.train.runner import train

from .train_helpers import seqcls_config, single_thread

# Dropout in the adapter (RNG), accumulation, warm-up + cosine, evaluation, more than two epochs of data.
TRAINING = {"max_steps": 12, "grad_accum": 2, "batch_size": 8, "warmup_steps": 2, "schedule": "cosine",
            "eval_every": 4, "save_every": 5, "keep_checkpoints": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def run_config(out):
    raw = seqcls_config(out, **TRAINING)
    raw["method"]["dropout"] = 0.2
    return raw


class StopAt(Callback):
    """Stops the run after ``step``; records that gradients are still there for adaptive methods."""

    def __init__(self, step: int) -> None:
        self.step, self.saw_grads = step, []

    def on_step_end(self, info: StepInfo) -> None:
        grads = [p.grad for p in info.model.parameters() if p.requires_grad]
        self.saw_grads.append(all(g is not None for g in grads))
        info.stop = info.step == self.step


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["split"], r["step"], r["loss"]) for r in records]


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    whole = train(None, run_config(tmp_path / "whole"))
    stopper = StopAt(7)
    part = train(None, run_config(tmp_path / "part"), callbacks=[stopper])
    assert part.stopped and part.step == 7 and all(stopper.saw_grads)
    assert [p.name for p in (tmp_path / "part" / "checkpoints").iterdir()] == ["step-000007"]
    assert not (tmp_path / "part" / "adapter").exists(), "a stopped run has a checkpoint, not a final adapter"
    resumed = train(None, run_config(tmp_path / "part"), resume=True)
    assert not resumed.stopped and resumed.step == whole.step == 12
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 2 * 2 * 2 + 2  # A, B on query/value of 2 layers; the head
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(tmp_path / "part") == losses(tmp_path / "whole"), "metrics.jsonl reads as one run"
    assert resumed.metrics == whole.metrics and resumed.best_step == whole.best_step
    assert (tmp_path / "part" / "curves.png").stat().st_size > 0
