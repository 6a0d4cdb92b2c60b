"""``lt.compile``'s graph pass: thin products that read one tensor run as one, with the same results."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import leantune as lt
from leantune.engine import causal_lm_loss, thin_products
from leantune.engine.thin_products import MAX_THIN, group_thin_products

from .models import VOCAB, tiny_llama

MM = torch.ops.aten.mm.default


def _mm_count(gm: torch.fx.GraphModule) -> int:
    return sum(n.target is MM for n in gm.graph.nodes)


def _grouped(f, *args) -> tuple[torch.fx.GraphModule, int, int]:
    """``f`` traced with fake tensors, then rewritten by the pass: (module, mm before, merged)."""
    gm = make_fx(f, tracing_mode="fake")(*args)
    before = _mm_count(gm)
    merged = group_thin_products(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm, before, merged


def test_products_sharing_either_operand_become_one_and_give_the_same_values():
    torch.manual_seed(0)
    x, g = torch.randn(40, 24), torch.randn(40, 5)
    a1, a2, a3 = torch.randn(3, 24), torch.randn(4, 24), torch.randn(2, 24)
    p1, p2 = torch.randn(40, 6), torch.randn(40, 7)

    def f(x, g, a1, a2, a3, p1, p2):
        # x Aᵢᵀ: x shared on the left; pᵢᵀ x: x shared on the right (A's gradient in a backward)
        left = [x @ a.T for a in (a1, a2, a3)]
        right = [p.T @ x for p in (p1, p2)]
        return sum(t.sum(1) for t in left) + g.sum(1), [t * 2 for t in right]

    args = (x, g, a1, a2, a3, p1, p2)
    gm, before, merged = _grouped(f, *args)
    assert (before, merged, _mm_count(gm)) == (5, 5, 2)
    for got, want in zip(torch.utils._pytree.tree_leaves(gm(*args)), torch.utils._pytree.tree_leaves(f(*args)),
                         strict=True):
        torch.testing.assert_close(got, want)


def test_a_product_whose_operand_needs_another_ones_result_is_left_alone():
    torch.manual_seed(0)
    x, a = torch.randn(30, 16), torch.randn(4, 16)

    def f(x, a):
        y = x @ a.T  # 30 × 4
        b = (y.T @ y) @ a  # built from y: x @ bᵀ cannot run in one product with x @ aᵀ
        return x @ b.T

    gm, before, merged = _grouped(f, x, a)
    assert merged == 0 and _mm_count(gm) == before
    torch.testing.assert_close(gm(x, a), f(x, a))


def test_wide_products_are_not_grouped():
    # concatenating wide operands would copy real weights every step: only thin ones join
    x, w1, w2 = torch.randn(8, 16), torch.randn(MAX_THIN + 1, 16), torch.randn(MAX_THIN + 1, 16)
    gm, before, merged = _grouped(lambda x, w1, w2: (x @ w1.T, x @ w2.T), x, w1, w2)
    assert merged == 0 and before == 2


@pytest.fixture
def compile_afresh():
    """No compiled graph from inductor's caches: the pass must run to be seen running."""
    with torch._inductor.config.patch(fx_graph_cache=False), torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def _llama_step(compiler, **kwargs) -> tuple[float, list[torch.Tensor]]:
    model = tiny_llama()
    lt.adapt(model, lt.LoRA(r=4, targets=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"], init="random"))
    torch._dynamo.reset()
    loss_fn = compiler(partial(causal_lm_loss, model), **kwargs)
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
    loss = loss_fn(ids, ids)
    loss.backward()
    return loss.item(), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("kwargs", [{}, {"mode": "reduce-overhead"}, {"dynamic": True}],
                         ids=["default", "mode", "dynamic-shapes"])
@pytest.mark.usefixtures("compile_afresh")
def test_lt_compile_groups_a_llama_layers_thin_products_with_the_same_loss_and_gradients(monkeypatch, kwargs):
    merged_per_graph = []
    group = thin_products.group_thin_products
    monkeypatch.setattr(thin_products, "group_thin_products", lambda graph: merged_per_graph.append(group(graph)))
    # a mode is turned into the options it stands for; with dynamic shapes the token count is a
    # symbol, and the ranks (plain numbers) still say which products are thin
    loss, grads = _llama_step(lt.compile, **kwargs)
    # forward and backward were compiled, and the pass grouped products in both
    assert len(merged_per_graph) == 2 and all(n > 0 for n in merged_per_graph)
    ref_loss, ref_grads = _llama_step(partial(lt.compile, group_thin_products=False))
    assert loss == pytest.approx(ref_loss, rel=1e-6)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.usefixtures("compile_afresh")
def test_a_pass_of_the_callers_own_wins():
    calls = []

    class Own(thin_products.GroupThinProducts):
        def __call__(self, graph):
            calls.append(graph)

        def uuid(self):  # None: no cached graph stands in for a run of this pass
            return None

    _llama_step(lt.compile, options={"post_grad_custom_post_pass": Own()})
    assert len(calls) == 2


def test_views_of_the_inputs_move_up_so_that_products_far_apart_still_group():
    # as in a traced forward: x Aₖᵀ's transpose of Aₖ is traced after x A_qᵀ is already used
    torch.manual_seed(0)
    x, a_q, a_k = torch.randn(80, 70), torch.randn(4, 70), torch.randn(4, 70)

    def f(x, a_q, a_k):
        y_q = (x @ a_q.T).relu()
        z = y_q.sum() * x  # a use of x A_qᵀ before A_kᵀ exists in the graph
        return z, x @ a_k.T

    gm, before, merged = _grouped(f, x, a_q, a_k)
    assert (before, merged) == (2, 2)
    torch.testing.assert_close(gm(x, a_q, a_k), f(x, a_q, a_k))


def test_products_whose_operands_carry_no_value_are_left_alone():
    # another pass may add nodes without a fake value: the pass cannot size them, so skips them
    x, a1, a2 = torch.randn(40, 24), torch.randn(3, 24), torch.randn(4, 24)
    gm = make_fx(lambda x, a1, a2: (x @ a1.T, x @ a2.T), tracing_mode="fake")(x, a1, a2)
    next(n for n in gm.graph.nodes if n.op == "placeholder").meta.pop("val")
    assert group_thin_products(gm.graph) == 0 and _mm_count(gm) == 2
