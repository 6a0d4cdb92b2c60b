"""Scaling and selective tuning: bitfit, ia3, ssf, ln_tuning, hft and the IST wrapper.

(IA)³ and LN tuning are checked against HF PEFT: same forward on the same
weights, adapters load both ways.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import IA3Config, LNTuningConfig, PeftModel, get_peft_model
from torch import nn

import leantune as lt
from leantune.api import adapter_paths
from leantune.core.families import block_of
from leantune.registry import config_from_dict

from .harness import train_steps
from .models import MODELS, TASKS, batch, outputs, tiny_bert_cls, tiny_gpt2, tiny_llama

PEFT_TASK = {"causal-lm": "CAUSAL_LM", "seq-cls": "SEQ_CLS"}


def randomise(model: nn.Module, std: float = 0.2) -> nn.Module:
    """Move every trainable tensor away from its init, so parity checks compare real adapters."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def max_diff(a: nn.Module, b: nn.Module, kind: str) -> float:
    inputs = batch(kind)
    return (outputs(a, inputs) - outputs(b, inputs)).abs().max().item()


# --- (IA)³ against HF PEFT ----------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_ia3_peft_adapter_loads_into_leantune_with_identical_outputs(kind, tmp_path):
    base = MODELS[kind]()
    pm = get_peft_model(copy.deepcopy(base), IA3Config(task_type=PEFT_TASK[TASKS[kind]], init_ia3_weights=False))
    pm.save_pretrained(tmp_path)
    ours = lt.load_adapter(copy.deepcopy(base), tmp_path)
    assert max_diff(pm, base, kind) > 1e-4, "the PEFT adapter must do something"
    assert max_diff(ours, pm, kind) <= 1e-5
    assert lt.adapters(ours)["default"].config.feedforward  # PEFT's feedforward modules were read


@pytest.mark.parametrize("method", ["ia3", "ln_tuning"])
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_leantune_adapter_loads_into_peft_with_identical_outputs(kind, method, tmp_path):
    base = MODELS[kind]()
    config = lt.IA3(task=TASKS[kind]) if method == "ia3" else lt.LNTuning()
    ours = randomise(lt.adapt(copy.deepcopy(base), config))
    lt.save_adapter(ours, tmp_path)
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert max_diff(ours, base, kind) > 1e-4
    assert max_diff(pm, ours, kind) <= 1e-5


def test_ia3_scales_key_value_outputs_and_the_ffn_down_projection_input():
    model = lt.adapt(tiny_llama(), lt.IA3())
    sides = {p.rsplit(".", 1)[-1]: d.side for p, _, d in adapter_paths(model, "default")}
    assert sides == {"k_proj": "output", "v_proj": "output", "down_proj": "input"}
    site = model.model.layers[0].mlp.down_proj
    gamma = site.deltas["default"].scale
    with torch.no_grad():
        gamma.copy_(torch.rand_like(gamma) + 0.5)
    x = torch.randn(3, gamma.numel())
    torch.testing.assert_close(site(x), site.base(x * gamma.flatten()))


def test_ia3_merge_matches_peft_merge(tmp_path):
    base = tiny_gpt2()
    pm = get_peft_model(copy.deepcopy(base), IA3Config(init_ia3_weights=False))
    pm.save_pretrained(tmp_path)
    ours = lt.merge(lt.load_adapter(copy.deepcopy(base), tmp_path))
    merged_peft = pm.merge_and_unload()
    ours = lt.unload(ours)
    for name, value in merged_peft.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[name], value, rtol=0, atol=1e-6)


# --- LN tuning against HF PEFT ---------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MODELS))
def test_ln_tuning_peft_adapter_loads_into_leantune_with_identical_outputs(kind, tmp_path):
    base = MODELS[kind]()
    targets = {"llama": ["input_layernorm", "post_attention_layernorm", "norm"], "gpt2": ["ln_1", "ln_2", "ln_f"],
               "bert-cls": ["LayerNorm"]}[kind]
    pm = randomise(get_peft_model(copy.deepcopy(base), LNTuningConfig(target_modules=targets)))
    pm.save_pretrained(tmp_path)
    ours = lt.load_adapter(copy.deepcopy(base), tmp_path)
    assert max_diff(pm, base, kind) > 1e-4
    assert max_diff(ours, pm, kind) <= 1e-5




