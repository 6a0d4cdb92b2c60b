"""Sibling sites run stacked: the same outputs and gradients as each site alone, in one Function."""

from __future__ import annotations

import importlib
from functools import partial

import pytest
import torch
from torch import nn

import leantune as lt
from leantune.core import siblings
from leantune.core.siblings import stack_siblings, unstack_siblings
from leantune.core.site import iter_sites
from leantune.engine import causal_lm_loss, configure, lowrank_linear, merge_kernel
from leantune.engine.stacked_linear import stacked_linear

from .models import VOCAB, tiny_llama

stacked_module = importlib.import_module("leantune.engine.stacked_linear")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_stacked_function_passes_gradcheck_and_equals_each_site_alone():
    torch.manual_seed(0)
    d = dict(dtype=torch.float64)
    x = torch.randn(2, 5, 6, **d, requires_grad=True)
    weights = [torch.randn(n, 6, **d) for n in (4, 3, 3)]
    factors = [(torch.randn(r, 6, **d, requires_grad=True), torch.randn(w.shape[0], r, **d, requires_grad=True), s)
               for w, r, s in zip(weights, (2, 3, 1), (0.5, 2.0, 1.0), strict=True)]
    flat = [t for a, b, _ in factors for t in (a, b)]

    def stacked(x, *ab):
        fs = [(ab[2 * i], ab[2 * i + 1], s) for i, (_, _, s) in enumerate(factors)]
        return torch.cat(stacked_linear(x, weights, fs), dim=-1)

    assert torch.autograd.gradcheck(stacked, (x, *flat))
    for a, _, _ in factors:  # A frozen (LoRA-FA): no A gradient, the rest unchanged
        a.requires_grad_(False)
    assert torch.autograd.gradcheck(stacked, (x, *flat))
    stacked(x, *flat).sum().backward()
    assert all(a.grad is None for a in flat[0::2]) and all(b.grad is not None for b in flat[1::2])
    alone = torch.cat([lowrank_linear(x, w, None, [f]) for w, f in zip(weights, factors, strict=True)], dim=-1)
    assert torch.allclose(stacked(x, *flat), alone)


def _trained(stack: bool, pays: bool, monkeypatch, backend: str | None = None,
             lean: bool = False) -> tuple[float, list[torch.Tensor], int]:
    """(loss, LoRA gradients, stacked calls) of one step of a tiny Llama, with the choice to
    stack forced to ``pays`` (the merge kernel's CUDA-only choice, made on the CPU)."""
    torch.manual_seed(0)
    model = tiny_llama()
    lt.adapt(model, lt.LoRA(r=4, targets=TARGETS, init="random"))
    if lean:  # each layer's forward runs again in backward, stacked again
        configure(model, lean=True)
    if stack:
        assert stack_siblings(model) == 4  # q, k, v and gate, up in each of two layers
    monkeypatch.setattr(siblings, "stack_pays", lambda x, weights, ranks: pays)
    calls = [0]

    def counted(*args):
        calls[0] += 1
        return stacked_linear(*args)

    monkeypatch.setattr(siblings, "stacked_linear", counted)
    loss_fn = partial(causal_lm_loss, model)
    if backend:
        torch._dynamo.reset()
        loss_fn = lt.compile(loss_fn, backend=backend, fullgraph=True)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = loss_fn(ids, ids)
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters() if p.requires_grad], calls[0]


AOT = "aot_eager_decomp_partition"


@pytest.mark.parametrize(("backend", "lean"), [(None, False), (AOT, False), ("inductor", False), (None, True), (AOT, True)])
def test_stacked_siblings_give_each_sites_loss_and_gradients(backend, lean, monkeypatch):
    """Eager, traced, and through inductor (on the CPU: the sibling outputs are views of one
    product, which inductor must keep apart)."""
    want_loss, want_grads, none = _trained(False, True, monkeypatch)
    loss, grads, calls = _trained(True, True, monkeypatch, backend, lean)
    assert none == 0 and calls == (8 if lean and not backend else 4), calls
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for got, want in zip(grads, want_grads, strict=True):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-7)


def test_siblings_run_alone_where_the_stack_does_not_pay_or_cannot_apply(monkeypatch):
    assert _trained(True, False, monkeypatch)[2] == 0  # on the CPU, uncompiled, the stack does not pay
    torch.manual_seed(0)
    model = tiny_llama()
    lt.adapt(model, lt.LoRA(r=4, targets=TARGETS, init="random", dropout=0.1))
    stack_siblings(model)
    monkeypatch.setattr(siblings, "stack_pays", lambda x, weights, ranks: True)
    ran = []
    monkeypatch.setattr(siblings, "stacked_linear", lambda *a: ran.append(1))
    model(torch.randint(0, VOCAB, (1, 8)))
    assert not ran  # dropout: no fused factors
    unstack_siblings(model)
    assert all(s.stack is None for _, s in iter_sites(model))


class _CrossAttention(nn.Module):
    """``q`` reads one input, ``k`` and ``v`` another: the siblings must not share."""

    def __init__(self) -> None:
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(6, 6, bias=False) for _ in range(3))

    def forward(self, x, y):
        return self.q_proj(x) * self.k_proj(y) + self.v_proj(y)


