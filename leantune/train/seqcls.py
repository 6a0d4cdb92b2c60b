"""Sequence classification: tokenise, batch, train, evaluate.

One small loop that any adapted (or plain) ``AutoModelForSequenceClassification``
trains in, so the demo, the quality tests and a comparison against another
library all use exactly the same data order, schedule and metrics.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from ..api import param_groups
from ..api import schedules as lt_schedules
from ..data import Split

# Padded lengths are rounded up to a multiple of this: CPU kernels are prepared once per input shape,
# which costs seconds per new shape, and this caps the shapes a run sees at max_length / 8.
PAD_MULTIPLE = 8
# Batches are drawn from windows of this many batches sorted by length, so little compute goes to padding
# while the order stays random (the idea of transformers' LengthGroupedSampler).
LENGTH_GROUP = 50


@dataclass(frozen=True)
class TrainConfig:
    """How to train. ``steps`` wins over ``epochs`` when given.

    ``autocast`` (e.g. ``torch.bfloat16``) runs matmuls in lower precision: faster on GPUs
    and on CPUs with AVX512-BF16, slower on other CPUs.
    """

    lr: float = 5e-4
    batch_size: int = 32
    max_length: int = 64
    epochs: int = 1
    steps: int | None = None
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0
    group_by_length: bool = True
    autocast: torch.dtype | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.batch_size <= 0 or self.max_length <= 0 or self.epochs <= 0:
            raise ValueError(f"lr, batch_size, max_length and epochs must be positive: {self}")
        if self.steps is not None and self.steps <= 0:
            raise ValueError(f"steps must be positive, got {self.steps}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")


@dataclass(frozen=True)
class Metrics:
    """What a classifier scored on one split."""

    accuracy: float
    macro_f1: float


def encode(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids per text, truncated, not padded (padding happens per batch)."""
    return tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int, labels: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest member (rounded up to ``PAD_MULTIPLE``); the mask hides the padding."""
    width = -(-max(len(x) for x in ids) // PAD_MULTIPLE) * PAD_MULTIPLE
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    batch = {"input_ids": input_ids, "attention_mask": mask}
    if labels is not None:
        batch["labels"] = torch.tensor(list(labels), dtype=torch.long)
    return batch


def epoch_batches(lengths: Sequence[int], batch_size: int, generator: torch.Generator, group_by_length: bool) -> list[list[int]]:
    """One epoch of index batches in a random order drawn from ``generator``."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    if group_by_length:
        window = batch_size * LENGTH_GROUP
        order = [i for s in range(0, len(order), window) for i in sorted(order[s : s + window], key=lambda j: -lengths[j])]
    batches = [order[s : s + batch_size] for s in range(0, len(order), batch_size)]
    if group_by_length:
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches


def training_batches(lengths: Sequence[int], config: TrainConfig) -> list[list[int]]:
    """Every index batch of the run: ``steps`` of them, or ``epochs`` passes over the data."""
    generator = torch.Generator().manual_seed(config.seed)
    per_epoch = math.ceil(len(lengths) / config.batch_size)
    epochs = math.ceil(config.steps / per_epoch) if config.steps is not None else config.epochs
    batches = [b for _ in range(epochs) for b in epoch_batches(lengths, config.batch_size, generator, config.group_by_length)]
    return batches[: config.steps] if config.steps is not None else batches


