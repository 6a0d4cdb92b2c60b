"""Causal-LM SFT and token classification end to end; a plain nn.Module through the Python API."""

from __future__ import annotations

import math
import random

import pytest
import torch
from torch import nn
from transformers import AutoTokenizer, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from leantune.engine import causal_lm_loss
from leantune.train.config import ConfigError, TaskSection
from leantune.train.logs import read_metrics
from leantune.train.runner import train
from leantune.train.tasks import IGNORE, CausalLM, TokenClassification, check_packing

from .train_helpers import (
    FILLER,
    NEGATIVE,
    POSITIVE,
    seqcls_config,
    single_thread,
    tiny_bert_dir,
    tiny_gpt2_dir,
    write_jsonl,
)


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def train_losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def sft_rows(n: int) -> list[dict[str, str]]:
    rng = random.Random(0)
    words = POSITIVE + NEGATIVE
    rows = []
    for _ in range(n):
        w = rng.choice(words)
        rows.append({"prompt": f"is {w} good or bad ?", "response": "good" if w in POSITIVE else "bad"})
    return rows


def causal(tokenizer, **section) -> CausalLM:
    return CausalLM(TaskSection(type="causal-lm", **section), tokenizer, {"prompt": "prompt", "response": "response"})


def test_sft_loss_counts_response_tokens_only_with_and_without_chat_template():
    row = {"prompt": "is it good ?", "response": "very good"}
    for chat in (True, False):
        tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir(chat=chat))
        example = causal(tok, max_length=64).encode(row)
        prompt_len = example["labels"].count(IGNORE)
        assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:] and IGNORE not in example["labels"][prompt_len:]
        assert tok.decode(example["input_ids"][prompt_len:]) == "very good [SEP]"  # the response and EOS are learned
        prompt = tok.decode(example["input_ids"][:prompt_len])
        assert ("assistant" in prompt) == chat, prompt  # the template's generation prompt is not learned
        assert prompt.startswith("< | user | >" if chat else "[CLS]")


def test_sft_truncation_keeps_the_response_and_packing_keeps_every_token():
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir())
    long = {"prompt": " ".join(["word"] * 40), "response": "the end"}
    example = causal(tok, max_length=16, chat_template=False).encode(long)
    assert len(example["input_ids"]) == 16 and tok.decode(example["input_ids"][-3:]) == "the end [SEP]"
    rows = sft_rows(10)
    plain = [causal(tok, max_length=16).encode(r) for r in rows]
    packed = causal(tok, max_length=16, packing=True).examples(rows)
    assert [len(p["input_ids"]) for p in packed] == [16] * len(packed) and "attention_mask" not in packed[0]
    n = sum(len(e["input_ids"]) for e in plain)
    assert [i for p in packed for i in p["labels"]][:n] == [i for e in plain for i in e["labels"]]
    assert [i for p in packed for i in p["input_ids"]][:n] == [i for e in plain for i in e["input_ids"]]
    tail = [i for p in packed for i in p["labels"]][n:]
    assert len(tail) < 16 and set(tail) <= {IGNORE}, "the last row is filled with unlabelled padding"
    # positions restart at every example (and at the padding): that is what keeps attention within one
    assert [i for p in packed for i in p["position_ids"]][:n] == [i for e in plain for i in range(len(e["input_ids"]))]


def test_packed_rows_give_each_example_the_loss_it_has_alone():
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir())
    model = GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir()).eval()
    check_packing(model)
    rows = sft_rows(6)
    task = causal(tok, max_length=64, packing=True)
    packed = task.collate(list(task.examples(rows)))
    alone = [task.collate([task.encode(r)]) for r in rows]
    with torch.no_grad():
        total = task.loss(model, packed) * (packed["labels"][:, 1:] != IGNORE).sum()
        each = sum(task.loss(model, b) * (b["labels"][:, 1:] != IGNORE).sum() for b in alone)
    torch.testing.assert_close(total, each, rtol=1e-5, atol=1e-5)


def test_sft_loss_runs_causal_attention_without_the_padding_mask_and_loses_nothing(monkeypatch):
    # Right padding, labelled -100, sits after every real token: a causal model's real tokens never
    # attend to it, so the loss and its gradients are those of the masked run, and SDPA gets no mask.
    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir())
    task = causal(tok, max_length=64)
    rows = [{"prompt": "good" + " very" * n, "response": "yes" + " indeed" * (3 - n)} for n in (0, 2, 5)]
    batch = task.collate([task.encode(r) for r in rows])
    assert (batch["attention_mask"] == 0).any(), "the rows differ in length, so the batch is padded"
    masks = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        masks.append(kwargs.get("attn_mask") is not None)
        return sdpa(*args, **kwargs)

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa"))
    for model in (GPT2LMHeadModel.from_pretrained(tiny_gpt2_dir(), attn_implementation="sdpa"), llama):
        masked = causal_lm_loss(model, batch["input_ids"], batch["labels"], attention_mask=batch["attention_mask"])
        want = torch.autograd.grad(masked, [p for p in model.parameters() if p.requires_grad])
        masks.clear()
        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
        loss = task.loss(model, batch)
        monkeypatch.undo()
        got = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
        assert masks and not any(masks), type(model).__name__
        torch.testing.assert_close(loss, masked, rtol=1e-5, atol=1e-6)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


