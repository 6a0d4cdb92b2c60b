"""Bad input gets a clear error that says what to change, and loses nothing."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import leantune as lt
from leantune import storage

from .models import MODELS, batch, outputs, tiny_gpt2, tiny_llama


def test_unknown_method_suggests_the_nearest():
    with pytest.raises(KeyError, match="Did you mean 'lora'"):
        lt.get_method("lroa")
    with pytest.raises(KeyError, match="unknown method 'loraa'"):
        lt.adapt(tiny_llama(), "loraa")


def test_targets_that_match_nothing_list_the_module_names():
    with pytest.raises(ValueError, match=r"match no module.*q_proj") as err:
        lt.adapt(tiny_llama(), lt.LoRA(targets=["query"]))
    assert "gate_proj" in str(err.value)


def test_target_of_unsupported_type_says_what_to_do():
    with pytest.raises(TypeError, match="narrow `targets`"):
        lt.adapt(tiny_llama(), lt.LoRA(targets=["self_attn"]))


def test_bad_regex_is_named():
    with pytest.raises(ValueError, match="not a valid regular expression"):
        lt.adapt(tiny_llama(), lt.LoRA(targets="(q_proj"))


@pytest.mark.parametrize("r", [0, -2])
def test_non_positive_rank_is_an_error(r):
    with pytest.raises(ValueError, match="positive integer"):
        lt.LoRA(r=r)
    with pytest.raises(ValueError, match="rank_pattern"):
        lt.LoRA(rank_pattern={"q_proj": r})


def test_rank_above_layer_dimension_warns():
    with pytest.warns(UserWarning, match="wasted"):
        lt.adapt(tiny_llama(), lt.LoRA(r=40, targets=["q_proj"]))


def test_unknown_task_is_named():
    with pytest.raises(ValueError, match="unknown task 'classify'"):
        lt.LoRA(task="classify")


def test_missing_modules_to_save_is_named():
    with pytest.raises(ValueError, match="modules_to_save entry 'head'"):
        lt.adapt(tiny_llama(), lt.LoRA(modules_to_save=["head"]))


def test_adapter_folder_with_missing_files(tmp_path):
    model = lt.adapt(tiny_llama(), lt.LoRA(targets=["q_proj"]))
    lt.save_adapter(model, tmp_path / "a")
    (tmp_path / "a" / storage.WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="missing adapter_model.safetensors"):
        lt.load_adapter(tiny_llama(), tmp_path / "a")
    lt.save_adapter(model, tmp_path / "b")
    (tmp_path / "b" / storage.LEANTUNE_CONFIG).unlink()
    (tmp_path / "b" / storage.PEFT_CONFIG).unlink()
    with pytest.raises(FileNotFoundError, match="no leantune_config.json or adapter_config.json"):
        lt.load_adapter(tiny_llama(), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lt.load_adapter(tiny_llama(), tmp_path / "nowhere")


def test_pickled_adapter_is_refused_with_the_reason(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    torch.save({"x": torch.zeros(1)}, tmp_path / "adapter_model.bin")
    with pytest.raises(ValueError, match="safetensors only, because unpickling can run arbitrary code"):
        lt.load_adapter(tiny_llama(), tmp_path)


def test_adapter_for_a_different_base_names_the_mismatch(tmp_path):
    lt.save_adapter(lt.adapt(tiny_llama(), lt.LoRA(targets=["q_proj"])), tmp_path)
    wider = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=48, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = copy.deepcopy(wider.state_dict())
    with pytest.raises(ValueError, match=r"q_proj.*shape \(8, 32\).*needs \(8, 48\).*different base model"):
        lt.load_adapter(wider, tmp_path)
    assert not lt.adapters(wider), "a failed load leaves no adapter behind"
    assert all(torch.equal(v, before[k]) for k, v in wider.state_dict().items())
    assert all(p.requires_grad for p in wider.parameters())


def test_failed_save_keeps_the_previous_folder(tmp_path, monkeypatch):
    model = lt.adapt(tiny_llama(), lt.LoRA(targets=["q_proj"], init="random"))
    dest = tmp_path / "adapter"
    lt.save_adapter(model, dest)
    first = (dest / storage.WEIGHTS).read_bytes()
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad).add_(1.0)

    def broken_json(path, obj):
        raise OSError("disk full")

    monkeypatch.setattr(storage, "write_json", broken_json)
    with pytest.raises(OSError, match="disk full"):
        lt.save_adapter(model, dest)
    assert (dest / storage.WEIGHTS).read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"], "no temporary folder is left behind"
    monkeypatch.undo()
    with pytest.raises(OSError):
        monkeypatch.setattr(storage, "write_json", broken_json)
        lt.save_adapter(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_merging_into_tied_weights_is_refused():
    model = lt.adapt(tiny_gpt2(), lt.LoRA(targets=["wte", "c_attn"], init="random"))
    with pytest.raises(ValueError, match="tied to lm_head.weight"):
        lt.merge(model)
    assert not any(site.merged for _, site in lt.core.site.iter_sites(model))


def test_duplicate_adapter_name_and_unknown_names():
    model = lt.adapt(tiny_llama(), lt.LoRA(targets=["q_proj"]))
    with pytest.raises(ValueError, match="already has an adapter named 'default'"):
        lt.adapt(model, lt.LoRA(targets=["q_proj"]))
    with pytest.raises(KeyError, match="no adapter named 'other'"):
        lt.set_active(model, "other")
    with pytest.raises(TypeError, match="method config"):
        lt.adapt(tiny_llama(), {"r": 8})


def test_adapting_a_merged_model_is_refused():
    model = lt.adapt(tiny_llama(), lt.LoRA(targets=["q_proj"]))
    lt.merge(model)
    with pytest.raises(RuntimeError, match="unmerge"):
        lt.adapt(model, lt.LoRA(targets=["v_proj"]), name="second")


def test_disabled_restores_merged_state():
    model = lt.adapt(tiny_llama(), lt.LoRA(targets=["q_proj"], init="random"))
    inputs = batch("llama")
    adapted_out = outputs(model, inputs)
    lt.merge(model)
    with lt.disabled(model):
        torch.testing.assert_close(outputs(model, inputs), outputs(MODELS["llama"](), inputs), rtol=0, atol=1e-5)
    torch.testing.assert_close(outputs(model, inputs), adapted_out, rtol=0, atol=1e-5)


def test_saved_folder_gets_a_normal_mode(tmp_path):
    import os
    import stat

    lt.save_adapter(lt.adapt(tiny_llama(), lt.LoRA(targets=["q_proj"])), tmp_path / "a")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o777 & ~mask
