"""Every registered method through the same checks, on three model families."""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import leantune as lt

from .harness import calibration, method_config, snapshot, train_steps
from .models import MODELS, batch, outputs

METHODS = sorted(lt.methods())
KINDS = sorted(MODELS)


@pytest.fixture(scope="module")
def bases():
    return {kind: build() for kind, build in MODELS.items()}


def adapted(bases, name: str, kind: str, trained: bool = True):
    base = bases[kind]
    model = lt.adapt(copy.deepcopy(base), method_config(name, kind), calibration=calibration(kind))
    before = snapshot(model)
    if trained:
        train_steps(model, kind)
    return base, model, before


def delta_keys(model, name: str = "default") -> set[str]:
    """State-dict keys that belong to adapter ``name``."""
    return {k for k in model.state_dict() if f".deltas.{name}." in k}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_only_adapter_parameters_train(bases, name, kind):
    _, model, before = adapted(bases, name, kind)
    after = snapshot(model)
    mine = delta_keys(model)
    assert mine, f"{name} attached nothing to {kind}"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable <= mine, f"{name}: base parameters left trainable: {sorted(trainable - mine)[:5]}"
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed, f"{name}: training changed nothing"
    assert changed <= mine, f"{name}: frozen tensors changed: {sorted(changed - mine)[:5]}"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_training_changes_output_and_disabled_is_base(bases, name, kind):
    base, model, _ = adapted(bases, name, kind)
    inputs = batch(kind, seed=7)
    assert not torch.allclose(outputs(model, inputs), outputs(base, inputs), atol=1e-6)
    # A method that stores the base in 4-bit (qlora) keeps only that base: `disabled` runs it.
    stored_base = lt.unload(copy.deepcopy(model)) if getattr(lt.get_method(name), "quantizes_base", False) else base
    with lt.disabled(model):
        torch.testing.assert_close(outputs(model, inputs), outputs(stored_base, inputs), rtol=0, atol=1e-6)
    assert not torch.allclose(outputs(model, inputs), outputs(stored_base, inputs), atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_save_load_reproduces_outputs(bases, name, kind, tmp_path):
    base, model, _ = adapted(bases, name, kind)
    inputs = batch(kind, seed=7)
    lt.save_adapter(model, tmp_path / "adapter")
    loaded = lt.load_adapter(copy.deepcopy(base), tmp_path / "adapter")
    torch.testing.assert_close(outputs(loaded, inputs), outputs(model, inputs), rtol=0, atol=0)
    assert lt.trainable_parameters(loaded)[0] == 0, "a loaded adapter is frozen unless is_trainable=True"


@pytest.mark.parametrize("name", METHODS)
def test_fused_linear_flag_says_which_path_training_takes(bases, name, monkeypatch):
    """``leantune methods`` prints ``fused_linear``: it must be what a training forward does."""
    fused = sys.modules["leantune.engine.lowrank_linear"]
    calls = []
    real = fused.lowrank_linear
    monkeypatch.setattr(fused, "lowrank_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    _, model, _ = adapted(bases, name, "llama", trained=False)
    model.train()
    model(**{k: v for k, v in batch("llama").items() if k != "labels"})
    assert bool(calls) == lt.get_method(name).fused_linear, f"{name}: {len(calls)} fused calls"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_merge_matches_and_unmerge_restores(bases, name, kind):
    if not lt.get_method(name).mergeable:
        pytest.skip(f"{name} is not mergeable by design")
    base, model, _ = adapted(bases, name, kind)
    inputs = batch(kind, seed=7)
    expected = outputs(model, inputs)
    weights_before = snapshot(model)
    lt.merge(model)
    torch.testing.assert_close(outputs(model, inputs), expected, rtol=0, atol=1e-4)
    lt.unmerge(model)
    for k, v in snapshot(model).items():
        torch.testing.assert_close(v, weights_before[k], rtol=0, atol=1e-6, msg=f"{name}: unmerge left {k} changed")
    lt.merge(model)
    merged = lt.unload(model)
    torch.testing.assert_close(outputs(merged, inputs), expected, rtol=0, atol=1e-4)
    assert type(merged) is type(base)
    # The base layout, plus a bias wherever a vector shift was folded into a module that had none.
    assert set(base.state_dict()) <= set(merged.state_dict()), "merge+unload must keep the base layout"
    added = set(merged.state_dict()) - set(base.state_dict())
    assert all(k.endswith(".bias") and base.get_submodule(k[: -len(".bias")]).bias is None for k in added), (
        f"merge+unload must give back the base layout; it added {sorted(added)[:5]}"
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", METHODS)
def test_bf16_forward_and_backward(bases, name, kind):
    _, model, _ = adapted(bases, name, kind, trained=False)
    model = model.to(torch.bfloat16)
    out = model(**batch(kind))
    assert out.logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss.float())
    out.loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g.float()).all() for g in grads)


@pytest.mark.parametrize("name", METHODS)
def test_two_adapters_switch_and_stack(bases, name):
    kind = "llama"
    base = bases[kind]
    model = lt.adapt(copy.deepcopy(base), method_config(name, kind), name="a", calibration=calibration(kind))
    train_steps(model, kind, steps=3)
    lt.adapt(model, method_config(name, kind), name="b", calibration=calibration(kind))
    train_steps(model, kind, steps=3, lr=2e-2)
    inputs = batch(kind, seed=7)
    lt.set_active(model, "a")
    out_a = outputs(model, inputs)
    lt.set_active(model, "b")
    out_b = outputs(model, inputs)
    assert not torch.allclose(out_a, out_b, atol=1e-6)
    lt.set_active(model, ["a", "b"])
    out_ab = outputs(model, inputs)
    assert not torch.allclose(out_ab, out_a, atol=1e-6) and not torch.allclose(out_ab, out_b, atol=1e-6)
    lt.delete_adapter(model, "b")
    assert sorted(lt.adapters(model)) == ["a"]
    torch.testing.assert_close(outputs(model, inputs), out_a, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the lent GPU)")
@pytest.mark.parametrize("name", METHODS)
def test_adapts_trains_and_merges_on_cuda(bases, name):
    """Every method's init (calibration, SVD, pruning), step and merge keep to the model's device."""
    kind = "llama"
    model = lt.adapt(copy.deepcopy(bases[kind]).cuda(), method_config(name, kind), calibration=calibration(kind, "cuda"))
    losses = train_steps(model, kind, steps=3, device="cuda")
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(t.is_cuda for t in [*model.parameters(), *model.buffers()])
    inputs = {k: v.cuda() for k, v in batch(kind, seed=7).items()}
    before = outputs(model, inputs)
    if lt.adapters(model)["default"].config.mergeable:
        lt.merge(model)
        torch.testing.assert_close(outputs(model, inputs), before, rtol=1e-3, atol=1e-3)
