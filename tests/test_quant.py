"""The 4-bit base: NF4 codes, QuantLinear, QLoRA merging rules, LQ-LoRA's init."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

import leantune as lt
from leantune.api import adapter_paths
from leantune.core.quant import (
    ABSMAX_BLOCK,
    BLOCK,
    NF4_LEVELS,
    STORAGE,
    QuantLinear,
    _dynamic_levels,
    lq_decompose,
    nf4_absmax,
    nf4_dequantize,
    nf4_quantize,
)

from .harness import train_steps
from .models import batch, outputs, tiny_gpt2, tiny_llama

# QLoRA's NF4 table (Dettmers et al., 2023, appendix E), as bitsandbytes ships it.
REFERENCE_NF4 = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])


def test_nf4_levels_are_the_normal_quantiles_of_the_reference_table():
    offset = 0.9677083  # QLoRA's choice: the quantile grid ends at ±(1 - 1/(2·(15 or 16))) averaged
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9).double()[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8).double()[:-1])
    levels = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    torch.testing.assert_close((levels / levels.max()).float(), REFERENCE_NF4, rtol=0, atol=1e-7)
    assert torch.equal(torch.tensor(NF4_LEVELS), REFERENCE_NF4)


@pytest.mark.parametrize("shape", [(64, 48), (7, 9), (3, 64 * 5 + 1), (300, 200)])  # whole, ragged, odd blocks
def test_nf4_round_trip_picks_the_nearest_level_within_the_bound(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 0.02
    codes = nf4_quantize(w)
    packed, absmax_codes, scales, offset = codes
    n = w.numel()
    assert packed.dtype == absmax_codes.dtype == torch.uint8 and packed.numel() == (n + 1) // 2
    assert absmax_codes.numel() == -(-n // BLOCK) and scales.numel() == -(-absmax_codes.numel() // ABSMAX_BLOCK)
    exact = F.pad(w.reshape(-1), (0, (-n) % BLOCK)).view(-1, BLOCK).abs().amax(1)
    stored = nf4_absmax(absmax_codes, scales, offset)  # double-quantized: 8-bit codes around the mean
    assert ((stored - exact).abs() <= 0.02 * exact).all()
    back = nf4_dequantize(codes, shape).reshape(-1)
    per_weight = lambda t: t.repeat_interleave(BLOCK)[:n]  # noqa: E731
    normalized = w.reshape(-1) / per_weight(exact)
    nearest = REFERENCE_NF4[(normalized[:, None] - REFERENCE_NF4[None, :]).abs().argmin(1)]
    torch.testing.assert_close(back, nearest * per_weight(stored), rtol=1e-6, atol=1e-9)
    half_gap = (REFERENCE_NF4[1:] - REFERENCE_NF4[:-1]).max() / 2
    bound = half_gap * per_weight(exact) + (per_weight(stored) - per_weight(exact)).abs()
    assert ((back - w.reshape(-1)).abs() <= bound + 1e-9).all()


def test_dynamic_absmax_levels_are_qlora_s_8bit_map():
    levels = _dynamic_levels(torch.device("cpu"))
    assert levels.numel() == 256 and torch.equal(levels, levels.sort().values)
    assert levels[0] == -levels[-2] and levels[-1] == 1.0 and (levels == 0).sum() == 1
    assert abs(levels[levels > 0].min().item() - 0.55e-6) < 1e-12  # 10^-6 · midpoint of [0.1, 1]


@pytest.mark.parametrize("source", ["linear", "conv1d"])
def test_quant_linear_equals_the_dequantized_reference(source):
    torch.manual_seed(0)
    module = nn.Linear(40, 24) if source == "linear" else Conv1D(24, 40)
    q = QuantLinear.from_module(module)
    logical = module.weight if source == "linear" else module.weight.T
    w = q.dequantize()
    assert w.shape == (24, 40) and (w - logical).abs().max() < 0.5 * logical.abs().max()
    x = torch.randn(3, 5, 40, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = q(x), F.linear(x_ref, w) + module.bias
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.square().sum().backward()
    ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert set(dict(q.named_buffers())) == set(STORAGE) and [n for n, _ in q.named_parameters()] == ["bias"]
    blocks = -(-w.numel() // BLOCK)  # 4 bits a weight, 8 bits per 64, 32 bits per 64·256, a 32-bit offset
    assert sum(b.numel() * b.element_size() for b in q.buffers()) == w.numel() // 2 + blocks + 4 * 1 + 4
    with pytest.raises(AttributeError, match="4-bit NF4 codes"):
        _ = q.weight


def test_quant_linear_dequantizes_in_row_chunks_with_the_same_result(monkeypatch):
    q = QuantLinear.from_module(nn.Linear(256, 1000))
    x = torch.randn(4, 256, requires_grad=True)
    whole = q(x)
    (grad_whole,) = torch.autograd.grad(whole.square().sum(), x)
    monkeypatch.setattr(QuantLinear, "chunk_weights", 2 * BLOCK * ABSMAX_BLOCK)
    chunks = q.row_chunks()
    assert len(chunks) == 8 and chunks[0] == (0, 128) and chunks[-1] == (896, 1000)
    assert all(q.chunk_codes(*c)[0].data_ptr() == q.packed[c[0] * 128:].data_ptr() for c in chunks)  # views
    parts = q(x)
    (grad_parts,) = torch.autograd.grad(parts.square().sum(), x)
    torch.testing.assert_close(parts, whole, rtol=0, atol=0)
    torch.testing.assert_close(grad_parts, grad_whole, rtol=1e-5, atol=1e-6)


def test_bf16_move_keeps_fp32_scales_and_computes_in_bf16():
    q = QuantLinear.from_module(nn.Linear(64, 8))
    exact = q.dequantize(torch.float32)
    q.to(torch.bfloat16)
    assert q.compute_dtype == torch.bfloat16 and q.absmax_scales.dtype == q.absmax_offset.dtype == torch.int32
    torch.testing.assert_close(q.dequantize(torch.float32), exact, rtol=0, atol=0)
    assert q(torch.randn(2, 64, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_qlora_quantizes_the_targets_and_trains_lora_only():
    model = lt.adapt(tiny_llama(), lt.QLoRA(r=4))
    quantized = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == 14  # the 7 Linears of each of the 2 blocks; lm_head (the output head) stays dense
    assert not isinstance(model.lm_head, QuantLinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora" in n or n.endswith((".A", ".B")) for n in trainable)
    inputs = batch("llama", seed=7)
    dense = tiny_llama()
    assert (outputs(model, inputs) - outputs(dense, inputs)).abs().max() < 0.05  # 4-bit error only


def test_qlora_merge_dequantizes_with_a_warning_and_never_requantizes():
    model = lt.adapt(tiny_gpt2(), lt.QLoRA(init="random"))
    inputs = batch("gpt2", seed=7)
    expected = outputs(model, inputs)
    with pytest.warns(UserWarning, match="de-quantizes it.*not re-quantized"):
        lt.merge(model)
    site = model.transformer.h[0].attn.c_attn
    assert site.base.weight.shape == (32, 96) and site.base.weight.dtype == torch.float32  # GPT-2 Conv1D layout
    torch.testing.assert_close(outputs(model, inputs), expected, rtol=0, atol=1e-4)
    lt.unmerge(model)
    assert "weight" not in site.base.state_dict() and "packed" in site.base.state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lt.merge(model)
    merged = lt.unload(model)
    with pytest.raises(ValueError, match="re-quantize a merged model"):
        lt.adapt(merged, lt.QLoRA())


def test_qlora_saves_as_a_peft_lora_and_loads_onto_a_fresh_base(tmp_path):
    model = lt.adapt(tiny_llama(), lt.QLoRA(r=4))
    train_steps(model, "llama", steps=2)
    lt.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    loaded = lt.load_adapter(tiny_llama(), tmp_path / "a")
    assert isinstance(lt.adapters(loaded)["default"].config, lt.QLoRA)
    inputs = batch("llama", seed=7)
    torch.testing.assert_close(outputs(loaded, inputs), outputs(model, inputs), rtol=0, atol=0)


def test_tied_weights_are_not_quantized():
    model = tiny_gpt2()
    with pytest.raises(ValueError, match="tied to another module"):
        lt.adapt(model, lt.QLoRA(targets=["lm_head"]))


def test_lq_lora_init_is_closer_to_the_full_weight_than_qlora():
    torch.manual_seed(0)
    w = torch.randn(48, 64) * 0.02 + 0.05 * torch.randn(48, 2) @ torch.randn(2, 64)  # some low-rank structure
    plain = (w - nf4_dequantize(nf4_quantize(w), tuple(w.shape))).norm()
    codes, b, a = lq_decompose(w, rank=4, iters=4)
    lq = (w - nf4_dequantize(codes, tuple(w.shape)) - b @ a).norm()
    assert lq < 0.9 * plain

    base = tiny_llama()
    inputs = batch("llama", seed=7)
    gap = {}
    for cfg in (lt.QLoRA(r=4), lt.LQLoRA(r=4)):
        model = lt.adapt(copy.deepcopy(base), cfg)
        errors = []
        for path, site, delta in adapter_paths(model, "default"):
            full = base.get_submodule(path).weight
            errors.append((full - site.base.dequantize() - delta.delta_weight(site.base)).norm())
        gap[cfg.name] = (torch.stack(errors), (outputs(model, inputs) - outputs(base, inputs)).abs().mean())
    assert (gap["lq_lora"][0] < gap["qlora"][0]).all()
    assert gap["lq_lora"][1] < gap["qlora"][1]


def test_lq_lora_rank_above_the_layer_size_pads_with_zeros():
    codes, b, a = lq_decompose(torch.randn(6, 4), rank=8, iters=2)
    assert b.shape == (6, 8) and a.shape == (8, 4) and b[:, 4:].abs().sum() == 0


def test_deltas_follow_a_bias_free_quantized_base_to_its_device():
    model = lt.adapt(tiny_llama(), lt.QLoRA(r=4, targets=["q_proj"]), name="a").to("meta")
    assert model.model.layers[0].self_attn.q_proj.base.bias is None  # buffers are all it has
    lt.adapt(model, lt.LoRA(r=2, targets=["q_proj"]), name="b")
    assert all(d.A.device.type == "meta" for _, _, d in adapter_paths(model, "b"))
