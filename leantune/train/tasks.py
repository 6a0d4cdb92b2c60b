"""Tasks: how rows become model inputs, what the loss is, and which metrics judge a model.

A task knows its columns (roles), its transformers auto class, how to encode one
row, how to batch, its training loss and its evaluation. The loop knows none of
this, so a new task is one class here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..engine import causal_lm_loss
from .config import ConfigError, TaskSection
from .data import Row
from .distributed import SHARDED_LOSS
from .seqcls import macro_f1

IGNORE = -100
Example = dict[str, Any]


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a transformers output, a tuple whose first item they are, or a bare tensor."""
    if isinstance(output, torch.Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    return output[0]


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The batch without its labels: the loss is the task's, so any module that takes ids works.
    Packed rows (``position_ids``) run without a key/value cache: transformers separates packed
    sequences only when it builds no cache."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    return {**inputs, "use_cache": False} if "position_ids" in batch else inputs


def _label_key(value: Any) -> Any:
    """``"1"`` and ``1`` are the same label (CSV gives strings, JSON ints)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return value


def _label_vocab(given: list | None, found: Iterable[Any]) -> list[Any]:
    if given:
        return [_label_key(v) for v in given]
    values = set(found)
    try:
        return sorted(values)
    except TypeError:  # ints and strings mixed: order by text
        return sorted(values, key=str)


class Encoded(Sequence):
    """Rows encoded on demand: a large file costs no tokenisation up front."""

    def __init__(self, rows: list[Row], encode) -> None:
        self.rows, self.encode = rows, encode

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        return self.encode(self.rows[i])


def pad(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad list fields to the batch's longest (labels with -100, ids with ``pad_id``); ints stack."""
    out = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        if not isinstance(values[0], list):
            out[key] = torch.tensor(values, dtype=torch.long)
            continue
        fill = {"labels": IGNORE, "input_ids": pad_id}.get(key, 0)
        width = max(len(v) for v in values)
        out[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)
    return out


class Task:
    """The interface every task implements; the classification helpers live here too."""

    name: ClassVar[str]
    required: ClassVar[tuple[str, ...]]
    optional: ClassVar[tuple[str, ...]] = ()
    auto_class: ClassVar[str]
    metric_names: ClassVar[tuple[str, ...]] = ("loss", "accuracy", "macro_f1")
    main_metric: ClassVar[str]

    def __init__(self, section: TaskSection, tokenizer: Any, columns: dict[str, str]) -> None:
        self.section, self.tokenizer, self.columns = section, tokenizer, columns
        self.labels: list[Any] = []

    def fit(self, train: list[Row], others: Sequence[list[Row]] = ()) -> None:
        """Learn what the data implies (the label set) and check the other splits against it."""

    def model_kwargs(self) -> dict[str, Any]:
        """Extra ``from_pretrained`` arguments (label count and names)."""
        return {}

    def info(self) -> dict[str, Any]:
        """What eval and merge need to rebuild the model: written beside every adapter."""
        return {"task": self.name, "labels": self.labels, "max_length": self.section.max_length}

    def encode(self, row: Row) -> Example:
        raise NotImplementedError

    def examples(self, rows: list[Row]) -> Sequence[Example]:
        return Encoded(rows, self.encode)

    def collate(self, examples: list[Example]) -> dict[str, torch.Tensor]:
        return pad(examples, self.tokenizer.pad_token_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = logits_of(model(**model_inputs(batch)))
        return F.cross_entropy(logits.float().flatten(0, -2), batch["labels"].flatten(), ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        """Loss, accuracy and macro-F1 over every labelled position."""
        loss_sum, truth, preds = 0.0, [], []
        for batch in batches:
            logits = logits_of(model(**model_inputs(batch))).float().flatten(0, -2)
            labels = batch["labels"].flatten()
            keep = labels != IGNORE
            loss_sum += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            truth += labels[keep].tolist()
            preds += logits.argmax(-1)[keep].tolist()
        if not truth:
            raise ValueError("the evaluation data has no labelled examples")
        accuracy = sum(t == p for t, p in zip(truth, preds, strict=True)) / len(truth)
        return {"loss": loss_sum / len(truth), "accuracy": accuracy, "macro_f1": macro_f1(truth, preds)}

    # --- label helpers for the classification tasks ---------------------------------------------
    def _label_id(self, value: Any, row: Row) -> int:
        key = _label_key(value)
        try:
            return self.label_ids[key]
        except KeyError:
            raise ConfigError(f"label {value!r} (row {row}) is not among the labels {self.labels}; "
                              "set task.labels to the full list") from None

    def _set_labels(self, given: list | None, found: Iterable[Any]) -> None:
        self.labels = _label_vocab(given, found)
        self.label_ids = {v: i for i, v in enumerate(self.labels)}

    def _label_kwargs(self) -> dict[str, Any]:
        id2label = {i: str(v) for i, v in enumerate(self.labels)}
        return {"num_labels": len(self.labels), "id2label": id2label, "label2id": {v: i for i, v in id2label.items()}}


class SequenceClassification(Task):
    """One label per text (or text pair); metrics: accuracy and macro-F1."""

    name = "seq-cls"
    required = ("text", "label")
    optional = ("text_pair",)
    auto_class = "AutoModelForSequenceClassification"
    main_metric = "accuracy"

    def fit(self, train: list[Row], others: Sequence[list[Row]] = ()) -> None:
        column = self.columns["label"]
        self._set_labels(self.section.labels, (_label_key(r[column]) for r in train))
        for rows in (train, *others):
            for row in rows:
                self._label_id(row[column], row)

    def model_kwargs(self) -> dict[str, Any]:
        return self._label_kwargs()

    def encode(self, row: Row) -> Example:
        pair = row[self.columns["text_pair"]] if "text_pair" in self.columns else None
        enc = self.tokenizer(str(row[self.columns["text"]]), pair, truncation=True,
                             max_length=self.section.max_length)
        return {**enc, "labels": self._label_id(row[self.columns["label"]], row)}


class TokenClassification(Task):
    """A tag per word (NER, POS); the first sub-token of each word carries it; metrics over tagged tokens."""

    name = "token-cls"
    required = ("tokens", "tags")
    auto_class = "AutoModelForTokenClassification"
    main_metric = "accuracy"

    def _words(self, row: Row, role: str) -> list[Any]:
        value = row[self.columns[role]]
        return value.split() if isinstance(value, str) else list(value)

    def fit(self, train: list[Row], others: Sequence[list[Row]] = ()) -> None:
        self._set_labels(self.section.labels, (_label_key(t) for r in train for t in self._words(r, "tags")))
        for rows in (train, *others):
            for row in rows:
                words, tags = self._words(row, "tokens"), self._words(row, "tags")
                if len(words) != len(tags):
                    raise ConfigError(f"row {row} has {len(words)} tokens but {len(tags)} tags")
                for tag in tags:
                    self._label_id(tag, row)

    def model_kwargs(self) -> dict[str, Any]:
        return self._label_kwargs()

    def encode(self, row: Row) -> Example:
        words, tags = self._words(row, "tokens"), self._words(row, "tags")
        enc = self.tokenizer([str(w) for w in words], is_split_into_words=True, truncation=True,
                             max_length=self.section.max_length)
        labels, previous = [], None
        for word in enc.word_ids():
            labels.append(IGNORE if word is None or word == previous else self._label_id(tags[word], row))
            previous = word
        return {**enc, "labels": labels}


class CausalLM(Task):
    """Supervised fine-tuning on prompt → response pairs: the loss counts response tokens only.

    Pairs go through the tokenizer's chat template when it has one (and
    ``task.chat_template``); otherwise prompt and response are joined, with BOS
    before and EOS after. Metrics: loss, perplexity and token accuracy on responses.
    """

    name = "causal-lm"
    required = ("prompt", "response")
    auto_class = "AutoModelForCausalLM"
    metric_names = ("loss", "perplexity", "token_accuracy")
    main_metric = "loss"

    def _texts(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if self.section.chat_template and getattr(tok, "chat_template", None):
            user = [{"role": "user", "content": prompt}]
            head = tok.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template([*user, {"role": "assistant", "content": response}], tokenize=False)
            tail = full[len(head):] if full.startswith(head) else response + (tok.eos_token or "")
            return tok(head, add_special_tokens=False)["input_ids"], tok(tail, add_special_tokens=False)["input_ids"]
        bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
        return (bos + tok(prompt, add_special_tokens=False)["input_ids"],
                tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])

    def encode(self, row: Row) -> Example:
        prompt, response = self._texts(str(row[self.columns["prompt"]]), str(row[self.columns["response"]]))
        limit = self.section.max_length
        keep = min(len(prompt), max(limit - len(response), limit // 2))  # long responses leave half to the prompt
        prompt, response = prompt[len(prompt) - keep:], response[: limit - keep]
        return {"input_ids": prompt + response, "attention_mask": [1] * (len(prompt) + len(response)),
                "labels": [IGNORE] * len(prompt) + response}

    def examples(self, rows: list[Row]) -> Sequence[Example]:
        if not self.section.packing:
            return Encoded(rows, self.encode)
        # Positions restart at every example, so attention stays within it (transformers reads a
        # position that does not follow on as a new sequence); the last row is filled with padding
        # that is a sequence of its own. Rows are full, so no attention mask is needed.
        ids: list[int] = []
        labels: list[int] = []
        positions: list[int] = []
        for row in rows:
            example = self.encode(row)
            ids += example["input_ids"]
            labels += example["labels"]
            positions += list(range(len(example["input_ids"])))
        n = self.section.max_length
        short = -len(ids) % n
        ids += [self.tokenizer.pad_token_id] * short
        labels += [IGNORE] * short
        positions += list(range(short))
        return [{"input_ids": ids[s:s + n], "position_ids": positions[s:s + n], "labels": labels[s:s + n]}
                for s in range(0, len(ids), n)]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sharded = getattr(model, SHARDED_LOSS, None)
        if sharded is not None:  # FSDP2: the chunked loss, run as a forward method so the root's shards gather
            return sharded(batch["input_ids"], batch["labels"], **_extra_inputs(batch))
        lean = not isinstance(model, DistributedDataParallel) and hasattr(model, "get_decoder")
        if lean:  # the engine's chunked loss never materialises the full logits
            return causal_lm_loss(model, batch["input_ids"], batch["labels"], **_extra_inputs(batch))
        logits = logits_of(model(**model_inputs(batch)))
        return F.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch["labels"][:, 1:].flatten(),
                               ignore_index=IGNORE)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
        loss_sum, correct, count = 0.0, 0, 0
        for batch in batches:
            logits = logits_of(model(**model_inputs(batch)))[:, :-1].float().flatten(0, 1)
            labels = batch["labels"][:, 1:].flatten()
            keep = labels != IGNORE
            loss_sum += F.cross_entropy(logits, labels, ignore_index=IGNORE, reduction="sum").item()
            correct += (logits.argmax(-1)[keep] == labels[keep]).sum().item()
            count += int(keep.sum())
        if not count:
            raise ValueError("the evaluation data has no response tokens")
        loss = loss_sum / count
        return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / count}


def _extra_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The decoder's inputs besides the ids for the training loss: packed rows' positions, but
    not the padding mask. :func:`pad` pads on the right and labels the padding -100, and in a
    causal model no token attends to a later one, so the mask changes nothing the loss reads.
    Without it transformers runs SDPA with ``is_causal`` instead of building a full mask, which
    cost 150 µs against 60 µs per layer forward in the compiled 1B step (H100; device log,
    session 15), and ``lt.compile`` can skip the mask (engine/causal_mask.py)."""
    return {k: v for k, v in model_inputs(batch).items() if k not in ("input_ids", "attention_mask")}


@torch.no_grad()
def check_packing(model: nn.Module) -> None:
    """Refuse packing for a model that would let packed examples attend to each other: the
    second of two packed sequences must give the logits it gives alone."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        first, second = torch.tensor([[5, 6, 7, 8]], device=device), torch.tensor([[9, 10, 11]], device=device)
        packed = torch.cat([first, second], 1)
        positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]], device=device)
        together = logits_of(model(input_ids=packed, position_ids=positions, use_cache=False))[:, 4:].float()
        alone = logits_of(model(input_ids=second, position_ids=positions[:, 4:], use_cache=False)).float()
    finally:
        model.train(was_training)
    if not torch.allclose(together, alone, rtol=1e-2, atol=1e-3 * (1 + alone.abs().max().item())):
        raise ConfigError(f"task.packing: {type(model).__name__} lets packed examples attend to each other (its "
                          "attention does not treat restarting position_ids as a new sequence); set task.packing: "
                          "false")


TASKS: dict[str, type[Task]] = {t.name: t for t in (SequenceClassification, CausalLM, TokenClassification)}
