"""The LoRA family against HF PEFT (same forward on the same weights, adapters load both ways),
plus what each method promises of its own: LoRA-FA's backward, the rank budget, DyLoRA's nested
ranks, coefficient-only storage for shared random bases, export as plain LoRA."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import AdaLoraConfig, LoraConfig, PeftModel, VeraConfig, get_peft_model
from peft.tuners.lora.config import CordaConfig
from safetensors.torch import load_file

import leantune as lt
from leantune.api import adapter_paths
from leantune.methods.lora_variants import FrozenAProjection, LoRAFADelta, set_dylora_rank

from .harness import calibration, train_steps
from .models import MODELS, ConvNet, batch, outputs

KINDS = sorted(MODELS)
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bert-cls": ["query", "value", "dense"],
}
TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> bool:
    return (a - b).abs().max().item() <= tol


def peft_layers(pm, ours, name: str = "default"):
    """(our delta, PEFT's layer) at every adapted path."""
    return [(d, pm.base_model.model.get_submodule(p)) for p, _, d in adapter_paths(ours, name)]


def both_ways(kind, pm, ours, tmp_path) -> None:
    """PEFT's folder loads into leantune and ours into PEFT, all with the same outputs."""
    base = MODELS[kind]()
    inputs = batch(kind)
    expected = outputs(pm, inputs)
    assert not close(expected, outputs(base, inputs), 1e-3), "the adapter must change the output"
    assert close(outputs(ours, inputs), expected)
    pm.save_pretrained(tmp_path / "peft")
    assert close(outputs(lt.load_adapter(copy.deepcopy(base), tmp_path / "peft"), inputs), expected)
    lt.save_adapter(ours, tmp_path / "ours")
    assert close(outputs(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours"), inputs), expected)


# --- rsLoRA and DoRA ------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("flags", [{"use_rslora": True}, {"use_dora": True}, {"use_dora": True, "use_rslora": True}])
def test_rslora_and_dora_match_peft_both_ways(kind, flags, tmp_path):
    base = MODELS[kind]()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind],
                                                        init_lora_weights=False, **flags))
    pm.save_pretrained(tmp_path / "src")
    ours = lt.load_adapter(copy.deepcopy(base), tmp_path / "src")
    config = lt.adapters(ours)["default"].config
    assert type(config) is (lt.DoRA if flags.get("use_dora") else lt.RsLoRA)
    if flags.get("use_dora"):
        assert config.rslora == flags.get("use_rslora", False)
    both_ways(kind, pm, ours, tmp_path)


def test_dora_magnitude_init_and_conv_embedding_sites_match_peft():
    base = ConvNet().eval()
    targets = ["emb", "conv1", "conv2", "lin"]
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=3, lora_alpha=6, target_modules=targets, use_dora=True,
                                                        init_lora_weights=False))
    ours = lt.adapt(copy.deepcopy(base), lt.DoRA(r=3, alpha=6, targets=targets))
    for delta, layer in peft_layers(pm, ours):
        emb = hasattr(layer, "lora_embedding_A") and "default" in layer.lora_embedding_A
        a = layer.lora_embedding_A["default"] if emb else layer.lora_A["default"].weight
        b = layer.lora_embedding_B["default"] if emb else layer.lora_B["default"].weight
        with torch.no_grad():
            delta.A.copy_(a)
            delta.B.copy_(b)
            delta.magnitude.copy_(torch.randn_like(delta.magnitude).abs() + 0.5)
            layer.lora_magnitude_vector["default"].weight.copy_(delta.magnitude)
    ids, img = torch.randint(0, 20, (2, 7)), torch.randn(2, 3, 9, 9)
    with torch.no_grad():
        expected, got = pm(ids, img), ours(ids, img)
        assert close(got, expected)
        lt.merge(ours)
        assert close(ours(ids, img), expected, 1e-4)


