"""LoRA against HF PEFT: same forward on the same weights, adapters load both ways."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import leantune as lt

from .models import MODELS, ConvNet, batch, outputs

TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
    "gpt2": ["c_attn", "c_fc", "mlp.c_proj"],
    "bert-cls": ["query", "value", "dense", "word_embeddings"],
}


def peft_lora(base, targets, **kw):
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, **kw)
    return get_peft_model(copy.deepcopy(base), cfg)


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_peft_adapter_loads_into_leantune_with_identical_outputs(kind, tmp_path):
    base = MODELS[kind]()
    pm = peft_lora(base, TARGETS[kind], rank_pattern={"v_proj": 2, "c_fc": 6}, alpha_pattern={"query": 3.0})
    pm.save_pretrained(tmp_path)
    ours = lt.load_adapter(copy.deepcopy(base), tmp_path)
    inputs = batch(kind)
    assert (outputs(pm, inputs) - outputs(base, inputs)).abs().max() > 1e-3, "the PEFT adapter must do something"
    assert (outputs(ours, inputs) - outputs(pm, inputs)).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_leantune_adapter_loads_into_peft_with_identical_outputs(kind, tmp_path):
    base = MODELS[kind]()
    ours = lt.adapt(copy.deepcopy(base), lt.LoRA(r=4, alpha=8, targets=TARGETS[kind], init="random",
                                                 rank_pattern={"q_proj": 3}))
    lt.save_adapter(ours, tmp_path)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    inputs = batch(kind)
    assert (outputs(ours, inputs) - outputs(base, inputs)).abs().max() > 1e-3
    assert (outputs(pm, inputs) - outputs(ours, inputs)).abs().max() <= 1e-5


def test_transformers_load_adapter_reads_leantune_folder(tmp_path):
    base = MODELS["llama"]()
    ours = lt.adapt(copy.deepcopy(base), lt.LoRA(r=4, alpha=8, targets=["q_proj", "v_proj"], init="random"))
    lt.save_adapter(ours, tmp_path)
    plain = copy.deepcopy(base)
    plain.load_adapter(str(tmp_path))
    inputs = batch("llama")
    assert (outputs(plain, inputs) - outputs(ours, inputs)).abs().max() <= 1e-5


def test_modules_to_save_head_round_trips_with_peft(tmp_path):
    base = MODELS["bert-cls"]()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS",
                                                        init_lora_weights=False))
    with torch.no_grad():  # make the head copy differ from the base head
        pm.base_model.model.classifier.modules_to_save["default"].weight.add_(0.5)
    pm.save_pretrained(tmp_path / "peft")
    ours = lt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    inputs = batch("bert-cls")
    assert (outputs(ours, inputs) - outputs(pm, inputs)).abs().max() <= 1e-5
    lt.save_adapter(ours, tmp_path / "ours")
    back = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert (outputs(back, inputs) - outputs(pm, inputs)).abs().max() <= 1e-5


def test_conv_and_embedding_sites_match_peft(tmp_path):
    base = ConvNet().eval()
    targets = ["emb", "conv1", "conv2", "lin"]
    pm = peft_lora(base, targets)
    pm.save_pretrained(tmp_path)
    ours = lt.load_adapter(copy.deepcopy(base), tmp_path)
    ids, img = torch.randint(0, 20, (2, 7)), torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected, got, plain = pm(ids, img), ours(ids, img), base(ids, img)
    assert (expected - plain).abs().max() > 1e-3
    assert (got - expected).abs().max() <= 1e-5
    lt.merge(ours)
    with torch.no_grad():
        assert (ours(ids, img) - expected).abs().max() <= 1e-4


def test_merged_leantune_equals_peft_merge_and_unload():
    base = MODELS["llama"]()
    targets = ["q_proj", "k_proj", "gate_proj"]
    pm = peft_lora(base, targets)
    ours = lt.adapt(copy.deepcopy(base), lt.LoRA(r=4, alpha=8, targets=targets))
    for path, _, delta in lt.api.adapter_paths(ours, "default"):
        peft_layer = pm.base_model.model.get_submodule(path)
        with torch.no_grad():
            delta.A.copy_(peft_layer.lora_A["default"].weight)
            delta.B.copy_(peft_layer.lora_B["default"].weight)
    merged_peft = pm.merge_and_unload()
    merged_ours = lt.unload(lt.merge(ours))
    for k, v in merged_peft.state_dict().items():
        torch.testing.assert_close(merged_ours.state_dict()[k], v, rtol=0, atol=1e-6)
