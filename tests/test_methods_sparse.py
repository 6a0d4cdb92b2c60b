"""Sparse deltas: the shared container's arithmetic and each sparse method's own rules."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import leantune as lt
from leantune.api import adapter_paths
from leantune.core.sparse import (
    ColumnDelta,
    GrowthTracker,
    MaskDelta,
    ProjectedDelta,
    SparseDelta,
    hashed_projection,
    logical_weight,
)
from leantune.core.weights import weight_view

from .harness import train_steps
from .models import batch, outputs, tiny_bert_cls, tiny_gpt2, tiny_llama


def modules() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    emb = nn.Embedding(11, 6, padding_idx=0)
    return {"linear": nn.Linear(7, 5), "conv1d": Conv1D(5, 7), "embedding": emb}


def module_input(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if kind == "embedding":
        return torch.tensor([[0, 3, 3, 10], [1, 0, 5, 3]])
    return torch.randn(2, 3, 7, generator=g, requires_grad=True)


def dense_reference(module: nn.Module, x: torch.Tensor, dw_logical: torch.Tensor) -> torch.Tensor:
    """The base module's operator on ``W + ΔW`` with plain autograd."""
    view = weight_view(module)
    if view.kind == "embedding":
        return F.embedding(x, module.weight + dw_logical.T, padding_idx=module.padding_idx)
    return F.linear(x, logical_weight(module, view) + dw_logical, module.bias)


@pytest.mark.parametrize("kind", ["linear", "conv1d", "embedding"])
def test_sparse_delta_matches_dense_autograd(kind):
    module = modules()[kind]
    view = weight_view(module)
    numel = view.out_features * view.in_features
    indices = torch.tensor([0, 4, 9, numel - 1, 13, 22])
    delta = SparseDelta(view, indices)
    with torch.no_grad():
        delta.values.copy_(torch.linspace(-1, 1, indices.numel()))
    x, x_ref = module_input(kind), module_input(kind)
    out = delta.post(module, x, module(x))

    values_ref = delta.values.detach().clone().requires_grad_(True)
    dw = torch.zeros(numel).index_put((indices,), values_ref).view(view.out_features, view.in_features)
    ref = dense_reference(module, x_ref, dw)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)

    upstream = torch.randn_like(ref)
    (out * upstream).sum().backward()
    (ref * upstream).sum().backward()
    torch.testing.assert_close(delta.values.grad, values_ref.grad, rtol=1e-5, atol=1e-6)
    if kind != "embedding":
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    else:  # the padding row (token 0) never learns, as in the base embedding
        assert delta.values.grad[indices % view.in_features == 0].abs().sum() == 0

    # only the values train: storage (and so optimizer state) is proportional to the non-zeros
    assert [p.numel() for p in delta.parameters()] == [indices.numel()]
    weight = module.weight.detach().clone()
    delta.merge(module)
    torch.testing.assert_close(module(x.detach()), ref.detach(), rtol=1e-5, atol=1e-6)
    delta.unmerge(module)
    torch.testing.assert_close(module.weight, weight, rtol=0, atol=1e-7)


def test_sparse_backward_keeps_no_dense_weight_sized_tensor():
    module = nn.Linear(64, 48)
    delta = SparseDelta(weight_view(module), torch.arange(0, 64 * 48, 97))
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = delta.post(module, torch.randn(4, 64), torch.zeros(4, 48))
    out.sum().backward()
    assert torch.Size([48, 64]) not in saved, f"a dense ΔW was kept for backward: {saved}"
    assert delta.values.grad.shape == delta.values.shape


def test_column_delta_keeps_only_selected_input_features():
    module = nn.Linear(16, 6)
    columns = torch.tensor([2, 9, 11])
    delta = ColumnDelta(weight_view(module), columns)
    with torch.no_grad():
        delta.values.normal_()
    x = torch.randn(5, 16, requires_grad=True)
    h = module(x)
    saved: list[torch.Size] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = delta.post(module, x, h)
    assert torch.Size([5, 16]) not in saved and torch.Size([5, 3]) in saved
    out.sum().backward()
    dw = torch.zeros(6, 16)
    dw[:, columns] = delta.values.detach().view(6, 3)
    torch.testing.assert_close(out, F.linear(x, module.weight + dw, module.bias))
    before = module.weight.detach().clone()
    delta.merge(module)
    changed = (module.weight != before).any(0).nonzero().squeeze(1)
    assert changed.tolist() == columns.tolist(), "merging changes exactly the trained input columns"


