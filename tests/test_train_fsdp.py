"""``torchrun`` with two CPU processes under FSDP2 (gloo): rank 0 alone writes, the adapter is the one a
single process trains on the same global batch, and a run resumed from a mid-run checkpoint ends the same."""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from leantune.train import runner
from leantune.train.config import ConfigError
from leantune.train.distributed import Dist
from leantune.train.logs import read_metrics
from leantune.train.runner import train

from .train_helpers import _root, _tokenizer, seqcls_config, single_thread, subprocess_env, write_jsonl

WORDS = ["good", "bad", "film", "movie", "great", "awful", "nice", "poor"]


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


@functools.cache
def tiny_llama_dir() -> Path:
    """A random 2-layer Llama (two ``LlamaDecoderLayer`` blocks to shard) with MiniLM's word pieces."""
    out = _root() / "tiny-llama"
    tok = _tokenizer()
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@functools.cache
def pair_files() -> tuple[Path, Path]:
    """Prompt/response pairs of one word piece per word: every example has the same length and the same
    number of response tokens, so the mean loss over a rank's rows is the mean over the global batch."""
    rows = [{"prompt": f"{WORDS[i % 8]} {WORDS[(i // 8) % 8]} {WORDS[(i * 3) % 8]}",
             "response": f"{WORDS[(i + 1) % 8]} {WORDS[i % 8]}"} for i in range(64)]
    return write_jsonl(_root() / "pairs-train.jsonl", rows), write_jsonl(_root() / "pairs-eval.jsonl", rows[:16])


def lm_config(out: Path, **training: Any) -> dict[str, Any]:
    train_file, eval_file = pair_files()
    return {
        "model": str(tiny_llama_dir()),
        "task": {"type": "causal-lm", "max_length": 16},
        "data": {"train": str(train_file), "eval": str(eval_file), "columns": {"prompt": "prompt", "response": "response"}},
        "method": {"name": "lora", "r": 4, "alpha": 8, "targets": "all-linear"},
        "training": {"max_steps": 4, "batch_size": 8, "learning_rate": 1e-2, "log_every": 1, **training},
        "output": {"dir": str(out), "progress": False},
    }


def torchrun(config: dict[str, Any], path: Path, *extra: str) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "leantune.cli", "train", str(path), *extra],
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)