def test_ln_tuning_trains_only_norm_parameters_on_llama_rmsnorm():
    model = lt.adapt(tiny_llama(), lt.LNTuning())
    trained = lt.trainable_parameters(model)[0]
    norms = [m for m in tiny_llama().modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert len(lt.adapters(model)["default"].paths) == len(norms) == 5
    assert trained == sum(m.weight.numel() for m in norms)


def test_two_ln_tuning_adapters_add_their_changes_and_merge_to_the_same():
    base = tiny_gpt2()
    model = randomise(lt.adapt(copy.deepcopy(base), lt.LNTuning(), name="a"))
    lt.adapt(model, lt.LNTuning(), name="b")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".deltas.b." in n:
                p.add_(0.1)
    inputs = batch("gpt2")
    ref = outputs(base, inputs)
    changes = {}
    for name in ("a", "b"):
        lt.set_active(model, name)
        changes[name] = outputs(model, inputs) - ref
    lt.set_active(model, ["a", "b"])
    both = outputs(model, inputs)
    assert (changes["a"] - changes["b"]).abs().max() > 1e-3
    ln = model.transformer.h[0].ln_1
    x = torch.randn(2, 32)
    added = ln.base(x) + sum(ln.deltas[n].trained(x) - ln.base(x) for n in ("a", "b"))
    torch.testing.assert_close(ln(x), added, rtol=0, atol=1e-6)
    lt.merge(model)
    torch.testing.assert_close(outputs(model, inputs), both, rtol=0, atol=1e-4)
    lt.unmerge(model)
    torch.testing.assert_close(model.transformer.h[0].ln_1.base.weight, base.transformer.h[0].ln_1.weight, rtol=0, atol=0)


# --- BitFit and SSF ---------------------------------------------------------------------
def test_bitfit_merge_creates_a_bias_on_a_bias_free_linear_and_unmerge_removes_it():
    base = tiny_llama()
    model = randomise(lt.adapt(copy.deepcopy(base), lt.BitFit(targets=["q_proj", "down_proj"])))
    q = model.model.layers[0].self_attn.q_proj
    assert q.base.bias is None
    inputs = batch("llama")
    expected = outputs(model, inputs)
    lt.merge(model)
    torch.testing.assert_close(q.base.bias, q.deltas["default"].shift.detach(), rtol=0, atol=0)
    torch.testing.assert_close(outputs(model, inputs), expected, rtol=0, atol=1e-5)
    lt.unmerge(model)
    assert q.base.bias is None and "bias" not in dict(q.base.named_parameters())
    merged = lt.unload(lt.merge(model))
    assert merged.model.layers[1].mlp.down_proj.bias is not None
    torch.testing.assert_close(outputs(merged, inputs), expected, rtol=0, atol=1e-5)


def test_bitfit_on_a_biased_linear_and_layernorm_trains_a_bias_change():
    base = tiny_bert_cls()
    model = randomise(lt.adapt(copy.deepcopy(base), lt.BitFit(targets=["query", "LayerNorm"], task="seq-cls")))
    site = model.bert.encoder.layer[0].attention.self.query
    assert lt.trainable_parameters(model)[0] == 2 * 32 + 5 * 32 + sum(
        p.numel() for p in base.classifier.parameters())
    expected = outputs(model, batch("bert-cls"))
    lt.merge(model)
    torch.testing.assert_close(site.base.bias, base.bert.encoder.layer[0].attention.self.query.bias
                               + site.deltas["default"].shift.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(outputs(model, batch("bert-cls")), expected, rtol=0, atol=1e-5)


def test_ssf_scales_and_shifts_outputs_and_folds_into_the_linear():
    base = tiny_gpt2()
    model = lt.adapt(copy.deepcopy(base), lt.SSF(targets=["c_fc"]))
    site = model.transformer.h[0].mlp.c_fc
    scale, shift = site.deltas["default"].parts
    gamma, beta = scale.scale.detach().flatten(), shift.shift.detach()
    assert 0 < (gamma - 1).abs().max() < 0.2 and 0 < beta.abs().max() < 0.2  # N(1, .02²), N(0, .02²)
    x = torch.randn(3, 32)
    torch.testing.assert_close(site(x), site.base(x) * gamma + beta)
    lt.merge(model)
    original = base.transformer.h[0].mlp.c_fc  # GPT-2 Conv1D: weight is in × out
    torch.testing.assert_close(site.base.weight, original.weight * gamma, rtol=0, atol=1e-6)
    torch.testing.assert_close(site.base.bias, original.bias * gamma + beta, rtol=0, atol=1e-6)
    lt.unmerge(model)
    torch.testing.assert_close(site.base.weight, original.weight, rtol=0, atol=1e-6)


def test_scale_with_zero_entries_refuses_to_merge():
    model = lt.adapt(tiny_llama(), lt.IA3())
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.deltas["default"].scale[0] = 0.0
    with pytest.raises(ValueError, match="zero entries"):
        lt.merge(model)


# --- HFT ------------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "per_block"), [(tiny_llama, 7), (tiny_gpt2, 4), (tiny_bert_cls, 6)])
def test_hft_trains_exactly_half_of_the_block_matrices(build, per_block):
    base = build()
    model = lt.adapt(copy.deepcopy(base), lt.HFT())
    paths = lt.adapters(model)["default"].paths
    assert len(paths) == per_block  # two blocks of per_block matrices each: exactly half of them
    for block in {block_of(p) for p in paths}:
        assert sum(block_of(p) == block for p in paths) in (per_block // 2, (per_block + 1) // 2)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    weights = {n.removesuffix(".deltas.default.weight") for n in trained if n.endswith(".deltas.default.weight")}
    assert weights == set(paths)
    mods = dict(base.named_modules())
    assert lt.trainable_parameters(model)[0] == sum(p.numel() for path in paths for p in mods[path].parameters())


def test_hft_selection_is_reproducible_from_seed_and_round_and_per_category():
    pick = lt.adapters(lt.adapt(tiny_llama(), lt.HFT(seed=1)))["default"].paths
    again = lt.adapters(lt.adapt(tiny_llama(), lt.HFT(seed=1)))["default"].paths
    other = lt.adapters(lt.adapt(tiny_llama(), lt.HFT(seed=1, round=1)))["default"].paths
    assert pick == again and pick != other
    for layer in ("layers.0.", "layers.1."):
        attn = [p for p in pick if layer in p and "self_attn" in p]
        assert len(attn) == 2
    ffn = [p for p in pick if ".mlp." in p]
    assert sorted(len([p for p in ffn if f"layers.{i}." in p]) for i in (0, 1)) == [1, 2]


def test_hft_merge_adds_the_full_update_and_round_trips(tmp_path):
    base = tiny_llama()
    model = lt.adapt(copy.deepcopy(base), lt.HFT(rule="random", seed=4))
    train_steps(model, "llama", steps=2)
    inputs = batch("llama", seed=9)
    expected = outputs(model, inputs)
    lt.save_adapter(model, tmp_path)
    loaded = lt.load_adapter(copy.deepcopy(base), tmp_path)
    assert lt.adapters(loaded)["default"].paths == lt.adapters(model)["default"].paths
    path = lt.adapters(model)["default"].paths[0]
    delta = model.get_submodule(path).deltas["default"].weight.detach()
    lt.merge(model)
    torch.testing.assert_close(model.get_submodule(path).base.weight, base.get_submodule(path).weight + delta)
    torch.testing.assert_close(outputs(model, inputs), expected, rtol=0, atol=1e-5)


# --- IST ------------------------------------------------------------------------------
def _labelled(kind: str, seed: int) -> dict[str, torch.Tensor]:
    return batch(kind, seed=seed)


def _ist_steps(model: nn.Module, opt: torch.optim.Optimizer, schedule, steps: range) -> list[list[str]]:
    """Train with the schedule; the blocks each step was allowed to update."""
    chosen = []
    for step in steps:
        chosen.append(list(schedule.selected))
        inputs = _labelled("llama", step)
        model(**inputs).loss.backward()
        opt.step()
        schedule.after_step(step + 1, opt, lambda inputs=inputs: float(model(**inputs).loss))
        opt.zero_grad()
    return chosen


@pytest.mark.parametrize("method", [lt.LoRA(init="random"), lt.Houlsby()], ids=["lora", "houlsby"])
def test_ist_updates_only_the_sampled_blocks(method):
    model = lt.adapt(tiny_llama(), lt.IST(wraps=method, update_layers=1, probe_every=1, seed=0))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    (schedule,) = lt.schedules(model, 4)
    assert isinstance(schedule, lt.ISTSchedule) and schedule.blocks == ["model.layers.0", "model.layers.1"]
    for step in range(4):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if ".deltas." in n}
        (chosen,) = _ist_steps(model, opt, schedule, range(step, step + 1))
        after = dict(model.named_parameters())
        changed = {n for n, v in before.items() if not torch.equal(v, after[n])}
        assert changed and all(n.startswith(chosen[0] + ".") for n in changed)
    assert (schedule.importance != 0).all(), "every block was probed and scored"
    schedule.finish()
    assert all(p.requires_grad for n, p in model.named_parameters() if ".deltas." in n)


def test_ist_samples_important_blocks_more_often_and_probes_by_suppression():
    model = randomise(lt.adapt(tiny_llama(), lt.IST(wraps=lt.LoRA(init="random"), update_layers=1, probe_layers=1)))
    (schedule,) = lt.schedules(model)
    inputs = _labelled("llama", 1)
    with torch.no_grad():
        on = model(**inputs).loss.item()
        with schedule.suppressed(["model.layers.1"]):
            off = model(**inputs).loss.item()
            assert model.model.layers[0].self_attn.q_proj.active == ("default",)
        with lt.disabled(model):
            assert abs(model(**inputs).loss.item() - on) > 1e-4
    assert off != on and model.model.layers[1].self_attn.q_proj.active == ("default",)
    schedule.importance = torch.tensor([0.0, 1.0])
    counts = torch.zeros(2)
    for _ in range(200):
        schedule.resample()
        counts[schedule.blocks.index(schedule.selected[0])] += 1
    assert counts[1] > 3 * counts[0]


def test_ist_schedule_state_resumes_the_same_sampling():
    def fresh():
        model = lt.adapt(tiny_llama(), lt.IST(wraps=lt.LoRA(init="random"), update_layers=1, probe_every=2, seed=5))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        return model, opt, lt.schedules(model)[0]

    model, opt, schedule = fresh()
    _ist_steps(model, opt, schedule, range(3))
    state = copy.deepcopy(schedule.state_dict())
    expected = _ist_steps(model, opt, schedule, range(3, 9))
    other_model, other_opt, other = fresh()
    other.load_state_dict(state)
    other_model.load_state_dict(model.state_dict())
    assert _ist_steps(other_model, other_opt, other, range(3, 9)) == expected
    assert not other.distributed_ok


def test_ist_wraps_any_method_saves_loads_and_forwards_the_inner_schedule(tmp_path):
    config = lt.IST(wraps={"method": "adalora", "init_r": 4, "target_r": 2, "total_step": 6}, task="seq-cls")
    assert config.inner.task == "seq-cls" and config.mergeable
    assert lt.get_method("ist") is lt.IST and config_from_dict(config.to_dict()) == config
    model = lt.adapt(tiny_bert_cls(), config)
    (schedule,) = lt.schedules(model, 6)
    assert schedule.inner is not None and schedule.loss_term(torch.tensor(0.0)) > 0  # AdaLoRA's orthogonality
    train_steps(model, "bert-cls", steps=6)
    ranks = lt.rank_budget(model).ranks()
    assert sum(ranks) == 2 * len(ranks), "the wrapped AdaLoRA pruned to its target rank"
    lt.save_adapter(model, tmp_path / "a")
    again = lt.load_adapter(tiny_bert_cls(), tmp_path / "a")
    inputs = {k: v for k, v in batch("bert-cls", seed=1).items() if k != "labels"}
    torch.testing.assert_close(outputs(again, inputs), outputs(model, inputs), rtol=0, atol=0)


def test_ist_rejects_bad_settings():
    with pytest.raises(ValueError, match="wraps must be another method"):
        lt.IST(wraps=lt.IST())
    with pytest.raises(KeyError, match="unknown method"):
        lt.IST(wraps="lorra")
    with pytest.raises(ValueError, match="probe_every"):
        lt.IST(probe_every=0)
    model = lt.adapt(tiny_llama(), lt.IST(update_layers=5))
    with pytest.raises(ValueError, match="update_layers and probe_layers must be in 1..2"):
        lt.schedules(model)
