"""An adapted model is a plain nn.Module: transformers' ``Trainer`` trains it, touching only the adapter."""

from __future__ import annotations

import pytest
import torch
from transformers import Trainer, TrainingArguments

import leantune as lt

from .models import VOCAB, tiny_bert_cls
from .train_helpers import single_thread


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def examples(n: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, VOCAB, (n, 10), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(10, dtype=torch.long), "labels": int(ids[i, 1] % 3)}
            for i in range(n)]


def test_adapted_model_trains_under_transformers_trainer(tmp_path):
    model = lt.adapt(tiny_bert_cls(), lt.LoRA(r=4, alpha=8, targets=["query", "value"], task="seq-cls"))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8,
                             learning_rate=5e-2, logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=examples())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < 0.8 * losses[0], losses
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert changed == trainable and any("lora" in n or ".A" in n for n in changed), sorted(changed)
