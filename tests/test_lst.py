"""LST: the backbone keeps no graph, the side network starts as a pruned copy of the backbone,
the adapted model starts as the base, trains, decodes, and works with the chunked causal-LM loss."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import leantune as lt
from leantune.api import iter_sites
from leantune.core.site import Site
from leantune.engine import causal_lm_loss

from .models import ConvNet, batch, outputs, tiny_bert_cls, tiny_gpt2, tiny_llama

BUILDS = {"llama": tiny_llama, "gpt2": tiny_gpt2, "bert-cls": tiny_bert_cls}


def rungs(model: nn.Module, name: str = "default") -> list:
    return [site.deltas[name] for _, site in iter_sites(model) if name in site.deltas and hasattr(site.deltas[name], "side")]


def four_layer_llama() -> nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_starts_equal_to_base_and_up_projection_is_zero(kind):
    base = BUILDS[kind]()
    model = lt.adapt(copy.deepcopy(base), lt.LST(task="seq-cls" if kind == "bert-cls" else None))
    inputs = batch(kind)
    torch.testing.assert_close(outputs(model, inputs), outputs(base, inputs), rtol=0, atol=0)
    found = rungs(model)
    assert len(found) == 2 and found[-1].up is not None and not found[-1].up.weight.any()
    assert all(r.up is None for r in found[:-1])


def test_backbone_keeps_no_graph():
    base = four_layer_llama()
    ids = torch.randint(1, 96, (2, 16), generator=torch.Generator().manual_seed(0))

    def run(config):
        model = lt.adapt(copy.deepcopy(base), config)
        graded = []  # backbone modules (not sites, not deltas) in the blocks whose output entered autograd
        for name, m in model.model.layers.named_modules():
            if not isinstance(m, Site) and "deltas" not in name.split("."):
                m.register_forward_hook(lambda m, a, out, n=name: graded.append(n)
                                        if torch.is_tensor(out) and out.requires_grad else None)
        sizes, wide = [], []

        def pack(t):
            sizes.append(t.numel() * t.element_size())
            wide.append(t.ndim > 0 and t.shape[-1] >= 64 and t.numel() >= ids.numel() * 64)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        frozen_grads = [n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
        return graded, sum(sizes), sum(wide), frozen_grads, model

    graded, lst_bytes, lst_wide, frozen_grads, model = run(lt.LST())
    assert not frozen_grads
    assert not graded, f"backbone modules recorded a graph: {graded[:5]}"
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    lora_graded, lora_bytes, lora_wide, _, _ = run(lt.LoRA(r=8))
    assert lora_graded  # the check above can fail: with LoRA the backbone is in the graph
    # LST keeps one full-width tensor per layer (each ladder's input) plus the final norm's, the head's and
    # the loss's; LoRA all of the backbone's.
    assert lst_wide <= 4 + 6 and lora_wide > 5 * lst_wide, (lst_wide, lora_wide)
    assert lst_bytes < lora_bytes / 4, (lst_bytes, lora_bytes)


@pytest.mark.parametrize(("kind", "steps", "drop"), [("llama", 30, 0.15), ("bert-cls", 12, 0.3)])
def test_training_lowers_the_loss(kind, steps, drop):
    model = lt.adapt(BUILDS[kind](), lt.LST(task="seq-cls" if kind == "bert-cls" else None))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2, weight_decay=0.0)
    inputs, losses = batch(kind, seed=3), []
    model.train()
    for _ in range(steps):
        loss = model(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - drop and sum(losses[-5:]) < sum(losses[:5]), losses
    gates = [r.alpha.item() for r in rungs(model) if r.alpha is not None]
    assert gates and all(g != 0.0 for g in gates)  # the ladder gates learn too


@pytest.mark.parametrize("kind", sorted(BUILDS))
def test_side_network_is_the_backbone_at_reduction_one(kind):
    """With k = 1 every side block is an exact copy and ``down`` the identity, so the side state
    equals the backbone's last hidden state: the ladder passes mask, RoPE and inputs right."""
    model = lt.adapt(BUILDS[kind](), lt.LST(reduction=1))
    sites = [s for _, s in iter_sites(model)]
    seen = {}
    sites[-1].deltas["default"].up.register_forward_pre_hook(lambda m, a: seen.update(side=a[0]))
    sites[-1].base.register_forward_hook(lambda m, a, out: seen.update(h=out[0] if isinstance(out, tuple) else out))
    outputs(model, batch(kind))
    torch.testing.assert_close(seen["side"], seen["h"], rtol=1e-5, atol=1e-5)


