"""The Triton cross-entropy kernel of the chunked loss against PyTorch (CUDA only: elsewhere the
PyTorch path runs, which test_engine checks against transformers' loss and by gradcheck)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from leantune.engine import ce_kernel
from leantune.engine.loss import chunked_causal_lm_loss

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and ce_kernel.triton is not None),
                                reason="needs CUDA and Triton")


@pytest.mark.parametrize("vocab", [100, 4096, 5000, 128256])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_match_softmax_cross_entropy(vocab, dtype):
    torch.manual_seed(0)
    logits = (torch.randn(37, vocab, device="cuda") * 4).to(dtype)
    targets = torch.randint(0, vocab, (37,), device="cuda")
    weights = torch.rand(37, device="cuda")
    weights[5] = 0  # an ignored row
    assert ce_kernel.available(logits)
    losses, grad = ce_kernel.cross_entropy_rows(logits, targets, weights)
    ref = logits.float()
    torch.testing.assert_close(losses, F.cross_entropy(ref, targets, reduction="none"), rtol=1e-5, atol=1e-4)
    want = (ref.softmax(-1) - F.one_hot(targets, vocab)) * weights[:, None]
    assert grad.dtype == dtype and not grad[5].any()
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    torch.testing.assert_close(grad.float(), want, rtol=0, atol=tol)
    only_loss, no_grad = ce_kernel.cross_entropy_rows(logits, targets, None)
    assert no_grad is None and torch.equal(only_loss, losses)


def test_chunked_loss_with_the_kernel_equals_its_pytorch_path(monkeypatch):
    torch.manual_seed(0)
    hidden = torch.randn(2, 300, 256, device="cuda")
    weight = torch.randn(5000, 256, device="cuda") / 16
    labels = torch.randint(0, 5000, (2, 300), device="cuda")
    labels[:, :10] = -100

    def run():
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = chunked_causal_lm_loss(h, w, labels, chunk=128)
        loss.backward()
        return loss, h.grad, w.grad

    fused = run()
    monkeypatch.setattr(ce_kernel, "available", lambda logits: False)
    for got, want in zip(fused, run(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_compiled_chunked_loss_runs_the_kernel_and_matches_eager():
    torch.manual_seed(0)
    hidden = torch.randn(600, 128, device="cuda", dtype=torch.bfloat16)
    weight = torch.randn(3000, 128, device="cuda", dtype=torch.bfloat16) / 12
    labels = torch.randint(0, 3000, (1, 600), device="cuda")

    def loss_and_grad(fn):
        h = hidden.clone().view(1, 600, 128).requires_grad_()
        loss = fn(h, weight, labels, 256)
        loss.backward()
        return loss, h.grad

    torch._dynamo.reset()
    compiled = torch.compile(chunked_causal_lm_loss, fullgraph=True)
    for got, want in zip(loss_and_grad(compiled), loss_and_grad(chunked_causal_lm_loss), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-4)
