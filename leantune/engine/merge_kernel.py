"""``W + B A`` for a weight and its low-rank deltas: one Triton kernel on CUDA, PyTorch elsewhere.

With many tokens per step, adding a rank-r delta to the weight costs less than adding it
to the activations: merging reads ``W`` and writes ``W'`` (2·N·K elements) while the
unmerged form reads and writes the output and the input gradient (2·T·(N + K)). This kernel
does the merge in one pass: each tile of ``W`` plus one small ``tl.dot`` of the factors,
summed in fp32 and rounded once. ``transposed`` writes ``W'ᵀ`` instead, so that the backward's
merge is a different call from the forward's and a compiler cannot fold the two into one
saved ``W'``.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the PyTorch path below
    triton = None

BLOCK_N, BLOCK_K = 64, 128
# The whole rank is one tile of the kernel; past this it would not fit in shared memory.
MAX_RANK = 64

if triton is not None:

    @triton.jit
    def _merge(w, b, a, out, out_at, scale, N, K, R, swn, swk, sbn, sbr, sar, sak, son, sok,
               BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
        rn = tl.program_id(0) * BN + tl.arange(0, BN)
        rk = tl.program_id(1) * BK + tl.arange(0, BK)
        rr = tl.arange(0, BR)
        inside = (rn[:, None] < N) & (rk[None, :] < K)
        # the factors as ``b.to(dtype) * scale`` and ``a.to(dtype)`` would give them, cast as read
        dtype = out.dtype.element_ty
        bt = tl.load(b + rn[:, None] * sbn + rr[None, :] * sbr, mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0).to(dtype)
        bt = (bt.to(tl.float32) * scale).to(dtype)
        at = tl.load(a + rr[:, None] * sar + rk[None, :] * sak, mask=(rr[:, None] < R) & (rk[None, :] < K), other=0.0).to(dtype)
        wt = tl.load(w + rn[:, None].to(tl.int64) * swn + rk[None, :] * swk, mask=inside, other=0.0)
        merged = wt.to(tl.float32) + tl.dot(bt, at)
        tl.store(out + out_at + rn[:, None].to(tl.int64) * son + rk[None, :].to(tl.int64) * sok,
                 merged.to(dtype), mask=inside)


def available(weight: torch.Tensor, rank: int) -> bool:
    """Whether the Triton kernel runs for ``weight`` and deltas of total ``rank`` (CUDA, fp16
    or bf16, 2-D, rank at most :data:`MAX_RANK`)."""
    return (triton is not None and weight.is_cuda and weight.dim() == 2 and rank <= MAX_RANK
            and weight.dtype in (torch.float16, torch.bfloat16))


def merged_weight(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float = 1.0,
                  transposed: bool = False, out: torch.Tensor | None = None, at: int = 0) -> torch.Tensor:
    """``weight + (scale · b) @ a`` (``b``: N × R, ``a``: R × K, in any float dtype: cast to the
    weight's as they are read, the kernel's way of sparing a cast kernel per factor per call,
    with ``b.to(dtype) * scale`` rounded as PyTorch rounds it), or its transpose, as a new
    contiguous tensor; or written into ``out`` (contiguous) from row ``at`` (column ``at`` when
    ``transposed``), which is returned: several weights then merge into one stacked weight
    with no copy (:mod:`.stacked_linear`)."""
    N, K = weight.shape
    shape = (K, N) if transposed else (N, K)
    stacked = 1 if transposed else 0  # the dimension along which ``out`` holds several weights
    if out is not None and (not out.is_contiguous() or out.dim() != 2 or out.shape[1 - stacked] != K
                            or not 0 <= at <= out.shape[stacked] - N):
        raise ValueError(f"merged_weight: out {tuple(out.shape)} has no room for {shape} at {at}")
    if not available(weight, a.shape[0]):
        a, b = a.to(weight.dtype), b.to(weight.dtype)
        b = b * scale if scale != 1.0 else b
        merged = torch.addmm(weight, b, a)
        merged = merged.T.contiguous() if transposed else merged
        if out is None:
            return merged
        (out[:, at:at + N] if transposed else out[at:at + N]).copy_(merged)
        return out
    R = a.shape[0]
    if out is None:
        out, at = torch.empty(shape, device=weight.device, dtype=weight.dtype), 0
    son, sok = (1, out.stride(0)) if transposed else (out.stride(0), 1)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))
    _merge[grid](weight, b, a, out, at * (1 if transposed else out.stride(0)), float(scale), N, K, R,
                 weight.stride(0), weight.stride(1), b.stride(0), b.stride(1), a.stride(0), a.stride(1), son, sok,
                 BN=BLOCK_N, BK=BLOCK_K, BR=max(16, triton.next_power_of_2(R)))
    return out