def test_dora_magnitude_starts_at_the_weight_norm_per_output():
    base = MODELS["gpt2"]()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, target_modules=["c_attn"], use_dora=True))
    ours = lt.adapt(copy.deepcopy(base), lt.DoRA(r=4, targets=["c_attn"]))
    for delta, layer in peft_layers(pm, ours):
        expected = layer.lora_magnitude_vector["default"].weight
        assert delta.magnitude.shape == expected.shape
        torch.testing.assert_close(delta.magnitude.detach(), expected.detach(), rtol=0, atol=1e-6)
        torch.testing.assert_close(delta.magnitude.detach(), layer.base_layer.weight.norm(dim=0), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_dora_with_dropout_matches_peft_while_training(kind):
    base = MODELS[kind]()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, use_dora=True,
                                                        target_modules=TARGETS[kind], init_lora_weights=False))
    ours = lt.adapt(copy.deepcopy(base), lt.DoRA(r=4, alpha=8, dropout=0.3, targets=TARGETS[kind]))
    for delta, layer in peft_layers(pm, ours):
        with torch.no_grad():
            delta.A.copy_(layer.lora_A["default"].weight)
            delta.B.copy_(layer.lora_B["default"].weight)
            delta.magnitude.copy_(layer.lora_magnitude_vector["default"].weight)
    pm.train()
    ours.train()
    inputs = {k: v for k, v in batch(kind).items() if k != "labels"}
    torch.manual_seed(5)
    expected = pm(**inputs).logits
    torch.manual_seed(5)
    assert close(ours(**inputs).logits, expected)


# --- PiSSA and CorDA ------------------------------------------------------------------


def _copy_init_and_perturb(pm, ours) -> None:
    """Check our initial factors equal PEFT's, then give both the same trained-looking factors."""
    for delta, layer in peft_layers(pm, ours):
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        torch.testing.assert_close(delta.A.detach(), a.detach(), rtol=0, atol=1e-5)
        torch.testing.assert_close(delta.B.detach(), b.detach(), rtol=0, atol=1e-5)
        with torch.no_grad():
            delta.A.add_(torch.randn_like(a) * 0.05)
            delta.B.add_(torch.randn_like(b) * 0.05)
            a.copy_(delta.A)
            b.copy_(delta.B)


def _exported_loads_both_ways(kind, ours, tmp_path) -> None:
    base = MODELS[kind]()
    inputs = batch(kind)
    expected = outputs(ours, inputs)
    assert not close(expected, outputs(base, inputs), 1e-4), "the adapter must change the output"
    lt.export_lora(ours, tmp_path / "lora")
    assert close(outputs(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora"), inputs), expected)
    loaded = lt.load_adapter(copy.deepcopy(base), tmp_path / "lora")
    assert type(lt.adapters(loaded)["default"].config) is lt.LoRA
    assert close(outputs(loaded, inputs), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_pissa_matches_peft_and_exports_as_plain_lora(kind, tmp_path):
    base = MODELS[kind]()
    pm = get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS[kind],
                                                        init_lora_weights="pissa"))
    pm.save_pretrained(tmp_path / "init")
    ours = lt.adapt(copy.deepcopy(base), lt.PiSSA(r=4, alpha=8, targets=TARGETS[kind]))
    _copy_init_and_perturb(pm, ours)
    inputs = batch(kind)
    assert close(outputs(ours, inputs), outputs(pm, inputs))
    with lt.disabled(ours):  # the base weights were never changed
        torch.testing.assert_close(outputs(ours, inputs), outputs(base, inputs), rtol=0, atol=0)
    _exported_loads_both_ways(kind, ours, tmp_path)
    # PEFT's own PiSSA -> LoRA conversion reads into leantune as well
    pm.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "init"))
    assert close(outputs(lt.load_adapter(copy.deepcopy(base), tmp_path / "converted"), inputs), outputs(ours, inputs))