def test_mask_delta_is_straight_through_and_merges_as_a_product():
    module = nn.Linear(8, 4)
    delta = MaskDelta(weight_view(module), init_score=0.01)
    with torch.no_grad():
        delta.scores[:, :3] = -1.0  # drop the first three input columns
    x = torch.randn(3, 8)
    out = delta.post(module, x, module(x))
    mask = (delta.scores > 0).float()
    torch.testing.assert_close(out, F.linear(x, module.weight * mask, module.bias))
    masked = (module.weight * mask).detach().requires_grad_(True)
    F.linear(x, masked, module.bias).sum().backward()
    out.sum().backward()
    torch.testing.assert_close(delta.scores.grad, masked.grad * module.weight)  # ∂L/∂W' ⊙ W
    before = module.weight.detach().clone()
    delta.merge(module)
    torch.testing.assert_close(module.weight, before * mask, rtol=0, atol=0)
    delta.unmerge(module)
    assert torch.equal(module.weight, before)


def test_hashed_projection_is_seeded_signed_and_orthogonal():
    column, sign = hashed_projection(5000, 37, seed=3, device=torch.device("cpu"))
    again, sign_again = hashed_projection(5000, 37, seed=3, device=torch.device("cpu"))
    assert torch.equal(column, again) and torch.equal(sign, sign_again)
    assert not torch.equal(column, hashed_projection(5000, 37, seed=4, device=torch.device("cpu"))[0])
    assert set(sign.unique().tolist()) == {-1, 1} and column.min() >= 0 and column.max() < 37
    assert column.bincount(minlength=37).min() > 0.5 * 5000 / 37  # every coordinate reaches many weights
    p = torch.zeros(5000, 37)
    p[torch.arange(5000), column] = sign.float()
    gram = p.T @ p
    assert torch.equal(gram, torch.diag(gram.diagonal())), "one non-zero per row: orthogonal columns"


def test_projected_delta_gradients_match_explicit_projection():
    lin, emb = nn.Linear(6, 5), nn.Embedding(9, 4)
    z = nn.Parameter(torch.randn(7))
    deltas = [ProjectedDelta(weight_view(m), z, seed=i) for i, m in enumerate((lin, emb))]
    x, ids = torch.randn(3, 6), torch.tensor([[1, 2, 8]])
    loss = deltas[0].post(lin, x, lin(x)).square().sum() + deltas[1].post(emb, ids, emb(ids)).square().sum()
    loss.backward()

    z_ref = z.detach().clone().requires_grad_(True)
    scales = [torch.ones((), requires_grad=True) for _ in deltas]
    dws = []
    for d, s in zip(deltas, scales, strict=True):
        column, sign = hashed_projection(d.view.out_features * d.view.in_features, 7, d.seed, torch.device("cpu"))
        p = torch.zeros(column.numel(), 7)
        p[torch.arange(column.numel()), column] = sign.float()
        dws.append((s * (p @ z_ref)).view(d.view.out_features, d.view.in_features))
    ref = dense_reference(lin, x, dws[0]).square().sum() + dense_reference(emb, ids, dws[1]).square().sum()
    ref.backward()
    torch.testing.assert_close(z.grad, z_ref.grad, rtol=1e-5, atol=1e-5)
    for d, s in zip(deltas, scales, strict=True):
        torch.testing.assert_close(d.scale.grad, s.grad, rtol=1e-5, atol=1e-5)


def test_said_shares_one_z_across_sites():
    model = lt.adapt(tiny_llama(), lt.SAID(d=64))
    deltas = [d for _, _, d in adapter_paths(model, "default")]
    assert len(deltas) > 1 and all(d.z is deltas[0].z for d in deltas)
    assert lt.trainable_parameters(model)[0] == 64 + len(deltas)
    train_steps(model, "llama", steps=2)
    assert deltas[0].z.abs().sum() > 0


