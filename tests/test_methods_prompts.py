"""Prompts and prefixes: HF PEFT parity and interop, generation with a KV cache, fold,
initialisation, the shared virtual-token hooks, and bad input."""

from __future__ import annotations

import copy
import inspect
import json

import pytest
import torch
from peft import PeftModel, PrefixTuningConfig, PromptTuningConfig, get_peft_model

import leantune as lt
from leantune.api import adapter_paths
from leantune.core.virtual_tokens import VirtualTokens

from .models import MODELS, VOCAB, batch, outputs

TASK = {"llama": ("causal-lm", "CAUSAL_LM"), "gpt2": ("causal-lm", "CAUSAL_LM"), "bert-cls": ("seq-cls", "SEQ_CLS")}
KINDS = sorted(MODELS)
DECODERS = ["gpt2", "llama"]


@pytest.fixture(scope="module")
def bases():
    return {kind: build() for kind, build in MODELS.items()}


def virtual(model, name: str = "default") -> VirtualTokens:
    (delta,) = [d for _, _, d in adapter_paths(model, name) if isinstance(d, VirtualTokens)]
    return delta


def peft_model(base, kind: str, cfg_cls, **kw):
    torch.manual_seed(1)
    pm = get_peft_model(copy.deepcopy(base), cfg_cls(task_type=TASK[kind][1], **kw))
    if kind == "bert-cls":  # make the trained head copy differ from the base head
        with torch.no_grad():
            pm.base_model.classifier.modules_to_save["default"].weight.add_(0.3)
    return pm


def copy_head(pm, ours) -> None:
    with torch.no_grad():
        ours.classifier.deltas["default"].trained.load_state_dict(
            pm.base_model.classifier.modules_to_save["default"].state_dict())


def list_the_old_cache_name(pm) -> None:
    """PEFT (0.21) runs a classifier's prefixes through its backbone only if the backbone's forward
    lists ``past_key_values``; transformers 5.25 renamed it ``cache`` and still takes the old name
    (until 5.40). List that name too, so PEFT computes the reference it always did."""
    backbone = pm.base_model.get_submodule(pm.transformer_backbone_name)
    sig = inspect.signature(backbone.forward)
    params = list(sig.parameters.values())
    if "past_key_values" in sig.parameters or "cache" not in sig.parameters:
        return
    assert params[-1].kind is inspect.Parameter.VAR_KEYWORD, "the old name goes before **kwargs"
    old = inspect.Parameter("past_key_values", inspect.Parameter.KEYWORD_ONLY, default=None)

    def forward(*args, **kwargs):
        return type(backbone).forward(backbone, *args, **kwargs)

    forward.__signature__ = sig.replace(parameters=[*params[:-1], old, params[-1]])
    backbone.forward = forward


