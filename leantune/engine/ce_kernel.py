"""Cross-entropy of a block of logits and its gradient: one Triton kernel on CUDA, PyTorch elsewhere.

Per row, one pass keeps a running maximum and sum of exponentials (online softmax)
to get ``log Σ exp``; a second pass writes ``(softmax − one-hot) · weight``. Traced by
``torch.compile``, the same arithmetic in PyTorch reads each row once more. Measured
on an H100 for one block of 523 × 128,256 bf16 logits (what the chunked loss runs on
a 1B Llama): 165 µs against 205 µs for the compiled PyTorch path, with the persistent
grid below (docs/bench/device_log_issue6.md, session 4). Elsewhere :func:`available`
is false and the loss runs its PyTorch path.
"""

from __future__ import annotations

import functools

import torch

# Vocabulary entries a program reads per step, its warps, and programs per SM: the
# fastest of the 16 settings measured (2048–32768 entries, 8–32 warps, 1–8 per SM).
BLOCK, WARPS, PROGRAMS_PER_SM = 4096, 8, 4


try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the loss runs its PyTorch path
    triton = None

if triton is not None:

    @triton.jit
    def _cross_entropy_rows(logits, row_stride, targets, weights, losses, grad, rows, V,
                            WITH_GRAD: tl.constexpr, BLOCK: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        for row in tl.range(tl.program_id(0).to(tl.int64), rows, tl.num_programs(0)):  # int64: offsets pass 2³¹
            src = logits + row * row_stride
            run_max = tl.full([], float("-inf"), tl.float32)
            run_sum = tl.zeros([], tl.float32)
            for start in tl.range(0, V, BLOCK):
                x = tl.load(src + start + cols, mask=start + cols < V, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(run_max, tl.max(x, 0))  # finite from the first block on
                run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(x - new_max), 0)
                run_max = new_max
            lse = run_max + tl.log(run_sum)
            target = tl.load(targets + row)
            tl.store(losses + row, lse - tl.load(src + target).to(tl.float32))
            if WITH_GRAD:
                weight = tl.load(weights + row)
                dst = grad + row * V
                for start in tl.range(0, V, BLOCK):
                    mask = start + cols < V
                    x = tl.load(src + start + cols, mask=mask, other=0.0).to(tl.float32)
                    g = (tl.exp(x - lse) - tl.where(start + cols == target, 1.0, 0.0)) * weight
                    tl.store(dst + start + cols, g.to(grad.dtype.element_ty), mask=mask)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def available(logits: torch.Tensor) -> bool:
    """Whether the Triton kernel runs for ``logits`` (CUDA, 2-D, unit column stride)."""
    return triton is not None and logits.is_cuda and logits.dim() == 2 and logits.stride(1) == 1


def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor,
                       weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per row of ``logits`` (rows × classes): ``log Σ exp(logits) − logits[target]`` (fp32, or
    fp64 for fp64 logits); with ``weights``, the gradient of ``Σ weight · loss`` with respect to
    the logits, in their dtype. ``targets`` must be valid class indices: rows to ignore get
    weight 0. The PyTorch path may overwrite ``logits`` (a block the caller drops)."""
    if not available(logits):
        return _cross_entropy_rows_torch(logits, targets, weights)
    rows, vocab = logits.shape
    losses = torch.empty(rows, device=logits.device, dtype=torch.float32)
    grad = torch.empty((rows, vocab), device=logits.device, dtype=logits.dtype) if weights is not None else None
    programs = min(rows, PROGRAMS_PER_SM * _multiprocessors(logits.device))
    _cross_entropy_rows[(programs,)](logits, logits.stride(0), targets.contiguous(),
                                     losses if weights is None else weights.float(), losses,
                                     losses if grad is None else grad, rows, vocab,
                                     WITH_GRAD=grad is not None, BLOCK=BLOCK, num_warps=WARPS)
    return losses, grad


def _cross_entropy_rows_torch(logits: torch.Tensor, targets: torch.Tensor,
                              weights: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    dtype, acc = logits.dtype, torch.promote_types(logits.dtype, torch.float32)
    logits = logits.to(acc)
    lse = logits.logsumexp(-1, keepdim=True)
    losses = (lse - logits.gather(1, targets[:, None])).squeeze(1)
    if weights is None:
        return losses, None
    # In place (eager: one fp32 block, not two); the one-hot as a compare, not a scatter,
    # so that torch.compile fuses it with the softmax.
    probs = logits.sub_(lse).exp_()
    classes = torch.arange(logits.shape[1], device=logits.device)
    return losses, probs.sub_((classes == targets[:, None]).to(acc)).mul_(weights[:, None].to(acc)).to(dtype)
