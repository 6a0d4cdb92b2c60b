"""Experiment (session 20): both LoRA factor gradients of a site in one Triton launch.

Session 20's phase timing (H200, 1B) found leantune's compiled backward host-bound: the
host took 37.7 ms to issue it, PEFT's 25 ms. Per merged site the backward issues about
fourteen launches; ``A``'s and ``B``'s gradients (``uᵀx`` and ``s·gᵀv``: two thin cuBLAS
products with split-K workspaces, reductions and casts to fp32) are six to eight of them.
Here one launch computes both: each program owns a 32-wide slice of ``x``'s or ``g``'s
columns and runs over all tokens, accumulating in fp32 and writing fp32, so nothing is
split, reduced again or cast afterwards.

Use: ``PYTHONPATH=. python docs/bench/session20/factor_grads.py check`` (kernel against fp32
PyTorch; CPU runs it under ``TRITON_INTERPRET=1``), ``... micro`` (CUDA: kernel against the
two cuBLAS products at 1B/3B shapes). ``ab.py`` beside it trains with :func:`backward` for labels
with ``+fg``.
Not part of the package: it moves there only if a GPU run shows it faster at 1B and 3B.
"""

from __future__ import annotations

import sys

import torch
import triton
import triton.language as tl

from leantune.engine.merge_kernel import merged_weight

L = sys.modules["leantune.engine.lowrank_linear"]
BLOCK_C, BLOCK_T = 32, 128


@triton.jit
def _over_tokens(lhs, rhs, T, lcols, ln, rcols, rn, slt, slc, srt, src,
                 BT: tl.constexpr, BL: tl.constexpr, BRH: tl.constexpr):
    """Σ over all T tokens of lhs[:, lcols]ᵀ · rhs[:, rcols], in fp32 (BL × BRH)."""
    acc = tl.zeros((BL, BRH), tl.float32)
    for t0 in range(0, T, BT):
        rows = t0 + tl.arange(0, BT)
        lhs_tile = tl.load(lhs + rows[:, None] * slt + lcols[None, :] * slc, mask=(rows[:, None] < T) & (lcols[None, :] < ln), other=0.0)
        rhs_tile = tl.load(rhs + rows[:, None] * srt + rcols[None, :] * src, mask=(rows[:, None] < T) & (rcols[None, :] < rn), other=0.0)
        acc += tl.dot(tl.trans(lhs_tile), rhs_tile)
    return acc


@triton.jit
def _factor_grads(u, x, g, v, grad_a, grad_b, T, K, N, R, scale,
                  sut, sur, sxt, sxk, sgt, sgn, svt, svr,
                  BC: tl.constexpr, BT: tl.constexpr, BR: tl.constexpr):
    pid = tl.program_id(0)
    programs_a = tl.cdiv(K, BC)
    rr = tl.arange(0, BR)
    if pid < programs_a:  # grad_a[:, cols] = uᵀ x[:, cols]   (R × BC)
        cols = pid * BC + tl.arange(0, BC)
        acc = _over_tokens(u, x, T, rr, R, cols, K, sut, sur, sxt, sxk, BT, BR, BC)
        tl.store(grad_a + rr[:, None] * K + cols[None, :], acc, mask=(rr[:, None] < R) & (cols[None, :] < K))
    else:  # grad_b[cols, :] = scale · g[:, cols]ᵀ v   (BC × R)
        cols = (pid - programs_a) * BC + tl.arange(0, BC)
        acc_b = _over_tokens(g, v, T, cols, N, rr, R, sgt, sgn, svt, svr, BT, BC, BR)
        tl.store(grad_b + cols[:, None] * R + rr[None, :], acc_b * scale, mask=(cols[:, None] < N) & (rr[None, :] < R))