def linear_schedule(optimizer: torch.optim.Optimizer, total_steps: int, warmup_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup_ratio`` of the steps to the full rate, then linear decay towards zero.

    Every step trains: the first has rate ``lr / warmup``, the last ``lr / (decay steps + 1)``.
    """
    warmup = int(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / (total_steps - warmup + 1))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(model: nn.Module, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_device(model).type, dtype=dtype)


def train(model: nn.Module, tokenizer, data: Split, config: TrainConfig) -> list[float]:
    """Train the parameters that require grad; return the loss of every step.

    AdamW sees only trainable parameters, so frozen base weights cost no optimizer state.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters; attach an adapter first (lt.adapt)")
    ids = encode(tokenizer, data.texts, config.max_length)
    batches = training_batches([len(x) for x in ids], config)
    optimizer = torch.optim.AdamW(param_groups(model, config.lr), weight_decay=config.weight_decay)
    scheduler = linear_schedule(optimizer, len(batches), config.warmup_ratio)
    schedules = lt_schedules(model, len(batches))  # the methods' own (rank budget, drop-and-grow, ...)
    device = _device(model)
    torch.manual_seed(config.seed)  # dropout masks
    model.train()
    losses: list[float] = []
    bar = tqdm(batches, desc="train", unit="step", disable=not config.progress, dynamic_ncols=True)
    for step, batch_idx in enumerate(bar, 1):
        batch = collate([ids[i] for i in batch_idx], tokenizer.pad_token_id, [data.labels[i] for i in batch_idx])
        batch = {k: v.to(device) for k, v in batch.items()}
        with _autocast(model, config.autocast):
            loss = model(**batch).loss
            extra = sum(s.loss_term(loss) for s in schedules)
        (loss + extra).backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        for s in schedules:
            s.after_step(step, optimizer, lambda batch=batch: _loss_of(model, batch, config.autocast))
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", refresh=False)
    for s in schedules:
        s.finish()
    model.eval()
    return losses


@torch.no_grad()
def _loss_of(model: nn.Module, batch: dict[str, torch.Tensor], autocast: torch.dtype | None) -> float:
    with _autocast(model, autocast):
        return float(model(**batch).loss)


def _sorted_batches(ids: Sequence[Sequence[int]], batch_size: int) -> Iterator[list[int]]:
    """Index batches of similar length: predictions do not depend on order, padding does."""
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for s in range(0, len(order), batch_size):
        yield order[s : s + batch_size]


@torch.no_grad()
def predict(
    model: nn.Module, tokenizer, texts: Sequence[str], batch_size: int = 64, max_length: int = 64,
    autocast: torch.dtype | None = None,
) -> list[int]:
    """The argmax class of every text, in input order."""
    ids = encode(tokenizer, texts, max_length)
    device = _device(model)
    was_training = model.training
    model.eval()
    preds = [0] * len(ids)
    for batch_idx in _sorted_batches(ids, batch_size):
        batch = collate([ids[i] for i in batch_idx], tokenizer.pad_token_id)
        with _autocast(model, autocast):
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        for i, p in zip(batch_idx, logits.argmax(-1).tolist(), strict=True):
            preds[i] = p
    model.train(was_training)
    return preds


def macro_f1(truth: Sequence[int], preds: Sequence[int]) -> float:
    """Unweighted mean of per-class F1 over the classes that occur in ``truth`` or ``preds``.

    Accuracy hides a classifier that ignores small classes; macro-F1 weighs every class equally.
    """
    if len(truth) != len(preds):
        raise ValueError(f"{len(truth)} labels but {len(preds)} predictions")
    classes = sorted(set(truth) | set(preds))
    if not classes:
        return 0.0
    scores = []
    for c in classes:
        tp = sum(1 for t, p in zip(truth, preds, strict=True) if t == c and p == c)
        fp = sum(1 for t, p in zip(truth, preds, strict=True) if t != c and p == c)
        fn = sum(1 for t, p in zip(truth, preds, strict=True) if t == c and p != c)
        scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def score(truth: Sequence[int], preds: Sequence[int]) -> Metrics:
    """Accuracy and macro-F1 of ``preds`` against ``truth``."""
    if not truth:
        raise ValueError("cannot score an empty split")
    accuracy = sum(1 for t, p in zip(truth, preds, strict=True) if t == p) / len(truth)
    return Metrics(accuracy, macro_f1(truth, preds))


def evaluate(model: nn.Module, tokenizer, data: Split, batch_size: int = 64, max_length: int = 64,
             autocast: torch.dtype | None = None) -> Metrics:
    """Accuracy and macro-F1 of ``model`` on ``data``."""
    return score(data.labels, predict(model, tokenizer, data.texts, batch_size, max_length, autocast))