def test_fsdp2_matches_one_process_and_resumes_exactly(tmp_path):
    # 2 ranks x 2 micro-batches of 2 (every micro-batch reduce-scatters into the shards) = 8 examples a step.
    config = lm_config(tmp_path / "fsdp", batch_size=2, grad_accum=2, save_every=2, eval_every=2,
                       distributed="fsdp2")
    proc = torchrun(config, tmp_path / "run.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "4 steps on 2 x cpu (fsdp2)" in proc.stderr and proc.stderr.count("leantune train: done") == 1
    fsdp = tmp_path / "fsdp"
    records = read_metrics(fsdp / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in records] == [
        ("train", 1), ("train", 2), ("eval", 2), ("train", 3), ("train", 4), ("eval", 4)], "only rank 0 writes"
    assert sorted(p.name for p in (fsdp / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert not list(tmp_path.glob("**/.*.tmp-*")), "no rank left a half-written folder"

    # Rank r takes every other example of the shuffled epoch, so 2 x 2 x 2 covers the same 8 examples as 1 x 8.
    train(None, config, overrides=[f"output.dir={tmp_path / 'one'}", "training.batch_size=8",
                                   "training.grad_accum=1", "training.distributed=auto"])
    one = tmp_path / "one"
    for folder in ("adapter", "best", "checkpoints/step-000004/adapter"):
        assert sorted(p.name for p in (fsdp / folder).iterdir()) == sorted(p.name for p in (one / folder).iterdir())
        for name in ("adapter_config.json", "leantune_config.json"):
            assert json.loads((fsdp / folder / name).read_text()) == json.loads((one / folder / name).read_text())
    sharded = load_file(fsdp / "adapter" / "adapter_model.safetensors")
    single = load_file(one / "adapter" / "adapter_model.safetensors")
    assert sharded.keys() == single.keys()
    # fp32 throughout; the runs differ only in summation order (two half-batch gradients reduce-scattered
    # vs one batch), ~1e-7 relative. Adam's update lr·m/(√v+ε) passes that on unchanged except where a
    # gradient is near ε (1e-8) and mostly rounding: there it can move the update by ~1e-3·lr per step.
    # So: nearly every entry agrees to 1e-6, none by more than 1e-3·lr·steps (measured: 3 of 4096 entries
    # above 1e-6, the worst 6.8e-6, all in layer 0's q/k factors, whose gradients are the smallest).
    diffs = torch.cat([(sharded[k] - single[k]).abs().flatten() for k in sharded])
    assert (diffs > 1e-6).float().mean() < 0.01, (diffs > 1e-6).sum()
    assert diffs.max() < 1e-3 * 1e-2 * 4, diffs.max()
    for a, b in zip(records, read_metrics(one / "metrics.jsonl"), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6), (a, b)  # the mean over ranks is the global mean
    assert any((t != 0).any() for k, t in sharded.items() if "lora_B" in k), "the adapter trained"

    # The optimizer state is saved as one process saves it: numbered parameters, full tensors.
    opt_fsdp = torch.load(fsdp / "checkpoints/step-000004/trainer_state.pt", weights_only=True)["optimizer"]
    opt_one = torch.load(one / "checkpoints/step-000004/trainer_state.pt", weights_only=True)["optimizer"]
    assert opt_fsdp["param_groups"] == opt_one["param_groups"]
    assert opt_fsdp["state"].keys() == opt_one["state"].keys()
    for i, entry in opt_one["state"].items():
        for key, value in entry.items():
            assert opt_fsdp["state"][i][key].shape == value.shape
            assert torch.allclose(opt_fsdp["state"][i][key], value, rtol=1e-4, atol=1e-8), (i, key)

    # Resume from the step-2 checkpoint under FSDP2: the same final adapter as the uninterrupted run.
    resumed = tmp_path / "resumed"
    shutil.copytree(fsdp, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step-000004")
    shutil.rmtree(resumed / "adapter")
    proc = torchrun({**config, "output": {**config["output"], "dir": str(resumed)}}, tmp_path / "resume.yaml",
                    "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming at step 2" in proc.stderr
    again = load_file(resumed / "adapter" / "adapter_model.safetensors")
    worst = max((again[k] - sharded[k]).abs().max().item() for k in sharded)
    assert worst == 0.0, worst
    assert [(r["split"], r["step"]) for r in read_metrics(resumed / "metrics.jsonl")] == [
        (r["split"], r["step"]) for r in records]


def test_fsdp2_trains_a_classification_head_in_the_root_group(tmp_path):
    """seq-cls: the new head (a trainable copy outside the blocks) lives in the root's FSDP group, which an
    evaluation leaves gathered; the checkpoint after it must still find the optimizer's shards."""
    config = seqcls_config(tmp_path / "fsdp", max_steps=4, batch_size=4, eval_every=2, save_every=2,
                           distributed="fsdp2")
    proc = torchrun(config, tmp_path / "run.yaml")
    assert proc.returncode == 0, proc.stderr[-3000:]
    train(None, config, overrides=[f"output.dir={tmp_path / 'one'}", "training.batch_size=8",
                                   "training.distributed=auto"])
    sharded = load_file(tmp_path / "fsdp" / "adapter" / "adapter_model.safetensors")
    single = load_file(tmp_path / "one" / "adapter" / "adapter_model.safetensors")
    assert sharded.keys() == single.keys() and any("classifier" in k for k in sharded)
    for key in sharded:  # as the DDP test: summation order only, no near-ε Adam entries in 4 steps here
        assert torch.allclose(sharded[key], single[key], rtol=1e-4, atol=1e-6), key


def test_fsdp2_refuses_methods_that_reshape_their_adapter_while_training(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "setup", lambda *args: Dist(mode="fsdp2"))  # as a torchrun rank would get
    config = lm_config(tmp_path / "run", distributed="fsdp2")
    config["method"] = {"name": "adalora", "targets": "all-linear"}
    with pytest.raises(ConfigError, match="adalora changes its adapter's shape or mask"):
        train(None, config)
    assert not (tmp_path / "run").exists(), "refused before anything was written"