def factor_grads(u: torch.Tensor, x: torch.Tensor, g: torch.Tensor, v: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(``uᵀ x``, ``scale · gᵀ v``) in fp32, for ``u, v``: T × R, ``x``: T × K, ``g``: T × N."""
    T, K = x.shape
    N, R = g.shape[1], u.shape[1]
    grad_a = torch.empty((R, K), device=x.device, dtype=torch.float32)
    grad_b = torch.empty((N, R), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(K, BLOCK_C) + triton.cdiv(N, BLOCK_C),)
    _factor_grads[grid](u, x, g, v, grad_a, grad_b, T, K, N, R, float(scale),
                        u.stride(0), u.stride(1), x.stride(0), x.stride(1), g.stride(0), g.stride(1),
                        v.stride(0), v.stride(1), BC=BLOCK_C, BT=BLOCK_T, BR=max(16, triton.next_power_of_2(R)))
    return grad_a, grad_b


_original_backward = L.LowRankLinear.backward


def _fusable(ctx) -> bool:
    wants = ctx.needs_input_grad
    return (len(ctx.ranks) == 1 and not wants[1] and not wants[2] and wants[5] and wants[6]
            and torch.compiler.is_compiling() and ctx.saved_tensors[1].is_cuda)


def backward(ctx, grad_out):
    """LowRankLinear's backward with the factors' gradients from :func:`factor_grads`."""
    if not _fusable(ctx):
        return _original_backward(ctx, grad_out)
    flat, weight, a, b, xa = ctx.saved_tensors
    g = grad_out.reshape(-1, grad_out.shape[-1])
    ca, csb = L._cast(a, b, ctx.scale, g.dtype)
    g_xa = g @ csb
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = (g @ merged_weight(weight, a, b, ctx.scale, transposed=True).T if ctx.merged_backward
                  else (g @ weight).addmm_(g_xa, ca)).reshape(ctx.x_shape)
    ga, gb = factor_grads(g_xa, flat, g, flat @ ca.T if xa is None else xa, ctx.scales[0])
    return grad_x, None, None, None, None, ga.to(ctx.dtypes[0]), gb.to(ctx.dtypes[1])


def check() -> None:
    """The kernel against fp32 PyTorch products on odd shapes (any device)."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    torch.manual_seed(0)
    worst = 0.0
    for T, K, N, R in [(4096, 2048, 512, 16), (300, 70, 100, 8), (129, 33, 65, 24), (4096, 3072, 8192, 16)]:
        if dev == "cpu" and T * (K + N) > 2_000_000:
            continue
        u, v = torch.randn(T, R, device=dev, dtype=dt), torch.randn(T, R, device=dev, dtype=dt)
        x, g = torch.randn(T, K, device=dev, dtype=dt), torch.randn(T, N, device=dev, dtype=dt)
        ga, gb = factor_grads(u, x, g.T.contiguous().T if N % 2 else g, v, 0.5)
        ra, rb = u.float().T @ x.float(), 0.5 * (g.float().T @ v.float())
        err = max(((ga - ra).abs().max() / ra.abs().max()).item(), ((gb - rb).abs().max() / rb.abs().max()).item())
        worst = max(worst, err)
        print(f"T={T} K={K} N={N} R={R}: max rel err {err:.2e}", flush=True)
    print("worst", worst, "OK" if worst < 2e-2 else "BAD")


def micro() -> None:
    """CUDA: the kernel against the two cuBLAS products (and their fp32 casts) it replaces."""
    def timed(fn, n=50):  # replayed from a CUDA graph, so launch overhead is not in it
        for _ in range(3):
            fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / n * 1e3

    dt, T, R = torch.bfloat16, 4096, 16
    for K, N in [(2048, 2048), (2048, 512), (2048, 8192), (8192, 2048), (3072, 3072), (3072, 1024), (3072, 8192), (8192, 3072)]:
        u, v = torch.randn(T, R, device="cuda", dtype=dt), torch.randn(T, R, device="cuda", dtype=dt)
        x, g = torch.randn(T, K, device="cuda", dtype=dt), torch.randn(T, N, device="cuda", dtype=dt)
        fused = timed(lambda u=u, x=x, g=g, v=v: factor_grads(u, x, g, v, 2.0))
        cublas = timed(lambda u=u, x=x, g=g, v=v: ((u.T @ x).float(), (g.T @ v * 2.0).float()))
        print(f"K={K} N={N}: fused {fused:.1f} us, cuBLAS + casts {cublas:.1f} us (GPU time)", flush=True)


if __name__ == "__main__":
    {"check": check, "micro": micro}[sys.argv[1] if len(sys.argv) > 1 else "check"]()
