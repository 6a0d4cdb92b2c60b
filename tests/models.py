"""Tiny models built from configs (random weights, seconds on a CPU)."""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 96


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> nn.Module:
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert_cls() -> nn.Module:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert-cls": tiny_bert_cls}
TASKS = {"llama": "causal-lm", "gpt2": "causal-lm", "bert-cls": "seq-cls"}


def batch(kind: str, n: int = 4, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    """A model-input dict with labels for ``kind``."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    out["labels"] = torch.randint(0, 3, (n,), generator=g) if kind == "bert-cls" else ids.clone()
    return out


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**{k: v for k, v in inputs.items() if k != "labels"}).logits.float()


class ConvNet(nn.Module):
    """Every weight-site kind that is not in the transformers models above."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.conv1 = nn.Conv1d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 5, 3, stride=2, padding=1)
        self.lin = nn.Linear(6, 4)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.emb(ids).transpose(1, 2)).mean(-1)
        return self.lin(h) + self.conv2(img).mean((-1, -2))[:, :4]