def test_packing_is_refused_for_a_model_that_attends_across_examples():
    class RunningMean(nn.Module):  # every position sees every earlier token, whatever position_ids say
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.head = nn.Embedding(32, 8), nn.Linear(8, 32)

        def forward(self, input_ids, position_ids=None, use_cache=None):
            h = self.embed(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1)[:, None]
            return self.head(h)

    with pytest.raises(ConfigError, match="task.packing: RunningMean lets packed examples attend to each other"):
        check_packing(RunningMean())


def test_causal_lm_sft_trains_and_reports_perplexity(tmp_path):
    train_file = write_jsonl(tmp_path / "sft.jsonl", sft_rows(48))
    config = {
        "model": str(tiny_gpt2_dir(chat=True)),
        "task": {"type": "causal-lm", "max_length": 32},
        "data": {"train": str(train_file), "eval": str(train_file), "max_eval_samples": 16},
        "method": {"name": "lora", "r": 4, "targets": ["c_attn", "c_fc"], "modules_to_save": ["ln_f"]},
        "training": {"max_steps": 24, "batch_size": 8, "learning_rate": 5e-2, "log_every": 4, "eval_every": 12},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    result = train(None, config)
    losses = train_losses(tmp_path / "run")
    # A random 32-wide GPT-2 starts near-uniform over 30k tokens (loss ~ ln 30522 = 10.3) and moves slowly.
    assert losses[-1] < losses[0] - 0.3, losses
    evals = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "eval"]
    assert len(evals) == 2 and evals[1] < evals[0]
    assert set(result.metrics) == {"loss", "perplexity", "token_accuracy"}
    assert result.metrics["perplexity"] == pytest.approx(math.exp(result.metrics["loss"]))
    assert result.best_metric == "loss" and result.best_step == 24  # lower is better for a loss


def tagged_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = rng.choices(POSITIVE + NEGATIVE + FILLER, k=6)
        tags = ["POS" if w in POSITIVE else "NEG" if w in NEGATIVE else "O" for w in words]
        rows.append({"words": words, "ner": tags})
    return rows


def test_token_classification_labels_first_subtokens_and_trains(tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir())
    task = TokenClassification(TaskSection(type="token-cls", max_length=32), tok, {"tokens": "words", "tags": "ner"})
    task.fit([{"words": ["unbelievably", "good"], "ner": ["O", "POS"]}])
    example = task.encode({"words": ["unbelievably", "good"], "ner": ["O", "POS"]})
    pieces = tok.convert_ids_to_tokens(example["input_ids"])
    assert len(pieces) > 4, pieces  # [CLS] + several pieces for "unbelievably" + good + [SEP]
    assert example["labels"] == [IGNORE, 0] + [IGNORE] * (len(pieces) - 4) + [1, IGNORE]
    config = {
        "model": str(tiny_bert_dir()),
        "task": {"type": "token-cls", "max_length": 16},
        "data": {"train": str(write_jsonl(tmp_path / "t.jsonl", tagged_rows(64, 0))),
                 "eval": str(write_jsonl(tmp_path / "e.jsonl", tagged_rows(16, 1))),
                 "columns": {"tokens": "words", "tags": "ner"}},
        "method": {"name": "lora", "r": 4, "targets": ["query", "value"]},
        "training": {"max_steps": 20, "batch_size": 8, "learning_rate": 3e-2, "log_every": 5},
        "output": {"dir": str(tmp_path / "run"), "progress": False},
    }
    result = train(None, config)
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < 0.5 * losses[0], losses
    assert result.metrics["accuracy"] > 0.9, result.metrics


class BagOfWords(nn.Module):
    """Not a transformers model: takes the tokenizer's outputs, returns logits."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, 16)
        self.proj = nn.Linear(16, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, input_ids, attention_mask, **_):
        mask = attention_mask.unsqueeze(-1).float()
        return self.out(torch.tanh(self.proj((self.emb(input_ids) * mask).sum(1) / mask.sum(1))))


def test_any_module_trains_through_the_python_api(tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir())
    model = BagOfWords(tok.vocab_size)
    frozen = model.emb.weight.detach().clone()
    config = seqcls_config(tmp_path / "run", max_steps=24, learning_rate=5e-2, log_every=4)
    del config["model"]
    config["method"] = {"name": "lora", "r": 4, "targets": ["proj"], "modules_to_save": ["out"]}
    result = train(model, config, tokenizer=tok)
    losses = train_losses(tmp_path / "run")
    assert losses[-1] < 0.7 * losses[0], losses
    assert result.metrics["accuracy"] > 0.8 and torch.equal(model.emb.weight, frozen)
