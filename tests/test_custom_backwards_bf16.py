"""Custom backwards in bf16 against an fp32 reference of the unfused form, on CPU and (when
one is present) CUDA: LoRA-FA's projection, the sparse delta product and the NF4 linear.
(The fused low-rank linear, the chunked loss and activation compression have their own.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from leantune.core.quant import QuantLinear, nf4_dequantize
from leantune.core.sparse import SparseDelta
from leantune.core.weights import weight_view
from leantune.methods.lora_variants import FrozenAProjection

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("device", DEVICES)
def test_lora_fa_projection_bf16_matches_fp32_reference(device):
    torch.manual_seed(0)
    x = torch.randn(4, 64, 128, device=device)
    a, b = torch.randn(16, 128, device=device) / 12, torch.randn(96, 16, device=device) / 4
    grad_y = torch.randn(4, 64, 96, device=device)

    def run(dtype, custom):
        xx, bb = x.to(dtype).requires_grad_(), b.to(dtype).requires_grad_()
        y = FrozenAProjection.apply(xx, a.to(dtype), bb, 0.7) if custom else (xx @ a.to(dtype).T) @ bb.T * 0.7
        y.backward(grad_y.to(dtype))
        return y, xx.grad, bb.grad

    for got, ref in zip(run(torch.bfloat16, True), run(torch.float32, False), strict=True):
        assert got.dtype == torch.bfloat16 and _rel_err(got, ref) < 1e-2


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_delta_product_bf16_matches_fp32_reference(device):
    torch.manual_seed(0)
    base = nn.Linear(128, 96, device=device)
    view = weight_view(base)
    positions = torch.randperm(96 * 128, generator=torch.Generator().manual_seed(0))[:500]
    x = torch.randn(4, 32, 128, device=device)
    grad_y = torch.randn(4, 32, 96, device=device)

    def run(dtype, custom):
        layer = nn.Linear(128, 96, device=device, dtype=dtype)
        layer.load_state_dict(base.state_dict())
        delta = SparseDelta(view, positions).to(device)
        with torch.no_grad():
            delta.values.copy_(torch.linspace(-0.5, 0.5, delta.values.numel()).view_as(delta.values))
        xx = x.to(dtype).requires_grad_()
        if custom:
            y = delta.post(layer, xx, layer(xx))
        else:  # the unfused reference: the dense ΔW built by plain autograd
            flat = torch.zeros(96 * 128, device=device, dtype=delta.values.dtype)
            dw = flat.index_put((positions.to(device),), delta.values).view(96, 128)
            y = F.linear(xx, layer.weight + dw.to(dtype), layer.bias)
        y.backward(grad_y.to(dtype))
        return y, xx.grad, delta.values.grad

    for got, ref in zip(run(torch.bfloat16, True), run(torch.float32, False), strict=True):
        assert torch.isfinite(got).all() and _rel_err(got, ref) < 2e-2


@pytest.mark.parametrize("device", DEVICES)
def test_nf4_linear_bf16_matches_fp32_reference(device):
    # The pure-PyTorch NF4 path (kernel="torch"; bitsandbytes, where installed, has its own),
    # with rows split into chunks so the chunked forward and backward are both exercised.
    torch.manual_seed(0)
    layer = QuantLinear.from_module(nn.Linear(256, 192, bias=False)).to(device)
    layer.kernel, layer.chunk_weights = "torch", 64 * 256
    assert len(layer.row_chunks()) == 3
    weight = nf4_dequantize(layer.chunk_codes(0, 192), (192, 256)).to(device)  # what the codes stand for, fp32
    x = torch.randn(4, 32, 256, device=device)
    grad_y = torch.randn(4, 32, 192, device=device)

    def run(dtype, custom):
        xx = x.to(dtype).requires_grad_()
        y = layer.to(dtype)(xx) if custom else F.linear(xx, weight.to(dtype))
        y.backward(grad_y.to(dtype))
        return y, xx.grad

    for got, ref in zip(run(torch.bfloat16, True), run(torch.float32, False), strict=True):
        assert got.dtype == torch.bfloat16 and _rel_err(got, ref) < 1e-2
