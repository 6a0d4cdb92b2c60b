"""``leantune merge`` keeps the base's dtype and loads with plain transformers; ``export --format peft`` loads in PEFT."""

from __future__ import annotations

import shutil

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import leantune as lt
from leantune.cli import main
from leantune.train.runner import train

from .train_helpers import seqcls_config, single_thread, tiny_bert_dir, tiny_gpt2_dir, write_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    yield from single_thread()


def test_merge_writes_a_bf16_model_transformers_loads(tmp_path):
    base = tiny_gpt2_dir(dtype=torch.bfloat16)
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": f"say {w}", "response": w} for w in "abcdefgh"])
    train(None, {"model": str(base), "task": {"type": "causal-lm", "max_length": 16}, "data": {"train": str(data)},
                 "method": {"name": "lora", "r": 4, "targets": ["c_attn"]},
                 "training": {"max_steps": 3, "batch_size": 4, "learning_rate": 5e-2},
                 "output": {"dir": str(tmp_path / "run"), "progress": False}})
    adapter = tmp_path / "run" / "adapter"
    assert main(["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "merged")]) == 0
    with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
        names = f.keys()  # a safetensors file handle, not a dict
        assert {f.get_slice(k).get_dtype() for k in names} == {"BF16"}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype="auto")
    adapted = lt.load_adapter(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), adapter)
    ids = AutoTokenizer.from_pretrained(tmp_path / "merged")(["say c", "say h"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = AutoModelForCausalLM.from_pretrained(base, dtype="auto")(ids).logits
        want = adapted(ids).logits
        folded = lt.unload(lt.merge(adapted))(ids).logits
        got = reloaded(ids).logits
    assert reloaded.dtype == torch.bfloat16
    assert torch.equal(got, folded), "the saved model is exactly the merged one"
    assert (got - want).abs().max() < 0.05 < (want - before).abs().max(), "merged equals adapted up to bf16 rounding"


def test_export_peft_writes_what_peft_loads(tmp_path):
    train(None, seqcls_config(tmp_path / "run", max_steps=3))
    adapter, out = tmp_path / "run" / "adapter", tmp_path / "peft"
    assert main(["export", "--adapter", str(adapter), "--format", "peft", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir())
    inputs = tok(["good film", "awful movie"], return_tensors="pt")

    def base():
        return AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir(), num_labels=2)

    with torch.no_grad():
        want = lt.load_adapter(base(), adapter).eval()(**inputs).logits
        got = PeftModel.from_pretrained(base(), out).eval()(**inputs).logits
    assert (got - want).abs().max() < 1e-5
    shutil.copytree(adapter, tmp_path / "not-peft")
    (tmp_path / "not-peft" / "adapter_config.json").unlink()
    assert main(["export", "--adapter", str(tmp_path / "not-peft"), "--format", "peft", "--out", str(out)]) == 2
    assert (out / "adapter_config.json").is_file(), "a failed export leaves the old folder alone"
