"""``torchrun`` with two CPU processes (DDP over gloo): the same run as one process with the same global batch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from leantune.train.logs import read_metrics
from leantune.train.runner import train

from .train_helpers import seqcls_config, single_thread, subprocess_env


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    config = seqcls_config(tmp_path / "ddp", max_steps=4, batch_size=4, eval_every=2, save_every=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "leantune.cli", "train", str(path)],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 steps on 2 x cpu" in proc.stderr and proc.stderr.count("leantune train: done") == 1
    records = read_metrics(tmp_path / "ddp" / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)], "only rank 0 writes"
    assert sorted(p.name for p in (tmp_path / "ddp" / "checkpoints").iterdir()) == ["step-000002", "step-000004"]

    # Rank r takes every other example of the shuffled epoch, so 2 x 4 covers the same 8 examples as 1 x 8.
    train(None, config, overrides=[f"output.dir={tmp_path / 'one'}", "training.batch_size=8"])
    ddp = load_file(tmp_path / "ddp" / "adapter" / "adapter_model.safetensors")
    one = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert ddp.keys() == one.keys()
    for key in ddp:
        assert torch.allclose(ddp[key], one[key], rtol=1e-4, atol=1e-6), key
    assert any((t != 0).any() for k, t in ddp.items() if "lora_B" in k), "the adapter trained"