@pytest.mark.filterwarnings("ignore:Full backward hook")
def test_spiel_schedule_moves_entries_to_the_largest_accumulated_gradients():
    torch.manual_seed(0)
    model = lt.adapt(tiny_llama(), lt.SpIEL(density=0.05, update_every=3, drop_fraction=0.5, targets=["q_proj"]))
    schedule = lt.SpIELSchedule(model)
    sites = [(s, d) for _, s, d in adapter_paths(model, "default")]
    for _, d in sites:  # a candidate list as large as the weight: the accumulation is exact
        d.tracker = GrowthTracker(d.view.out_features * d.view.in_features)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    accumulated = {id(d): torch.zeros(d.view.out_features * d.view.in_features) for _, d in sites}
    seen: dict[int, torch.Tensor] = {}

    def keep_input(d):
        return lambda module, args, out: seen.__setitem__(id(d), args[0].detach().reshape(-1, args[0].shape[-1]))

    def add_grad(d):  # reference: the dense gradient of W, summed as |g| over steps
        def hook(module, grad_in, grad_out):
            g = grad_out[0].reshape(-1, grad_out[0].shape[-1])
            accumulated[id(d)] += (g.T @ seen[id(d)]).abs().reshape(-1)
        return hook

    hooks = [h for site, d in sites for h in (site.register_forward_hook(keep_input(d)),
                                               site.register_full_backward_hook(add_grad(d)))]
    before = {id(d): set(d.indices.tolist()) for _, d in sites}
    for step in range(1, 4):
        model(**batch("llama", seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        if step < 3:
            assert schedule.step(step, opt) == 0
    expected = {}
    for _, d in sites:
        acc = accumulated[id(d)].clone()
        acc[d.indices] = 0
        n = round(0.5 * d.values.numel())
        dropped = d.indices[torch.topk(d.values.detach().abs(), n, largest=False).indices]
        expected[id(d)] = (set(torch.topk(acc, n).indices.tolist()), set(dropped.tolist()))
    assert schedule.step(3, opt) == sum(len(grown) for grown, _ in expected.values())
    for _, d in sites:
        grown, dropped = expected[id(d)]
        now = set(d.indices.tolist())
        assert grown <= now and not (dropped & now) and now != before[id(d)]
        assert len(now) == d.values.numel(), "density stays fixed"
        slots = torch.isin(d.indices, torch.tensor(sorted(grown)))
        assert d.values[slots].abs().sum() == 0 and opt.state[d.values]["exp_avg"][slots].abs().sum() == 0
    for h in hooks:
        h.remove()


def test_spiel_schedule_runs_every_k_steps_with_bounded_trackers():
    model = lt.adapt(tiny_gpt2(), lt.SpIEL(density=0.02, update_every=2))
    schedule = lt.SpIELSchedule(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    moved = []
    for step in range(1, 5):
        model(**batch("gpt2", seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        for _, d in schedule.sites:
            assert d.tracker.index.numel() <= d.values.numel()  # memory bounded by the non-zeros
        moved.append(schedule.step(step, opt))
    assert moved[0] == moved[2] == 0 and moved[1] > 0 and moved[3] > 0
    with pytest.raises(ValueError, match="spiel adapter named 'other'"):
        lt.SpIELSchedule(model, "other")


def test_lt_sft_phases_pick_most_changed_entries_and_restore_the_base():
    base = tiny_bert_cls()
    model = copy.deepcopy(base)
    config = lt.LTSFT(density=0.05, task="seq-cls", targets=["query", "value"])
    phases = lt.LTSFTPhases(model, config)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("query.weight", "value.weight")) or "classifier" in n for n in trainable)
    train_steps(model, "bert-cls", steps=3)
    path = "bert.encoder.layer.0.attention.self.query"
    change = (model.get_submodule(path).weight - base.get_submodule(path).weight).abs().reshape(-1)
    expected = torch.topk(change, round(0.05 * change.numel())).indices.sort().values
    phases.sparse_phase()
    delta = model.get_submodule(path).deltas["default"]
    assert torch.equal(delta.indices, expected)
    restored = lt.unload(copy.deepcopy(model)).state_dict()
    assert all(torch.equal(restored[k], v) for k, v in base.state_dict().items()), "phase 2 starts from the base"
    inputs = batch("bert-cls", seed=7)
    torch.testing.assert_close(outputs(model, inputs), outputs(base, inputs), rtol=0, atol=1e-6)
    assert lt.trainable_parameters(model)[0] > 0
    train_steps(model, "bert-cls", steps=2)
    assert not torch.allclose(outputs(model, inputs), outputs(base, inputs), atol=1e-6)


def test_lt_sft_deltas_compose_by_addition():
    model = lt.adapt(tiny_llama(), lt.LTSFT(density=0.1, seed=1), name="lang")
    train_steps(model, "llama", steps=2)
    lt.adapt(model, lt.LTSFT(density=0.1, seed=2), name="task")
    train_steps(model, "llama", steps=2)
    lt.set_active(model, ["lang", "task"])
    inputs = batch("llama", seed=7)
    both = outputs(model, inputs)
    lt.merge(model)
    torch.testing.assert_close(outputs(model, inputs), both, rtol=0, atol=1e-5)
    lt.unmerge(model)
    dw = {path: delta.delta_weight(site.base) for path, site, delta in adapter_paths(model, "lang")}
    for path, site, delta in adapter_paths(model, "task"):
        expected = site.base.weight + dw[path] + delta.delta_weight(site.base)
        lt.merge(model)
        torch.testing.assert_close(site.base.weight, expected, rtol=0, atol=1e-6)
        lt.unmerge(model)


def test_sara_trains_the_smallest_weights_with_a_nuclear_penalty():
    model = lt.adapt(tiny_llama(), lt.SaRA(density=0.1, nuclear_weight=0.5, targets=["o_proj"]))
    for _, site, delta in adapter_paths(model, "default"):
        w = site.base.weight.abs().reshape(-1)
        assert w[delta.indices].max() <= w[~torch.isin(torch.arange(w.numel()), delta.indices)].min()
    assert lt.sara_penalty(model).item() == 0
    with torch.no_grad():
        for _, _, delta in adapter_paths(model, "default"):
            delta.values.normal_()
    penalty = lt.sara_penalty(model)
    expected = sum(torch.linalg.matrix_norm(d.delta_weight(s.base), ord="nuc") for _, s, d in adapter_paths(model, "default"))
    torch.testing.assert_close(penalty, 0.5 * expected)
    penalty.backward()
    assert all(d.values.grad.abs().sum() > 0 for _, _, d in adapter_paths(model, "default"))
    with pytest.raises(ValueError, match="sara adapter"):
        lt.sara_penalty(lt.adapt(tiny_llama(), lt.LoRA()))


def test_dsee_is_lowrank_plus_sparse_on_largest_weights():
    model = lt.adapt(tiny_gpt2(), lt.DSEE(r=2, sparse_entries=5, init="random", targets=["c_attn"]))
    train_steps(model, "gpt2", steps=2)
    for _, site, stack in adapter_paths(model, "default"):
        lowrank, sparse = stack.parts
        w = site.base.weight.T.abs().reshape(-1)  # logical out × in of a GPT-2 Conv1D
        assert set(sparse.indices.tolist()) == set(torch.topk(w, 5).indices.tolist())
        before = site.base.weight.detach().clone()
        lt.merge(model)
        expected = before + lowrank.delta_weight(site.base) + sparse.delta_weight(site.base)
        torch.testing.assert_close(site.base.weight, expected, rtol=0, atol=1e-6)
        lt.unmerge(model)


def test_paca_columns_are_seeded_per_module():
    model = lt.adapt(tiny_llama(), lt.PaCA(r=4))
    cols = {path: tuple(d.columns().tolist()) for path, _, d in adapter_paths(model, "default")}
    assert len(set(cols.values())) > 1 and all(len(c) == 4 for c in cols.values())
    again = lt.adapt(tiny_llama(), lt.PaCA(r=4))
    assert cols == {path: tuple(d.columns().tolist()) for path, _, d in adapter_paths(again, "default")}


def test_mask_tuning_trains_masks_only_and_merges():
    base = tiny_llama()
    model = lt.adapt(copy.deepcopy(base), lt.MaskTuning())
    paths = [p for p, _, _ in adapter_paths(model, "default")]
    assert {p.rsplit(".", 1)[-1] for p in paths} == {"q_proj", "k_proj", "v_proj", "o_proj"}
    train_steps(model, "llama", steps=4)
    dropped = sum(int((d.scores <= 0).sum()) for _, _, d in adapter_paths(model, "default"))
    assert dropped > 0
    lt.merge(model)
    zeros = sum(int((s.base.weight == 0).sum()) for _, s, _ in adapter_paths(model, "default"))
    assert zeros == dropped


@pytest.mark.parametrize("bad, match", [
    (lambda: lt.SpIEL(density=0.0), "density must be in"),
    (lambda: lt.LTSFT(density=1.5), "density must be in"),
    (lambda: lt.SpIEL(update_every=0), "update_every"),
    (lambda: lt.SaRA(nuclear_weight=-1), "nuclear_weight"),
    (lambda: lt.PaCA(r=0), "r \\(columns"),
    (lambda: lt.DSEE(sparse_entries=0), "sparse_entries"),
    (lambda: lt.MaskTuning(init_score=0), "init_score"),
    (lambda: lt.MaskTuning(grad_dropout=1.0), "grad_dropout"),
    (lambda: lt.SAID(d=0), "intrinsic dimension"),
])
def test_bad_config_names_the_field(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_paca_wider_than_the_layer_and_conv_targets_are_errors():
    with pytest.raises(ValueError, match="exceeds the 32 input columns"):
        lt.adapt(tiny_llama(), lt.PaCA(r=40, targets=["q_proj"]))
    with pytest.raises(TypeError, match="narrow `targets`"):
        lt.adapt(tiny_llama(), lt.SpIEL(targets=["self_attn"]))
