"""Target matching as HF PEFT users know it."""

from __future__ import annotations

import leantune as lt

from .models import tiny_bert_cls, tiny_gpt2, tiny_llama


def paths(model, name="default"):
    return lt.adapters(model)[name].paths


def test_suffix_list_matches_ends_of_paths():
    model = lt.adapt(tiny_llama(), lt.LoRA(targets=["q_proj", "mlp.up_proj"]))
    assert paths(model) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj",
    ]


def test_regex_is_a_full_match():
    model = lt.adapt(tiny_llama(), lt.LoRA(targets=r".*\.1\.self_attn\.(k|v)_proj"))
    assert paths(model) == ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]


def test_all_linear_skips_the_output_head_and_honours_exclude():
    model = lt.adapt(tiny_llama(), lt.LoRA(targets="all-linear", exclude=["down_proj"]))
    found = paths(model)
    assert len(found) == 2 * 6 and not any("lm_head" in p or "down_proj" in p for p in found)
    gpt2 = lt.adapt(tiny_gpt2(), lt.LoRA())
    assert "lm_head" not in " ".join(paths(gpt2)) and any(p.endswith("c_attn") for p in paths(gpt2))


def test_seq_cls_task_trains_a_copy_of_the_head_and_keeps_it_out_of_targets():
    model = lt.adapt(tiny_bert_cls(), lt.LoRA(task="seq-cls"))
    record = lt.adapters(model)["default"]
    assert record.heads == ["classifier"]
    assert "classifier" not in record.paths
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "classifier.deltas.default.trained.weight" in trainable
    assert not any(n.startswith("classifier.base.") for n in trainable)


def test_trainable_parameters_counts_lora_exactly():
    model = lt.adapt(tiny_llama(), lt.LoRA(r=4, targets=["q_proj"]))
    trainable, total = lt.trainable_parameters(model)
    assert trainable == 2 * (4 * 32 + 32 * 4)
    assert total == sum(p.numel() for p in tiny_llama().parameters()) + trainable


def test_unload_gives_back_the_plain_model_with_its_flags():
    base = tiny_llama()
    model = lt.unload(lt.adapt(tiny_llama(), lt.LoRA()))
    assert set(model.state_dict()) == set(base.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    assert not hasattr(model, "leantune")


def test_a_composed_method_trains_saves_loads_and_merges_like_a_built_in(tmp_path):
    import copy

    import torch

    from .harness import train_steps
    from .models import batch, outputs

    base = tiny_llama()
    composed = lt.Compose([lt.LoRA(r=2, targets=["q_proj", "v_proj"]), lt.LoRA(r=4, alpha=16, targets=["v_proj", "up_proj"])])
    model = lt.adapt(copy.deepcopy(base), composed)
    assert sorted({p.rsplit(".", 1)[-1] for p in paths(model)}) == ["q_proj", "up_proj", "v_proj"]
    train_steps(model, "llama")
    inputs = batch("llama", seed=3)
    expected = outputs(model, inputs)
    assert not torch.allclose(expected, outputs(base, inputs), atol=1e-6)
    lt.save_adapter(model, tmp_path)
    loaded = lt.load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(outputs(loaded, inputs), expected, rtol=0, atol=0)
    lt.merge(loaded)
    torch.testing.assert_close(outputs(loaded, inputs), expected, rtol=0, atol=1e-4)


def test_roles_name_modules_across_families():
    llama = lt.adapt(tiny_llama(), lt.LoRA(targets=["@attn_v", "@ffn_out"]))
    assert sorted({p.rsplit(".", 1)[-1] for p in paths(llama)}) == ["down_proj", "v_proj"]
    bert = lt.adapt(tiny_bert_cls(), lt.LoRA(targets=["@attn_v"]))
    assert all(p.endswith("attention.self.value") for p in paths(bert))


def test_unknown_family_role_says_to_set_targets():
    import pytest
    from torch import nn

    with pytest.raises(ValueError, match="set `targets=`"):
        lt.adapt(nn.Sequential(nn.Linear(3, 3)), lt.LoRA(targets=["@attn_v"]))