def test_a_sibling_called_on_another_input_computes_its_own_output(monkeypatch):
    torch.manual_seed(0)
    block = _CrossAttention()
    lt.adapt(block, lt.LoRA(r=2, targets=["q_proj", "k_proj", "v_proj"], init="random"))
    x, y = torch.randn(3, 6), torch.randn(3, 6)
    want = block(x, y)
    assert stack_siblings(block) == 1
    monkeypatch.setattr(siblings, "stack_pays", lambda x, weights, ranks: True)
    assert torch.allclose(block(x, y), want, atol=1e-6)
    with torch.no_grad():  # no backward to share: each site alone, and nothing held over
        assert torch.allclose(block(x, y), want, atol=1e-6)
    assert block.q_proj.stack.held == []


def test_stacking_is_chosen_under_compile_when_the_forward_merges(monkeypatch):
    monkeypatch.setattr(merge_kernel, "available", lambda weight, rank: True)
    qkv = [torch.zeros(64, 32), torch.zeros(16, 32), torch.zeros(16, 32)]
    gate_up = [torch.zeros(256, 32)] * 2
    many, few = torch.zeros(100, 32), torch.zeros(20, 32)
    assert not stacked_module.stack_pays(many, qkv, [4] * 3)  # eager
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not stacked_module.stack_pays(few, qkv, [4] * 3)  # 20 tokens < 32 inputs: no forward merge
    assert stacked_module.stack_pays(many, qkv, [4] * 3) and stacked_module.stack_pays(many, gate_up, [4] * 2)
    monkeypatch.setattr(merge_kernel, "available", lambda weight, rank: rank < 4)
    assert not stacked_module.stack_pays(many, qkv, [4] * 3)  # no merge kernel for these factors


def test_merged_weight_writes_into_a_stack_and_refuses_a_stack_without_room():
    torch.manual_seed(0)
    w, a, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(5, 3)
    stack, stack_t = torch.zeros(9, 7), torch.zeros(7, 9)
    merge_kernel.merged_weight(w, a, b, 0.5, out=stack, at=4)
    merge_kernel.merged_weight(w, a, b, 0.5, transposed=True, out=stack_t, at=4)
    assert torch.allclose(stack[4:], w + 0.5 * b @ a) and not stack[:4].any()
    assert torch.allclose(stack_t[:, 4:], (w + 0.5 * b @ a).T) and not stack_t[:, :4].any()
    with pytest.raises(ValueError, match="no room"):
        merge_kernel.merged_weight(w, a, b, out=stack, at=5)


@CUDA
def test_cuda_stacked_bf16_matches_fp32_reference():
    torch.manual_seed(0)
    k, ns, r = 1024, (1024, 256, 256), 16
    x = torch.randn(2048, k, device="cuda", requires_grad=True)
    weights = [torch.randn(n, k, device="cuda") / k**0.5 for n in ns]
    factors = [(torch.randn(r, k, device="cuda", requires_grad=True) / k**0.5,
                torch.randn(n, r, device="cuda", requires_grad=True) / r, 2.0) for n in ns]
    g = torch.randn(2048, sum(ns), device="cuda")

    def grads(dtype):
        xx = x.detach().to(dtype).requires_grad_()
        fs = [(a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_(), s) for a, b, s in factors]
        out = torch.cat(stacked_linear(xx, [w.to(dtype) for w in weights], fs), dim=-1)
        out.backward(g.to(dtype))
        return [out, xx.grad] + [t.grad for a, b, _ in fs for t in (a, b)]

    for got, want in zip(grads(torch.bfloat16), grads(torch.float32), strict=True):
        assert torch.linalg.norm(got.float() - want) <= 2e-2 * torch.linalg.norm(want)


@CUDA
def test_cuda_compiled_stack_runs_the_merge_kernel_and_matches_sites_alone(monkeypatch):
    def step(stack: bool) -> tuple[float, list[torch.Tensor], int]:
        torch.manual_seed(0)
        model = tiny_llama().to("cuda", torch.bfloat16)
        lt.adapt(model, lt.LoRA(r=4, targets=TARGETS, init="random"))
        if stack:
            stack_siblings(model)
        calls = [0]

        def counted(*args):
            calls[0] += 1
            return stacked_linear(*args)

        monkeypatch.setattr(siblings, "stacked_linear", counted)
        torch._dynamo.reset()
        loss_fn = lt.compile(partial(causal_lm_loss, model))
        ids = torch.randint(0, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0)).cuda()
        loss = loss_fn(ids, ids)  # 96 tokens > 32 inputs: the forward merges, so the stack runs
        loss.backward()
        return loss.item(), [p.grad.float() for p in model.parameters() if p.requires_grad], calls[0]

    want_loss, want_grads, _ = step(False)
    loss, grads, calls = step(True)
    assert calls == 4
    assert loss == pytest.approx(want_loss, rel=1e-2)
    for got, want in zip(grads, want_grads, strict=True):
        assert torch.linalg.norm(got - want) <= 5e-2 * torch.linalg.norm(want) + 1e-6


def test_compiled_stacked_training_traces_once_and_follows_eager(monkeypatch):
    monkeypatch.setattr(siblings, "stack_pays", lambda x, weights, ranks: True)

    def losses(compiled: bool) -> list[float]:
        torch.manual_seed(0)
        model = tiny_llama()
        lt.adapt(model, lt.LoRA(r=4, targets=TARGETS, init="random"))
        stack_siblings(model)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.1)
        loss_fn = partial(causal_lm_loss, model)
        if compiled:
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            loss_fn = lt.compile(loss_fn, backend="aot_eager_decomp_partition")
        out = []
        for seed in range(3):
            ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(seed))
            loss = loss_fn(ids, ids)
            loss.backward()
            opt.step()
            opt.zero_grad()
            out.append(loss.item())
        return out

    want = losses(False)
    got = losses(True)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    assert got == pytest.approx(want, rel=1e-5)
