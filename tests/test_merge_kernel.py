"""The merged-weight form of the fused linear: its kernel and when it is chosen."""

from __future__ import annotations

import pytest
import torch

from leantune.engine import merge_kernel
from leantune.engine.lowrank_linear import merge_pays

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cpu_path_is_weight_plus_product_and_merging_is_never_chosen_off_cuda():
    torch.manual_seed(0)
    w, a, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(5, 3)
    assert torch.allclose(merge_kernel.merged_weight(w, a, b), w + b @ a, atol=1e-6)
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
def test_cuda_kernel_matches_fp32_merge(dtype, n, k, r, transposed):
    torch.manual_seed(0)
    w = torch.randn(n, k, device="cuda") / k**0.5
    a, b = torch.randn(r, k, device="cuda") / k**0.5, torch.randn(n, r, device="cuda") / r
    ref = w + b.to(dtype).float() @ a.to(dtype).float()
    got = merge_kernel.merged_weight(w.to(dtype), a.to(dtype), b.to(dtype), transposed=transposed)
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