def peft_logits(pm, kind: str, inputs, n_prompt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "bert-cls":
        list_the_old_cache_name(pm)
    with torch.no_grad():
        out = pm(**inputs)
    logits = out.logits if kind == "bert-cls" else out.logits[:, n_prompt:]  # PEFT keeps the prompt positions
    return logits, out.loss


def ours_logits(model, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return out.logits, out.loss


# --- HF PEFT parity: same weights, same logits and loss ----------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_prompt_tuning_matches_peft(bases, kind):
    base, inputs = bases[kind], batch(kind)
    pm = peft_model(base, kind, PromptTuningConfig, num_virtual_tokens=5)
    ours = lt.adapt(copy.deepcopy(base), lt.PromptTuning(num_virtual_tokens=5, task=TASK[kind][0]))
    with torch.no_grad():
        virtual(ours).weight.copy_(pm.prompt_encoder["default"].embedding.weight)
    if kind == "bert-cls":
        copy_head(pm, ours)
    (pl, ploss), (ol, oloss) = peft_logits(pm, kind, inputs, 5), ours_logits(ours, inputs)
    assert ol.shape == outputs(base, inputs).shape, "virtual positions must not reach the caller"
    assert (pl - outputs(base, inputs)).abs().max() > 1e-3
    assert (ol - pl).abs().max() <= 1e-5 and abs(oloss - ploss) <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("projection", [False, True])
def test_prefix_tuning_matches_peft(bases, kind, projection):
    base, inputs = bases[kind], batch(kind)
    pm = peft_model(base, kind, PrefixTuningConfig, num_virtual_tokens=4, prefix_projection=projection,
                    encoder_hidden_size=24)
    cfg = (lt.PrefixTuning(num_virtual_tokens=4, projection_dim=24, task=TASK[kind][0]) if projection
           else lt.PTuningV2(num_virtual_tokens=4, task=TASK[kind][0]))
    ours = lt.adapt(copy.deepcopy(base), cfg)
    enc, mine = pm.prompt_encoder["default"], virtual(ours)
    with torch.no_grad():
        if projection:
            mine.embedding.copy_(enc.embedding.weight)
            mine.transform.load_state_dict(enc.transform.state_dict())
        else:
            mine.weight.copy_(enc.embedding.weight)
    if kind == "bert-cls":
        copy_head(pm, ours)
    (pl, ploss), (ol, oloss) = peft_logits(pm, kind, inputs), ours_logits(ours, inputs)
    assert (pl - outputs(base, inputs)).abs().max() > 1e-3
    assert (ol - pl).abs().max() <= 1e-5 and abs(oloss - ploss) <= 1e-5
    if projection:  # folding the MLP away changes nothing
        lt.fold(ours)
        assert lt.adapters(ours)["default"].config.projection is False
        assert (ours_logits(ours, inputs)[0] - pl).abs().max() <= 1e-5


# --- adapter folders, both ways ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bert-cls", "llama"])
@pytest.mark.parametrize("case", ["prompt", "prefix", "prefix_projection"])
def test_peft_adapter_loads_into_leantune(bases, kind, case, tmp_path):
    base, inputs = bases[kind], batch(kind)
    if case == "prompt":
        pm = peft_model(base, kind, PromptTuningConfig, num_virtual_tokens=5)
    else:
        pm = peft_model(base, kind, PrefixTuningConfig, num_virtual_tokens=5,
                        prefix_projection=case == "prefix_projection", encoder_hidden_size=16)
    pm.save_pretrained(tmp_path)
    ours = lt.load_adapter(copy.deepcopy(base), tmp_path)
    config = lt.adapters(ours)["default"].config
    assert config.name == ("prompt_tuning" if case == "prompt" else "prefix_tuning")
    assert config.task == TASK[kind][0]
    pl, _ = peft_logits(pm, kind, inputs, 5 if case == "prompt" else 0)
    assert (outputs(ours, inputs) - pl).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["bert-cls", "llama"])
@pytest.mark.parametrize("cls", [lt.PromptTuning, lt.PTuningV2, lt.PrefixTuning], ids=lambda c: c.name)
def test_leantune_adapter_loads_into_peft(bases, kind, cls, tmp_path):
    base, inputs = bases[kind], batch(kind)
    torch.manual_seed(2)
    ours = lt.adapt(copy.deepcopy(base), cls(num_virtual_tokens=4, task=TASK[kind][0]))
    if kind == "bert-cls":
        with torch.no_grad():
            ours.classifier.deltas["default"].trained.weight.add_(0.3)
    if cls is lt.PrefixTuning:  # PEFT stores the prefixes the MLP computes
        lt.save_adapter(ours, tmp_path / "unfolded")
        assert not (tmp_path / "unfolded" / "adapter_config.json").exists()
        again = lt.load_adapter(copy.deepcopy(base), tmp_path / "unfolded")
        assert torch.equal(outputs(again, inputs), outputs(ours, inputs))
        lt.fold(ours)
    lt.save_adapter(ours, tmp_path / "peft")
    pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "peft")
    pl, _ = peft_logits(pm, kind, inputs, 4 if cls is lt.PromptTuning else 0)
    assert (outputs(ours, inputs) - outputs(base, inputs)).abs().max() > 1e-3
    assert (pl - outputs(ours, inputs)).abs().max() <= 1e-5


# --- generation with the KV cache ------------------------------------------------------------
GENERATING = {
    "prompt_tuning": lambda: lt.PromptTuning(num_virtual_tokens=4),
    "prefix_tuning": lambda: lt.PrefixTuning(num_virtual_tokens=4),
    "p_tuning_v2": lambda: lt.PTuningV2(num_virtual_tokens=3),
    "residual_prompt": lambda: lt.ResidualPromptTuning(num_virtual_tokens=4, bottleneck=16),
    "dept": lambda: lt.DePT(num_virtual_tokens=3, max_length=32),
    "lopt": lambda: lt.LoPT(num_virtual_tokens=4, r=2),
    "mam": lambda: lt.MAM(num_virtual_tokens=4),
    "unipelt": lambda: lt.UniPELT(num_virtual_tokens=4),
}


