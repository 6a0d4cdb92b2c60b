"""Bottleneck adapters: placement, the computed branch, Compacter's shared rule,
SparseAdapter's pruning."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import leantune as lt
from leantune.api import adapter_paths

from .harness import calibration, train_steps
from .models import batch, outputs, tiny_bert_cls, tiny_gpt2, tiny_llama


def deltas(model, name: str = "default") -> dict:
    """The adapter's bottlenecks by path (heads trained as copies left out)."""
    heads = lt.adapters(model)[name].heads
    return {path: delta for path, _, delta in adapter_paths(model, name) if path not in heads}


def nonzero_up(model) -> None:
    """Give identity-initialised adapters a non-zero up projection."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for d in deltas(model).values():
            d.up.weight.copy_(torch.randn(d.up.weight.shape, generator=g) * 0.1)


# --- placement ---------------------------------------------------------------------------
@pytest.mark.parametrize(("build", "houlsby", "pfeiffer"), [
    (tiny_llama, {"self_attn.o_proj", "mlp.down_proj"}, {"mlp.down_proj"}),
    (tiny_gpt2, {"attn.c_proj", "mlp.c_proj"}, {"mlp.c_proj"}),
    (tiny_bert_cls, {"attention.output.dense", "0.output.dense", "1.output.dense"}, {"0.output.dense", "1.output.dense"}),
])
def test_houlsby_after_attention_and_ffn_pfeiffer_after_ffn_only(build, houlsby, pfeiffer):
    def ends(config):
        paths = lt.adapters(lt.adapt(build(), config))["default"].paths
        return {next(e for e in sorted(houlsby, key=len, reverse=True) if p.endswith(e)) for p in paths}, len(paths)

    assert ends(lt.Houlsby()) == (houlsby, 4)
    found, count = ends(lt.Pfeiffer())
    assert found <= pfeiffer and count == 2
    assert not any("attention" in p for p in lt.adapters(lt.adapt(build(), lt.Pfeiffer()))["default"].paths)


def test_houlsby_branch_is_sequential_on_the_site_output():
    model = lt.adapt(tiny_llama(), lt.Houlsby(r=3))
    site = model.model.layers[0].self_attn.o_proj
    d = site.deltas["default"]
    assert d.down.weight.shape == (3, 32) and d.up.weight.shape == (32, 3)
    x = torch.randn(2, 5, 32)
    h = site.base(x)
    expected = h + F.linear(F.silu(F.linear(h, d.down.weight, d.down.bias)), d.up.weight, d.up.bias)
    torch.testing.assert_close(site(x), expected)
    with pytest.raises(TypeError, match="cannot be merged"):
        lt.merge(model)


# --- parallel adapter ------------------------------------------------------------------
@pytest.mark.parametrize(("build", "kind"), [(tiny_llama, "llama"), (tiny_gpt2, "gpt2"), (tiny_bert_cls, "bert-cls")])
def test_parallel_adapter_starts_as_identity(build, kind):
    base = build()
    model = lt.adapt(copy.deepcopy(base), lt.ParallelAdapter())
    torch.testing.assert_close(outputs(model, batch(kind)), outputs(base, batch(kind)), rtol=0, atol=0)


def test_parallel_adapter_reads_the_ffn_input_scaled_by_four():
    model = lt.adapt(tiny_llama(), lt.ParallelAdapter())
    nonzero_up(model)
    site = model.model.layers[0].mlp
    d = site.deltas["default"]
    assert d.down.weight.shape == (16, 32)  # reduction 2
    x = torch.randn(2, 5, 32)
    branch = F.linear(F.relu(F.linear(x, d.down.weight, d.down.bias)), d.up.weight, d.up.bias)
    torch.testing.assert_close(site(x), site.base(x) + 4.0 * branch)


def test_parallel_adapter_on_bert_adds_beside_the_ffn_inside_the_layernorm():
    model = lt.adapt(tiny_bert_cls(), lt.ParallelAdapter())
    lt.adapt(model, lt.ParallelAdapter(), name="b")
    nonzero_up(model)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.deltas["b"].up.weight.normal_(std=0.1)
    site = model.bert.encoder.layer[0].output
    assert lt.adapters(model)["default"].paths == ["bert.encoder.layer.0.output", "bert.encoder.layer.1.output"]
    hidden, residual = torch.randn(2, 5, 48), torch.randn(2, 5, 32)
    block = site.base
    branches = sum(site.deltas[n].branch(residual) for n in ("default", "b"))  # both read the FFN input
    expected = block.LayerNorm(block.dense(hidden) + residual + branches)
    torch.testing.assert_close(site(hidden, residual), expected)
    torch.testing.assert_close(site(hidden, input_tensor=residual), expected)


# --- Compacter ---------------------------------------------------------------------------
def test_compacter_rule_is_one_tensor_shared_by_every_layer(tmp_path):
    base = tiny_llama()
    model = lt.adapt(copy.deepcopy(base), lt.Compacter())
    rules = {id(p.rule) for d in deltas(model).values() for p in (d.down, d.up)}
    assert len(rules) == 1
    rule = next(iter(deltas(model).values())).down.rule
    assert rule.shape == (4, 4, 4)
    # counted once among the trainable parameters, though every site lists it in its state dict
    per_site = sum(p.numel() for n, p in next(iter(deltas(model).values())).named_parameters() if "rule" not in n)
    assert lt.trainable_parameters(model)[0] == 64 + 4 * per_site
    assert sum(k.endswith(".rule") for k in model.state_dict()) == 4 * 2
    # the rule's gradient gathers every site's contribution: switching one site off changes it
    model(**batch("llama")).loss.backward()
    everywhere, rule.grad = rule.grad.clone(), None
    model.model.layers[1].mlp.down_proj.active = []
    model(**batch("llama")).loss.backward()
    assert everywhere.abs().sum() > 0 and not torch.allclose(everywhere, rule.grad)
    model.model.layers[1].mlp.down_proj.active = ["default"]
    before = rule.detach().clone()
    train_steps(model, "llama", steps=2)
    assert not torch.equal(before, rule)
    lt.save_adapter(model, tmp_path)
    loaded = lt.load_adapter(copy.deepcopy(base), tmp_path)
    loaded_rules = {id(p.rule) for d in deltas(loaded).values() for p in (d.down, d.up)}
    assert len(loaded_rules) == 1
    torch.testing.assert_close(next(iter(deltas(loaded).values())).down.rule, rule, rtol=0, atol=0)
    other = lt.adapt(model, lt.Compacter(), name="second")
    assert {id(p.rule) for d in deltas(other, "second").values() for p in (d.down, d.up)}.isdisjoint(rules)


def test_compacter_weight_is_a_sum_of_kronecker_products():
    model = lt.adapt(tiny_gpt2(), lt.Compacter(phm_dim=2, r=4))
    down = next(iter(deltas(model).values())).down
    expected = sum(torch.kron(down.rule[i], torch.outer(down.s[i], down.t[i])) for i in range(2))
    assert expected.shape == (4, 32)
    torch.testing.assert_close(down.matrix(), expected)
    with pytest.raises(ValueError, match="multiple of phm_dim"):
        lt.Compacter(r=6)


# --- SparseAdapter -------------------------------------------------------------------------
def masks(model) -> list[torch.Tensor]:
    return [p.mask for d in deltas(model).values() for p in (d.down, d.up)]


@pytest.mark.parametrize("sparsity", [0.5, 0.8])
def test_sparse_adapter_reaches_the_target_sparsity_and_keeps_pruned_weights_zero(sparsity):
    model = lt.adapt(tiny_llama(), lt.SparseAdapter(sparsity=sparsity), calibration=calibration("llama"))
    kept = sum(int(m.sum()) for m in masks(model))
    total = sum(m.numel() for m in masks(model))
    assert kept == round(total * (1 - sparsity))
    train_steps(model, "llama", steps=3)
    for d in deltas(model).values():
        for p in (d.down, d.up):
            assert (p.weight[~p.mask] == 0).all()


def test_sparse_adapter_snip_reads_calibration_data_and_masks_round_trip(tmp_path):
    base = tiny_bert_cls()
    cfg = lt.SparseAdapter(sparsity=0.6, task="seq-cls")
    torch.manual_seed(5)
    snip = lt.adapt(copy.deepcopy(base), cfg, calibration=calibration("bert-cls"))
    torch.manual_seed(5)
    magnitude = lt.adapt(copy.deepcopy(base), cfg)
    assert any(not torch.equal(a, b) for a, b in zip(masks(snip), masks(magnitude), strict=True))
    weights = [p.weight for d in deltas(magnitude).values() for p in (d.down, d.up)]
    flat = torch.cat([w.abs().flatten() for w in weights])
    kept = torch.cat([m.flatten() for m in masks(magnitude)])
    assert flat[kept].min() >= flat[~kept].max()  # magnitude pruning keeps the largest weights
    lt.save_adapter(snip, tmp_path)
    loaded = lt.load_adapter(copy.deepcopy(base), tmp_path)
    for a, b in zip(masks(loaded), masks(snip), strict=True):
        assert torch.equal(a, b)


def test_large_sparse_widens_the_bottleneck_at_equal_budget():
    dense = lt.adapt(tiny_llama(), lt.SparseAdapter(r=4, sparsity=0.75))
    wide = lt.adapt(tiny_llama(), lt.SparseAdapter(r=4, sparsity=0.75, widen=True))
    assert next(iter(deltas(wide).values())).down.weight.shape[0] == 16
    assert sum(int(m.sum()) for m in masks(wide)) == 4 * sum(int(m.sum()) for m in masks(dense))
    assert sum(int(m.sum()) for m in masks(wide)) == sum(m.numel() for m in masks(dense))


def test_bad_adapter_settings_name_the_field():
    with pytest.raises(ValueError, match="activation"):
        lt.Houlsby(activation="softplus")
    with pytest.raises(ValueError, match="sparsity"):
        lt.SparseAdapter(sparsity=1.0)
    with pytest.raises(ValueError, match="init"):
        lt.Pfeiffer(init="xavier")


def test_bert_ffn_roles_exclude_the_attention_output_and_mix_with_suffixes():
    model = lt.adapt(tiny_bert_cls(), lt.LoRA(targets=["@attn_v", "@ffn_out"]))
    assert lt.adapters(model)["default"].paths == [
        "bert.encoder.layer.0.attention.self.value", "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.self.value", "bert.encoder.layer.1.output.dense",
    ]
