"""The merged-weight form of the fused linear: its kernel and when it is chosen."""

from __future__ import annotations

import importlib

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from leantune.engine import merge_kernel
from leantune.engine.lowrank_linear import merge_pays

# the module, which the package's function of the same name hides
lowrank_linear_module = importlib.import_module("leantune.engine.lowrank_linear")
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_path_is_weight_plus_product_and_merging_is_never_chosen_off_cuda():
    torch.manual_seed(0)
    w, a, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(5, 3)
    assert torch.allclose(merge_kernel.merged_weight(w, a, b), w + b @ a, atol=1e-6)
    half = merge_kernel.merged_weight(w.bfloat16(), a, b, 0.5)  # factors cast to the weight's dtype, then scaled
    assert half.dtype == torch.bfloat16
    assert torch.equal(half, torch.addmm(w.bfloat16(), b.bfloat16() * 0.5, a.bfloat16()))
    assert torch.allclose(merge_kernel.merged_weight(w, a, b, transposed=True), (w + b @ a).T, atol=1e-6)
    assert merge_kernel.merged_weight(w, a, b, transposed=True).is_contiguous()
    assert merge_pays(torch.randn(10_000, 7), w, 3) == (False, False)  # no kernel on CPU: deltas stay on the activations


def test_merging_is_chosen_only_under_compile_and_per_direction_when_tokens_outnumber_that_side(monkeypatch):
    # The choice itself, on the CPU: pretend the kernel is there.
    monkeypatch.setattr(merge_kernel, "available", lambda weight, rank: True)
    square, wide_out, wide_in = torch.zeros(64, 64), torch.zeros(512, 64), torch.zeros(64, 512)
    many, few = torch.zeros(256, 64), torch.zeros(16, 64)
    assert merge_pays(many, square, 4) == (False, False)  # eager: launched from Python, the kernel costs more than it saves
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert merge_pays(many, square, 4) == (True, True)  # 256 tokens > 64 either side
    assert merge_pays(few, square, 4) == (False, False)  # 16 tokens < 64
    # 256 tokens against 512 outputs: the backward's merge would move more than the input gradient
    assert merge_pays(many, wide_out, 4) == (True, False)
    assert merge_pays(torch.zeros(256, 512), wide_in, 4) == (False, True)  # and the forward's than the output


@CUDA
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("n", "k", "r"), [(2048, 2048, 16), (300, 700, 3), (129, 8192, 40), (512, 384, 64)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("factors", ["in_weight_dtype", "fp32_scaled"])
def test_cuda_kernel_matches_fp32_merge(dtype, n, k, r, transposed, factors):
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") / k**0.5
    a, b = torch.randn(r, k, device="cuda") / k**0.5, torch.randn(n, r, device="cuda") / r
    scale = 0.5 if factors == "fp32_scaled" else 1.0
    if factors == "in_weight_dtype":
        a, b = a.to(dtype), b.to(dtype)
    # what the kernel must use: the factors cast to the weight's dtype, B scaled after the cast
    a_used, b_used = a.to(dtype), b.to(dtype) * scale
    ref = w + b_used.float() @ a_used.float()
    got = merge_kernel.merged_weight(w.to(dtype), a, b, scale, transposed=transposed)
    assert got.dtype == dtype and got.is_contiguous()
    got = got.T if transposed else got
    # one rounding of an fp32 sum (plus the rounding of w itself to dtype)
    assert ((got.float() - ref).abs() <= 2 ** -7 * ref.abs() + 2 ** -7 * w.abs() + 1e-6).all()


@CUDA
def test_cuda_merge_is_chosen_under_compile_when_tokens_outnumber_the_weight(monkeypatch):
    w = torch.zeros(2048, 2048, device="cuda", dtype=torch.bfloat16)
    many, few = (torch.zeros(n, 2048, device="cuda", dtype=torch.bfloat16) for n in (4096, 512))
    assert merge_pays(many, w, 16) == (False, False)  # eager: the kernel's Python launch costs more than it saves
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert merge_pays(many, w, 16) == (True, True)
    assert merge_pays(few, w, 16) == (False, False)
    assert merge_pays(many.float(), w.float(), 16) == (False, False)  # fp32: no kernel
    assert merge_pays(many, w, merge_kernel.MAX_RANK + 1) == (False, False)  # the rank is one tile of the kernel


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_compiled_fused_linear_merges_both_ways_and_matches_eager(dev, monkeypatch):
    if dev == "cpu":  # no kernel here: force the choice, so the merged forms run on PyTorch's path
        monkeypatch.setattr(lowrank_linear_module, "merge_pays",
                            lambda x, w, r: (True, True) if torch.compiler.is_compiling() else (False, False))
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(4, 1024, 512, device=dev, dtype=dtype)
    w = (torch.randn(384, 512, device=dev) / 23).to(dtype)
    a0, b0 = torch.randn(16, 512, device=dev) / 23, torch.randn(384, 16, device=dev) / 4  # fp32, as kept
    grad_y = torch.randn(4, 1024, 384, device=dev, dtype=dtype)
    graphs = []  # the forward and backward graphs, as AOT autograd hands them to the compiler

    def capture(gm, example_inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    def step(fn):
        xx, a, b = x.clone().requires_grad_(), a0.clone().requires_grad_(), b0.clone().requires_grad_()
        y = fn(xx, a, b)
        y.backward(grad_y)
        return [y, xx.grad, a.grad, b.grad]

    def site(xx, a, b):
        return lowrank_linear_module.lowrank_linear(xx, w, None, [(a, b, 2.0)])

    eager = step(site)  # eager never merges: the reference
    compiled = step(torch.compile(site, backend=aot_autograd(fw_compiler=capture, bw_compiler=capture)))
    shapes = {tuple(n.meta["val"].shape) for g in graphs for n in g.graph.nodes
              if n.target is torch.ops.aten.mm.default and "val" in n.meta}
    # the output and the input gradient from the merged weight, and the four thin products of
    # the factors' gradients (x Aᵀ, the gradient's share at it, and the two weight-shaped ones):
    # no product adds the delta to the activations
    assert shapes == {(4096, 384), (4096, 512), (4096, 16), (16, 512), (384, 16)}
    for got, ref in zip(compiled, eager, strict=True):
        assert got.dtype == ref.dtype
        assert ((got.float() - ref.float()).norm() / ref.float().norm()).item() < (1e-2 if dev == "cuda" else 1e-5)