@pytest.mark.parametrize("mode", ["ipa", "kpa"])
@pytest.mark.parametrize("kind", KINDS)
def test_corda_matches_peft_and_exports_as_plain_lora(kind, mode, tmp_path):
    from peft.tuners.lora.corda import preprocess_corda  # needs the `attrs` package

    base = MODELS[kind]()
    batches = [{k: v[i : i + 1] for k, v in b.items()} for b in calibration(kind) for i in range(2)]
    # PEFT's statistic squeezes the batch dimension, so it needs batches of one and breaks on BERT's
    # pooler (whose 2-D input then becomes a vector); leave the pooler out there.
    targets = ["query", "value", "intermediate.dense"] if kind == "bert-cls" else TARGETS[kind]
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights="corda",
                     corda_config=CordaConfig(corda_method={"ipa": "ipm", "kpa": "kpm"}[mode]))
    hooked = copy.deepcopy(base)
    preprocess_corda(hooked, cfg, run_model=lambda: [hooked(**b) for b in batches])
    pm = get_peft_model(hooked, cfg)
    ours = lt.adapt(copy.deepcopy(base), lt.CorDA(r=4, alpha=8, mode=mode, targets=targets), calibration=batches)
    _copy_init_and_perturb(pm, ours)
    assert close(outputs(ours, batch(kind)), outputs(pm, batch(kind)))
    _exported_loads_both_ways(kind, ours, tmp_path)


def test_corda_without_calibration_says_what_to_pass():
    with pytest.raises(ValueError, match="calibration="):
        lt.adapt(MODELS["llama"](), lt.CorDA())


# --- VeRA -------------------------------------------------------------------------------


@pytest.mark.parametrize("save_projection", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_vera_matches_peft_both_ways(kind, save_projection, tmp_path):
    base = MODELS[kind]()
    pm = get_peft_model(copy.deepcopy(base), VeraConfig(r=8, target_modules=TARGETS[kind], init_weights=False,
                                                        save_projection=save_projection, projection_prng_key=3))
    ours = lt.adapt(copy.deepcopy(base), lt.VeRA(r=8, targets=TARGETS[kind], seed=3, save_projection=save_projection))
    for delta, layer in peft_layers(pm, ours):
        torch.testing.assert_close(delta.bank.A[:, : delta.view.in_features], layer.vera_A["default"][:, : layer.in_features],
                                   rtol=0, atol=0)  # the same regenerated projection
        with torch.no_grad():
            delta.lambda_b.copy_(layer.vera_lambda_b["default"])
            delta.lambda_d.copy_(layer.vera_lambda_d["default"])
    both_ways(kind, pm, ours, tmp_path)


@pytest.mark.parametrize("name", ["vera", "nola"])
def test_shared_random_bases_store_only_coefficients(name, tmp_path):
    base = MODELS["llama"]()
    model = lt.adapt(copy.deepcopy(base), lt.get_method(name)())
    train_steps(model, "llama", steps=2)
    lt.save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    own = {"vera": ("vera_lambda_b", "vera_lambda_d"), "nola": (".alpha", ".beta")}[name]
    assert saved and all(k.endswith(own) for k in saved), sorted(saved)[:4]
    assert sum(v.numel() for v in saved.values()) == lt.trainable_parameters(model)[0]
    inputs = batch("llama")
    torch.testing.assert_close(outputs(lt.load_adapter(copy.deepcopy(base), tmp_path), inputs), outputs(model, inputs),
                               rtol=0, atol=0)


def test_mos_layers_share_one_trainable_pool_saved_once(tmp_path):
    base = MODELS["llama"]()
    targets = ["q_proj", "o_proj"]
    model = lt.adapt(copy.deepcopy(base), lt.MoS(r=8, private=2, shards_per_vector=2, targets=targets))
    deltas = [d for _, _, d in adapter_paths(model, "default")]
    assert len(deltas) == 4 and all(d.bank is deltas[0].bank for d in deltas)
    lora = lt.adapt(copy.deepcopy(base), lt.LoRA(r=8, targets=targets))
    assert lt.trainable_parameters(model)[0] < lt.trainable_parameters(lora)[0]
    pool = deltas[-1].bank.pools["a32"]
    before = pool.detach().clone()
    train_steps(model, "llama", steps=2)
    assert not torch.equal(pool, before), "the shared pool trains"
    lt.save_adapter(model, tmp_path)
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert sum(".pools." in k for k in saved) == len(deltas[0].bank.pools), "each pool is saved once"
    assert sum(v.numel() for v in saved.values()) == lt.trainable_parameters(model)[0]


# --- AdaLoRA and the rank budget ------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_adalora_matches_peft_both_ways(kind, tmp_path):
    base = MODELS[kind]()
    pm = get_peft_model(copy.deepcopy(base), AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, total_step=10,
                                                           target_modules=TARGETS[kind], init_lora_weights=False))
    ours = lt.adapt(copy.deepcopy(base), lt.AdaLoRA(init_r=4, target_r=2, alpha=6, targets=TARGETS[kind]))
    for delta, layer in peft_layers(pm, ours):
        with torch.no_grad():
            for name in ("A", "E", "B"):
                getattr(delta, name).copy_(getattr(layer, f"lora_{name}")["default"])
    both_ways(kind, pm, ours, tmp_path)