def test_pruned_init_keeps_the_largest_norm_channels():
    base = tiny_llama()  # hidden 32, 4 heads of 8, 2 kv heads, FFN 48
    hidden, ffn, pair, vo = [1, 6, 9, 14, 17, 22, 29, 30], [0, 5, 7, 11, 20, 21, 33, 34, 40, 41, 44, 47], 2, [3, 5]
    with torch.no_grad():
        for layer in base.model.layers:
            a, m = layer.self_attn, layer.mlp
            for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
                lin.weight[:, hidden] *= 10
            for lin in (a.o_proj, m.down_proj):
                lin.weight[hidden] *= 10
            for lin in (a.q_proj, a.k_proj):  # RoPE pair (2, 6) of every head
                lin.weight.view(-1, 8, 32)[:, [pair, pair + 4]] *= 10
            a.v_proj.weight.view(-1, 8, 32)[:, vo] *= 10
            m.gate_proj.weight[ffn] *= 10
    model = lt.adapt(copy.deepcopy(base), lt.LST(reduction=4))  # 8 hidden, head dim 2 (one pair), FFN 12
    for rung, layer in zip(rungs(model), base.model.layers, strict=True):
        assert rung.down.weight.argmax(1).tolist() == hidden and torch.equal(rung.down.weight.sum(1), torch.ones(8))
        assert rung.rope.tolist() == [pair, pair + 4]
        side, h = rung.side, torch.tensor(hidden)
        qk_rows = torch.tensor([head * 8 + c for head in range(4) for c in (pair, pair + 4)])
        torch.testing.assert_close(side.self_attn.q_proj.weight, layer.self_attn.q_proj.weight[qk_rows][:, h])
        v_rows, o_cols = ([head * 8 + c for head in range(n) for c in vo] for n in (2, 4))
        torch.testing.assert_close(side.self_attn.v_proj.weight, layer.self_attn.v_proj.weight[v_rows][:, h])
        torch.testing.assert_close(side.self_attn.o_proj.weight, layer.self_attn.o_proj.weight[h][:, o_cols])
        torch.testing.assert_close(side.mlp.up_proj.weight, layer.mlp.up_proj.weight[ffn][:, h])
        torch.testing.assert_close(side.input_layernorm.weight, layer.input_layernorm.weight[h])


def test_pruned_init_keeps_whole_heads_where_reduction_divides_the_head_counts():
    base = tiny_llama()  # 4 query heads of 8 in 2 groups; reduction 2 keeps 1 kv head and its 2 query heads
    with torch.no_grad():
        for layer in base.model.layers:
            layer.self_attn.k_proj.weight[8:] *= 10  # key/value head 1 is the strong one
    model = lt.adapt(copy.deepcopy(base), lt.LST(reduction=2))
    for rung, layer in zip(rungs(model), base.model.layers, strict=True):
        attn, cfg = rung.side.self_attn, rung.side.self_attn.config
        assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 1, 8) and rung.rope is None
        h = rung.down.weight.argmax(1)
        torch.testing.assert_close(attn.k_proj.weight, layer.self_attn.k_proj.weight[8:][:, h])
        torch.testing.assert_close(attn.q_proj.weight, layer.self_attn.q_proj.weight[16:][:, h])
        torch.testing.assert_close(attn.o_proj.weight, layer.self_attn.o_proj.weight[h][:, 16:])


