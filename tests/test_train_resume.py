"""Checkpoints: a run stopped part-way and resumed ends bit-identical to one that never stopped."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

import leantune as lt
from leantune.train.loop import Callback, StepInfo
from leantune.train.runner import train

from .train_helpers import seqcls_config, single_thread, tiny_bert_dir

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


# Methods whose adapter changes while training: their schedules run inside the loop and resume exactly.
SCHEDULED = {
    "adalora": {"name": "adalora", "init_r": 4, "target_r": 2, "targets": ["query", "value"]},
    "spiel": {"name": "spiel", "density": 0.1, "update_every": 3, "targets": ["query", "value"]},
    "ist": {"name": "ist", "wraps": {"method": "lora", "r": 4, "targets": ["query", "value"]}, "probe_every": 2,
            "update_layers": 1},
}


@pytest.mark.parametrize("method", sorted(SCHEDULED))
def test_methods_with_schedules_run_them_and_resume_identically(tmp_path, method):
    def config(out):
        raw = seqcls_config(out, max_steps=10, save_every=4, keep_checkpoints=1)
        raw["method"] = SCHEDULED[method]
        return raw

    whole = train(None, config(tmp_path / "whole"))
    part = train(None, config(tmp_path / "part"), callbacks=[StopAt(6)])
    assert part.stopped and part.step == 6
    train(None, config(tmp_path / "part"), resume=True)
    a = load_file(tmp_path / "whole" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "part" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.step == 10
    if method == "adalora":  # the budget pruned the total rank from 4 to 2 per module by the last step
        singular = [v for k, v in a.items() if k.endswith("lora_E")]
        assert singular and sum(int((e != 0).sum()) for e in singular) == 2 * len(singular)
    if method == "spiel":  # drop-and-grow moved the support away from its seeded random start
        fresh = lt.adapt(AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir(), num_labels=2),
                         lt.SpIEL(density=0.1, update_every=3, targets=["query", "value"], task="seq-cls"))
        lt.save_adapter(fresh, tmp_path / "fresh")
        start = load_file(tmp_path / "fresh" / "adapter_model.safetensors")
        moved = [k for k in a if "ind" in k and not torch.equal(a[k], start[k])]
        assert moved and [k for k in a if "ind" in k] == sorted(k for k in start if "ind" in k)