def test_adalora_pruned_by_peft_loads_and_round_trips(tmp_path):
    kind, base = "gpt2", MODELS["gpt2"]()
    pm = get_peft_model(copy.deepcopy(base), AdaLoraConfig(init_r=4, target_r=2, total_step=6, tinit=1, tfinal=2,
                                                           target_modules=TARGETS[kind]))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    for step in range(7):
        pm(**batch(kind, seed=step)).loss.backward()
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    pm.eval()
    pm.save_pretrained(tmp_path / "peft")
    ours = lt.load_adapter(copy.deepcopy(base), tmp_path / "peft")
    ranks = sorted(d.A.shape[0] for _, _, d in adapter_paths(ours, "default"))
    assert ranks != [4] * len(ranks), "PEFT pruned some ranks; leantune must read its rank_pattern"
    inputs = batch(kind)
    assert close(outputs(ours, inputs), outputs(pm, inputs))
    lt.save_adapter(ours, tmp_path / "ours")
    assert close(outputs(PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours"), inputs), outputs(pm, inputs))


def _train_with_budget(model, budget, steps, kind="llama", lr=2e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for step in range(steps):
        loss = model(**batch(kind, seed=step % 3)).loss + budget.penalty()
        loss.backward()
        opt.step()
        budget.step(step)
        opt.zero_grad()
    model.eval()


def test_adalora_budget_prunes_to_target_like_peft():
    base = MODELS["llama"]()
    targets = ["q_proj", "v_proj", "up_proj"]
    pm = get_peft_model(copy.deepcopy(base), AdaLoraConfig(init_r=6, target_r=2, total_step=12, tinit=2, tfinal=3,
                                                           target_modules=targets, task_type="CAUSAL_LM"))
    ours = lt.adapt(copy.deepcopy(base), lt.AdaLoRA(init_r=6, target_r=2, tinit=2, tfinal=3, targets=targets))
    for delta, layer in peft_layers(pm, ours):
        with torch.no_grad():
            for name in ("A", "E", "B"):
                getattr(delta, name).copy_(getattr(layer, f"lora_{name}")["default"])
    budget = lt.rank_budget(ours, total_step=12)
    assert budget.budget(0) == 6 * 6 and budget.budget(12) == 2 * 6 and budget.budget(5) < budget.budget(4)
    _train_with_budget(ours, budget, 14)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=2e-2)
    pm.train()
    for step in range(14):
        pm(**batch("llama", seed=step % 3)).loss.backward()  # PEFT adds the same penalty in its forward
        opt.step()
        pm.base_model.update_and_allocate(step)
        opt.zero_grad()
    assert sum(budget.ranks()) == 2 * 6
    peft_kept = [int((layer.lora_E["default"] != 0).sum()) for _, layer in peft_layers(pm, ours)]
    assert budget.ranks() == peft_kept


def test_increlora_grows_to_target_without_output_jumps():
    model = lt.adapt(MODELS["llama"](), lt.IncreLoRA(init_r=1, target_r=3, max_r=4, delta_t=2, total_step=12,
                                                     targets=["q_proj", "v_proj", "down_proj"]))
    budget = lt.rank_budget(model)
    active = lambda: sum(int(d.active.sum()) for d in budget.deltas)  # noqa: E731
    assert active() == 6
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    inputs = batch("llama", seed=9)
    model.train()
    for step in range(14):
        (model(**batch("llama", seed=step % 3)).loss + budget.penalty()).backward()
        opt.step()
        before, had = outputs(model, inputs), active()
        budget.step(step)
        if step == 8:
            assert active() > had, "an allocation step adds rank"
            torch.testing.assert_close(outputs(model, inputs), before, rtol=0, atol=0)  # new components start at E = 0
        opt.zero_grad()
    assert active() == 3 * 6
    assert all(int(d.active.sum()) <= 4 for d in budget.deltas)
    assert len(set(budget.ranks())) > 1, "rank went where importance was highest, not evenly"


def test_rank_budget_refuses_other_methods_and_missing_total_step():
    model = lt.adapt(MODELS["llama"](), lt.LoRA(targets=["q_proj"]))
    with pytest.raises(TypeError, match="adalora or increlora"):
        lt.rank_budget(model)
    model = lt.adapt(MODELS["llama"](), lt.AdaLoRA(targets=["q_proj"]))
    with pytest.raises(ValueError, match="total_step"):
        lt.rank_budget(model)


# --- LoRA-FA ----------------------------------------------------------------------------


def test_lora_fa_backward_is_exact_in_fp64():
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 7, dtype=torch.float64)
    b = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: FrozenAProjection.apply(x, a, b, 0.7), (x, b))


