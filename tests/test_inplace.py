"""``addmm_into`` stays in place under inductor: no out-of-place addmm, no copy of ``out``."""

from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from leantune.engine import lowrank_linear
from leantune.engine.inplace import addmm_into


def test_addmm_into_adds_in_place_eagerly_and_returns_out():
    torch.manual_seed(0)
    out, a, b = torch.randn(5, 3), torch.randn(5, 2), torch.randn(2, 3)
    want = out + a @ b
    got = addmm_into(out, a, b)
    assert got is out and torch.allclose(out, want)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_site_runs_the_in_place_op_not_a_copying_addmm(device):
    """The unmerged site's forward (and backward) add the deltas with the op (12 tokens, fewer
    than the 16 inputs: no merge on CUDA either); inductor's code calls it on the base
    product's buffer and never the out-of-place addmm."""
    torch.manual_seed(0)
    x = torch.randn(2, 6, 16, device=device, requires_grad=True)
    weight = torch.randn(12, 16, device=device)
    a, b = (torch.randn(*shape, device=device, requires_grad=True) for shape in ((3, 16), (12, 3)))

    def loss_of(x, a, b):
        return lowrank_linear(x, weight, None, [(a, b, 0.5)]).square().sum()

    def grads(fn):
        for t in (x, a, b):
            t.grad = None
        loss = fn(x, a, b)
        loss.backward()
        return [loss.detach()] + [t.grad for t in (x, a, b)]

    want = grads(loss_of)
    torch._dynamo.reset()
    got, codes = run_and_get_code(grads, torch.compile(loss_of, fullgraph=True))
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-5)
    code = "\n".join(codes)
    assert code.count("leantune.addmm_into") >= 2  # the forward's deltas and the input gradient
    assert "extern_kernels.addmm" not in code