def perturb(model) -> None:
    """Move every trainable tensor off its init (zero-init parts would hide mistakes)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


def greedy_without_cache(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits
        ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    return ids


def generate(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    model.generation_config.eos_token_id = None  # run every step
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps,
                          do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("kind", DECODERS)
@pytest.mark.parametrize("name", sorted(GENERATING))
def test_generate_with_cache_equals_stepwise_forward(bases, kind, name):
    model = lt.adapt(copy.deepcopy(bases[kind]), GENERATING[name]())
    perturb(model)
    ids = batch(kind, n=2, length=5)["input_ids"]
    expected = greedy_without_cache(model, ids, 8)
    assert torch.equal(generate(model, ids, 8), expected)
    with lt.disabled(model):
        assert torch.equal(generate(model, ids, 8), generate(bases[kind], ids, 8))


def test_generate_with_prompt_and_prefix_adapters_together(bases):
    model = lt.adapt(copy.deepcopy(bases["llama"]), lt.PromptTuning(num_virtual_tokens=3), name="p")
    lt.adapt(model, lt.PTuningV2(num_virtual_tokens=2), name="q")
    lt.adapt(model, lt.DePT(num_virtual_tokens=2, max_length=32), name="d")
    perturb(model)
    ids = batch("llama", n=2, length=5)["input_ids"]
    assert torch.equal(generate(model, ids, 6), greedy_without_cache(model, ids, 6))


# --- the shared hooks: what the caller sees ------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning_v2", "dept"])
def test_padding_and_call_forms(bases, kind, name, tmp_path):
    model = lt.adapt(copy.deepcopy(bases[kind]), GENERATING[name]())
    perturb(model)
    inputs = {k: v for k, v in batch(kind).items() if k != "labels"}
    full = outputs(model, inputs)
    # right padding is masked: row 0 (3 pads) equals the row without its pads
    alone = outputs(model, {"input_ids": inputs["input_ids"][:1, :-3]})
    if kind == "bert-cls":
        torch.testing.assert_close(full[:1], alone, rtol=0, atol=1e-5)
    else:
        torch.testing.assert_close(full[:1, :-3], alone, rtol=0, atol=1e-5)
    with torch.no_grad():
        positional = model(inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        as_tuple = model(**inputs, return_dict=False)
        hidden = model(**inputs, output_hidden_states=True).hidden_states
    assert torch.equal(positional, full) and isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full)
    assert all(h.shape[1] == inputs["input_ids"].shape[1] for h in hidden)
    if kind != "bert-cls":
        ids = inputs["input_ids"]
        pos = torch.arange(ids.shape[1]).expand_as(ids)
        torch.testing.assert_close(outputs(model, {"input_ids": ids, "position_ids": pos}),
                                   outputs(model, {"input_ids": ids}), rtol=0, atol=1e-5)


def test_unload_removes_the_hooks(bases):
    base = bases["llama"]
    model = lt.adapt(copy.deepcopy(base), lt.PromptTuning(num_virtual_tokens=3))
    inputs = batch("llama")
    lt.unload(model)
    torch.testing.assert_close(outputs(model, inputs), outputs(base, inputs), rtol=0, atol=0)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_compose_with_lora_and_a_preset(bases, tmp_path):
    base, inputs = bases["llama"], batch("llama")
    cfg = lt.Compose([lt.PromptTuning(num_virtual_tokens=3), lt.LoRA(targets=["q_proj"], init="random"),
                      lt.MAM(num_virtual_tokens=2)])
    model = lt.adapt(copy.deepcopy(base), cfg)
    perturb(model)
    lt.save_adapter(model, tmp_path)
    loaded = lt.load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(outputs(loaded, inputs), outputs(model, inputs))
    before = outputs(model, inputs)
    lt.fold(model)  # the MAM prefix loses its MLP, the rest stays
    torch.testing.assert_close(outputs(model, inputs), before, rtol=0, atol=1e-5)
    assert [p.name for p in lt.adapters(model)["default"].config.parts] == ["prompt_tuning", "lora", "mam"]
    assert lt.adapters(model)["default"].config.parts[2].projection is False


# --- fold ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,after", [("residual_prompt", "prompt_tuning"), ("lopt", "prompt_tuning"),
                                        ("prefix_tuning", "prefix_tuning"), ("mam", "mam")])
def test_fold_keeps_outputs_and_gives_the_plain_form(bases, name, after, tmp_path):
    base, inputs = bases["llama"], batch("llama")
    model = lt.adapt(copy.deepcopy(base), GENERATING[name]())
    perturb(model)
    before, trainable = outputs(model, inputs), lt.trainable_parameters(model)[0]
    lt.fold(model)
    torch.testing.assert_close(outputs(model, inputs), before, rtol=0, atol=1e-5)
    assert lt.adapters(model)["default"].config.name == after
    folded = lt.trainable_parameters(model)[0]
    assert folded == 4 * 32 if after == "prompt_tuning" else 0 < folded < trainable  # a plain 4 × hidden prompt
    lt.save_adapter(model, tmp_path)
    if after == "prompt_tuning":  # now plain prompt tuning: HF PEFT reads it
        pm = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
        assert (peft_logits(pm, "llama", inputs, 4)[0] - before).abs().max() <= 1e-5
    assert torch.equal(outputs(lt.load_adapter(copy.deepcopy(base), tmp_path), inputs), outputs(model, inputs))


# --- initialisation ------------------------------------------------------------------------------
def word_level_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)} | {"[UNK]": 0}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def test_prompt_init_from_text_and_vocabulary(bases, tmp_path):
    base = bases["llama"]
    emb = base.get_input_embeddings().weight
    tokenizer = word_level_tokenizer()
    tokenizer.save_pretrained(tmp_path / "tok")
    for tok in (tokenizer, str(tmp_path / "tok")):
        cfg = lt.PromptTuning(num_virtual_tokens=5, init="text", init_text="w7 w9", tokenizer=tok)
        assert cfg.init_ids == [7, 9]
        model = lt.adapt(copy.deepcopy(base), cfg)
        torch.testing.assert_close(virtual(model).weight, emb[[7, 9, 7, 9, 7]], rtol=0, atol=0)
    saved = json.loads(json.dumps(cfg.to_dict()))  # the ids are kept: reloading needs no tokenizer
    assert saved["init_ids"] == [7, 9] and saved["tokenizer"] == str(tmp_path / "tok")
    model = lt.adapt(copy.deepcopy(base), lt.ResidualPromptTuning(num_virtual_tokens=6))  # vocab by default
    rows = virtual(model).weight
    assert all(any(torch.equal(r, e) for e in emb) for r in rows)


# --- DePT's two learning rates -------------------------------------------------------------------
def test_dept_param_groups_and_length_limit(bases):
    cfg = lt.DePT(num_virtual_tokens=3, max_length=10, task="seq-cls")
    model = lt.adapt(copy.deepcopy(bases["bert-cls"]), cfg)
    groups = lt.param_groups(model, lr=1e-3)
    delta = virtual(model)
    assert [g["lr"] for g in groups] == [cfg.prompt_lr, cfg.low_rank_lr, 1e-3]
    assert groups[0]["params"] == [delta.weight] and groups[1]["params"] == [delta.A, delta.B]
    assert {id(p) for p in groups[2]["params"]} == {id(p) for p in model.classifier.deltas["default"].parameters()}
    assert [g["lr"] for g in lt.param_groups(lt.adapt(copy.deepcopy(bases["bert-cls"]), lt.LoRA()), 2e-3)] == [2e-3]
    torch.optim.AdamW(groups)
    with pytest.raises(ValueError, match="max_length=10"):
        model(**batch("bert-cls"))


# --- bad input -----------------------------------------------------------------------------------
def test_bad_input_is_refused_clearly(bases):
    from transformers import T5Config, T5ForConditionalGeneration

    llama = copy.deepcopy(bases["llama"])
    with pytest.raises(ValueError, match="input embeddings"):
        lt.adapt(llama, lt.PromptTuning(targets=["q_proj"]))
    with pytest.raises(ValueError, match="init_text= and tokenizer="):
        lt.PromptTuning(init="text")
    with pytest.raises(ValueError, match="unknown init"):
        lt.PromptTuning(init="zeros")
    with pytest.raises(ValueError, match="leaves no room"):
        lt.adapt(copy.deepcopy(bases["gpt2"]), lt.PromptTuning(num_virtual_tokens=64))
    with pytest.raises(ValueError, match="no reparameterisation"):
        lt.PTuningV2(projection=True)
    with pytest.raises(ValueError, match="r must be"):
        lt.LoPT(num_virtual_tokens=4, r=5)
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2))
    with pytest.raises(ValueError, match="encoder-decoder"):
        lt.adapt(t5, lt.PromptTuning())
    model = lt.adapt(llama, lt.PrefixTuning(num_virtual_tokens=2))
    ids = batch("llama")["input_ids"]
    with pytest.raises(ValueError, match="2-D attention_mask"):
        model(input_ids=ids, attention_mask=torch.ones(ids.shape[0], 1, ids.shape[1], ids.shape[1]))
    model.gradient_checkpointing_enable()
    model.train()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        model(input_ids=ids)