@pytest.mark.parametrize("kind", ["llama", "gpt2"])  # engine's fused Linear path / the Conv1D path
def test_lora_fa_keeps_ax_not_x_for_backward(kind):
    model = lt.adapt(MODELS[kind](), lt.LoRAFA(r=2, targets=TARGETS[kind][:1]))
    path, site, delta = next(adapter_paths(model, "default"))
    assert isinstance(delta, LoRAFADelta) and not delta.A.requires_grad
    x = torch.randn(3, 5, delta.view.in_features)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = site(x)
    assert tuple(x.shape) not in {tuple(s) for s in saved} and (15, delta.view.in_features) not in saved
    out.sum().backward()
    assert delta.B.grad is not None and delta.B.grad.abs().sum() > 0


# --- DyLoRA ------------------------------------------------------------------------------


def test_dylora_every_nested_rank_works_after_training():
    base = MODELS["llama"]()
    targets = ["q_proj", "v_proj"]
    model = lt.adapt(copy.deepcopy(base), lt.DyLoRA(r=4, alpha=8, targets=targets))
    torch.manual_seed(0)
    train_steps(model, "llama", steps=12)
    data = batch("llama", seed=100)
    with torch.no_grad():
        base_loss = base(**data).loss
    for rank in range(1, 5):
        set_dylora_rank(model, rank)
        with torch.no_grad():
            assert model(**data).loss < base_loss, f"rank {rank} does not help"
        plain = lt.adapt(copy.deepcopy(base), lt.LoRA(r=rank, alpha=8, targets=targets))
        for (_, _, d), (_, _, p) in zip(adapter_paths(model, "default"), adapter_paths(plain, "default"), strict=True):
            with torch.no_grad():
                p.A.copy_(d.A[:rank])
                p.B.copy_(d.B[:, :rank])
        assert close(outputs(model, data), outputs(plain, data))


# --- export as plain LoRA, for every low-rank method -----------------------------------------


@pytest.mark.parametrize("name", ["rslora", "lora_fa", "dylora", "pissa", "corda", "svfit", "nola", "vera", "mos",
                                  "adalora", "increlora"])
def test_every_lowrank_method_exports_as_plain_peft_lora(name, tmp_path):
    kind = "gpt2"
    model = lt.adapt(MODELS[kind](), lt.get_method(name)(task="causal-lm"), calibration=calibration(kind))
    train_steps(model, kind, steps=2)
    _exported_loads_both_ways(kind, model, tmp_path)


def test_export_keeps_the_trained_head(tmp_path):
    kind = "bert-cls"
    model = lt.adapt(MODELS[kind](), lt.VeRA(r=16, task="seq-cls"))
    train_steps(model, kind, steps=2)
    _exported_loads_both_ways(kind, model, tmp_path)
    assert lt.adapters(lt.load_adapter(MODELS[kind](), tmp_path / "lora"))["default"].heads == ["classifier"]


def test_dora_refuses_export_as_lora(tmp_path):
    model = lt.adapt(MODELS["llama"](), lt.DoRA(targets=["q_proj"]))
    with pytest.raises(TypeError, match="cannot be written as a LoRA"):
        lt.export_lora(model, tmp_path)
