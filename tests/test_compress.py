"""Activation compression: exact forward and input gradient, a bounded weight-gradient error, less kept."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import leantune as lt
from leantune.engine.compress import CompressedLinear, compressed_linear, dequantize, quantize

from .models import batch, tiny_llama


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_round_trip_error_is_within_half_a_step_per_channel(bits):
    x = torch.randn(64, 33, dtype=torch.float64) * torch.logspace(-2, 2, 33, dtype=torch.float64)  # outlier channels
    codes, scales = quantize(x, bits)
    assert codes.dtype == (torch.int8 if bits == 8 else torch.uint8)
    assert codes.shape == ((64, 33) if bits == 8 else (64, 17))
    back = dequantize(codes, scales, bits, torch.float64)
    step = x.abs().amax(0) / (2 ** (bits - 1) - 1)
    assert ((back - x).abs() <= step / 2 * (1 + 1e-6)).all()
    with pytest.raises(ValueError, match="supports"):
        quantize(x, 2)


@pytest.mark.parametrize("bits", [8, 4])
def test_forward_and_input_gradient_are_exact_weight_gradient_is_close(bits):
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    layer = nn.Linear(16, 8, dtype=torch.float64)
    out = CompressedLinear.apply(x, layer.weight, layer.bias, bits)
    ref = F.linear(x, layer.weight, layer.bias)
    assert torch.equal(out, ref)
    g = torch.randn_like(out)
    gx, gw, gb = torch.autograd.grad(out, (x, layer.weight, layer.bias), g)
    rx, rw, rb = torch.autograd.grad(ref, (x, layer.weight, layer.bias), g)
    torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gb, rb, rtol=1e-12, atol=1e-12)
    rel = (gw - rw).norm() / rw.norm()
    assert 0 < rel < (0.01 if bits == 8 else 0.15)


def test_keeps_only_int8_codes_for_backward():
    layer = nn.Linear(256, 32)
    x = torch.randn(64, 256)
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
        compressed_linear(x, layer, 8).sum().backward()
    big = [t for t in kept if t.numel() >= x.numel()]
    assert big and all(t.dtype == torch.int8 for t in big)
    assert layer.weight.grad is not None
    with torch.no_grad():
        assert torch.equal(compressed_linear(x, layer, 8), layer(x))


def test_lst_with_compressed_ladders_trains_and_keeps_less():
    def kept_bytes(bits):
        torch.manual_seed(0)
        model = lt.adapt(tiny_llama(), lt.LST(reduction=2, ladder_bits=bits))
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            loss = model(**batch("llama")).loss
        loss.backward()
        assert all(p.grad is not None for n, p in model.named_parameters() if ".down." in n)
        return sum(sizes)

    assert kept_bytes(8) < kept_bytes(None)
    with pytest.raises(ValueError, match="ladder_bits"):
        lt.LST(ladder_bits=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the lent GPU)")
def test_cuda_bf16_matches_an_fp32_reference():
    torch.manual_seed(0)
    x = torch.randn(4096, 512, device="cuda")
    layer = nn.Linear(512, 256, device="cuda")
    g = torch.randn(4096, 256, device="cuda")
    xr = x.clone().requires_grad_()
    ref = F.linear(xr, layer.weight, layer.bias)
    rx, rw = torch.autograd.grad(ref, (xr, layer.weight), g)
    xb = x.bfloat16().requires_grad_()
    wb, bb = layer.weight.detach().bfloat16().requires_grad_(), layer.bias.detach().bfloat16()
    out = CompressedLinear.apply(xb, wb, bb, 8)
    gx, gw = torch.autograd.grad(out, (xb, wb), g.bfloat16())
    for ours, theirs in ((out, ref), (gx, rx), (gw, rw)):
        assert ((ours.float() - theirs).norm() / theirs.norm()) < 2e-2