def test_pruned_init_reads_gpt2_conv1d_weights_transposed():
    base = tiny_gpt2()  # hidden 32, FFN 128; Conv1D weights are (in, out)
    hidden, ffn = [3, 4, 10, 31], list(range(0, 128, 8))
    with torch.no_grad():
        for block in base.transformer.h:
            block.mlp.c_fc.weight[hidden] *= 10
            block.mlp.c_fc.weight[:, ffn] *= 10
            block.attn.c_attn.weight[hidden] *= 10
    model = lt.adapt(copy.deepcopy(base), lt.LST())
    for rung, block in zip(rungs(model), base.transformer.h, strict=True):
        assert rung.down.weight.argmax(1).tolist() == hidden
        torch.testing.assert_close(rung.side.mlp.c_fc.weight, block.mlp.c_fc.weight[hidden][:, ffn])


def test_decoding_with_a_cache_matches_decoding_without():
    model = lt.adapt(tiny_llama(), lt.LST())
    torch.manual_seed(1)
    with torch.no_grad():
        rungs(model)[-1].up.weight.normal_(0, 3.0)
    ids = torch.randint(3, 90, (2, 6))
    run = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    cached = model.generate(ids, use_cache=True, **run)
    torch.testing.assert_close(cached, model.generate(ids, use_cache=False, **run), rtol=0, atol=0)
    with lt.disabled(model):
        assert not torch.equal(cached, model.generate(ids, use_cache=True, **run))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_causal_lm_loss(dtype):
    model = lt.adapt(tiny_llama(), lt.LST()).to(dtype)
    with torch.no_grad():
        rungs(model)[-1].up.weight.normal_(0, 0.5)
    inputs = batch("llama")
    loss = causal_lm_loss(model, inputs["input_ids"], inputs["labels"], attention_mask=inputs["attention_mask"])
    torch.testing.assert_close(loss.float(), model(**inputs).loss.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                               atol=1e-5)
    loss.backward()
    trained = [p for p in model.parameters() if p.requires_grad]
    assert all(p.grad is not None and torch.isfinite(p.grad.float()).all() for p in trained)
    assert any(p.grad.abs().sum() > 0 for r in rungs(model) for p in r.side.parameters())
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="positive integer"):
        lt.LST(reduction=0)
    with pytest.raises(ValueError, match="temperature"):
        lt.LST(temperature=0.0)
    with pytest.raises(ValueError, match="must divide the hidden size 32"):
        lt.adapt(tiny_llama(), lt.LST(reduction=3))
    with pytest.raises(ValueError, match="must divide the hidden size 32"):
        lt.adapt(tiny_llama(), lt.LST(reduction=64))
    with pytest.raises(ValueError, match="not a multiple of the 4 heads"):
        lt.adapt(tiny_gpt2(), lt.LST(reduction=16))
    with pytest.raises(ValueError, match="heads='whole' needs reduction=4 to divide the 4 query and 2 key/value"):
        lt.adapt(tiny_llama(), lt.LST(reduction=4, heads="whole"))
    with pytest.raises(ValueError, match="heads must be 'auto', 'whole' or 'narrow'"):
        lt.LST(heads="half")
    with pytest.raises(ValueError, match="structurally pruned.*not model type None"):
        lt.adapt(ConvNet(), lt.LST())
    odd = tiny_llama()
    odd.model.layers[1].extra = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="cannot prune LlamaDecoderLayer structurally.*extra"):
        lt.adapt(odd, lt.LST())
    assert not list(iter_sites(odd)) and all(p.requires_grad for p in odd.parameters())  # left untouched
    with pytest.raises(TypeError, match="cannot be merged"):
        lt.merge(lt.adapt(tiny_llama(), lt.LST()))
