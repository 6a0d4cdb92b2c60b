"""The loop's parts: schedules, the data order that makes resume and DDP exact, mixed precision."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from leantune.train.loop import Loop, Order, lr_schedule
from leantune.train.runner import train

from .train_helpers import seqcls_config, single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


@pytest.mark.parametrize("kind", ["linear", "cosine", "constant"])
def test_schedules_warm_up_then_follow_their_shape(kind):
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = lr_schedule(optimizer, kind, total=10, warmup=4)
    factors = []
    for _ in range(11):
        factors.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert factors[:5] == [0.0, 0.25, 0.5, 0.75, 1.0]
    tail = {"linear": [1 - s / 6 for s in range(7)], "cosine": [0.5 * (1 + math.cos(math.pi * s / 6)) for s in range(7)],
            "constant": [1.0] * 7}[kind]
    assert factors[4:] == pytest.approx(tail)


def test_order_is_a_pure_function_of_seed_epoch_and_rank():
    one = Order(10, batch_size=4, seed=3, rank=0, world=1)
    assert one.per_epoch == 3
    epoch0 = [one.batch(m) for m in range(3)]
    assert sorted(i for b in epoch0 for i in b) == list(range(10)) and [len(b) for b in epoch0] == [4, 4, 2]
    assert [one.batch(m) for m in range(3, 6)] != epoch0, "each epoch reshuffles"
    assert Order(10, 4, 3, 0, 1).batch(4) == one.batch(4), "position m alone decides the batch (resume)"
    ranks = [Order(10, 2, 3, r, 2) for r in (0, 1)]
    assert sorted(ranks[0].batch(0) + ranks[1].batch(0)) == sorted(epoch0[0]), "ranks split the global batch"


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_fp32_adapter_weights(tmp_path, precision):
    result = train(None, seqcls_config(tmp_path / "run", max_steps=3, precision=precision))
    assert math.isfinite(result.metrics["loss"])
    weights = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    assert any((t != 0).any() for k, t in weights.items() if "lora_B" in k)


def test_a_step_counts_the_unpadded_tokens_of_its_micro_batches_on_the_host(tmp_path, monkeypatch):
    seen: list[tuple[int, int]] = []  # (tokens the step reported, non-pad tokens of what the model was fed)
    fed: list[torch.Tensor] = []
    original_batch, original_step = Loop._batch, Loop.train_step

    def batch(self, indices):
        moved, tokens = original_batch(self, indices)
        fed.append(moved["attention_mask"])
        return moved, tokens

    def step(self):
        fed.clear()
        loss, samples, tokens = original_step(self)
        seen.append((tokens, sum(int(m.sum()) for m in fed)))
        return loss, samples, tokens

    monkeypatch.setattr(Loop, "_batch", batch)
    monkeypatch.setattr(Loop, "train_step", step)
    train(None, seqcls_config(tmp_path / "run", max_steps=3, grad_accum=2))
    assert len(seen) == 3 and all(reported == counted > 0 for reported, counted in seen)
    assert any(counted < 2 * 8 * 16 for _, counted in seen), "padding is not counted"
