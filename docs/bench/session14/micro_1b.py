# ruff: noqa: B023, E731 (each timed closure runs at once, inside its own iteration)
"""Microbenchmarks at the 1B Llama shapes (4 x 1024 tokens): SDPA backends, LoRA GEMM forms.

Run in session 14 (``micro_1b.json``): ``PYTHONPATH=. python docs/bench/session14/micro_1b.py OUT.json``.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from leantune.engine.merge_kernel import merged_weight

dev, dt = "cuda", torch.bfloat16
res = {}

def timeit(fn, iters=30, warm=5):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters):
        fn()
    e.record()
    torch.cuda.synchronize()
    return round(s.elapsed_time(e) / iters * 1000, 1)  # us

# --- SDPA: b4 h32 kv8 s1024 d64 causal, fwd and fwd+bwd
b, h, kv, s, d = 4, 32, 8, 1024, 64
q = torch.randn(b, h, s, d, device=dev, dtype=dt, requires_grad=True)
k8 = torch.randn(b, kv, s, d, device=dev, dtype=dt, requires_grad=True)
v8 = torch.randn(b, kv, s, d, device=dev, dtype=dt, requires_grad=True)
k32 = k8.detach().repeat_interleave(4, 1).requires_grad_()
v32 = v8.detach().repeat_interleave(4, 1).requires_grad_()
go = torch.randn(b, h, s, d, device=dev, dtype=dt)
flops_f = 4 * b * h * s * s * d / 2
for name, be in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                 ("efficient", SDPBackend.EFFICIENT_ATTENTION)]:
    for gname, kk, vv, gqa in [("gqa", k8, v8, True), ("repeat", k32, v32, False)]:
        key = f"sdpa_{name}_{gname}"
        try:
            with sdpa_kernel([be]):
                fw = lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=True, enable_gqa=gqa)
                fb = lambda: torch.autograd.backward(fw(), go)
                tf, tfb = timeit(fw), timeit(fb)
            res[key] = dict(fwd_us=tf, fwdbwd_us=tfb, fwd_tflops=round(flops_f / tf / 1e6, 1),
                            fwdbwd_tflops=round(3.5 * flops_f / tfb / 1e6, 1), per_step_ms=round(16 * tfb / 1000, 2))
        except Exception as exc:
            res[key] = f"error: {type(exc).__name__}: {str(exc)[:200]}"
        print(key, res[key], flush=True)

# --- LoRA forms per site: T=4096, r=16
T, r = 4096, 16
for n, kdim in [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192)]:
    x = torch.randn(T, kdim, device=dev, dtype=dt)
    w = torch.randn(n, kdim, device=dev, dtype=dt) / kdim**0.5
    a = torch.randn(r, kdim, device=dev, dtype=dt) / kdim**0.5
    sb = torch.randn(n, r, device=dev, dtype=dt) * 0.01
    g = torch.randn(T, n, device=dev, dtype=dt)
    xe = torch.randn(T, kdim + r, device=dev, dtype=dt)
    big = torch.zeros(n + r, kdim + r, device=dev, dtype=dt)
    ge = torch.randn(T, n + r, device=dev, dtype=dt)
    row = {}
    row["fwd_base"] = timeit(lambda: x @ w.T)
    row["fwd_thin_xa"] = timeit(lambda: x @ a.T)
    row["merge"] = timeit(lambda: merged_weight(w, a, sb))
    row["merge_T"] = timeit(lambda: merged_weight(w, a, sb, transposed=True))
    row["fwd_merged_gemm"] = timeit(lambda: x @ merged_weight(w, a, sb).T)
    xa = x @ a.T
    row["fwd_unmerged_addmm"] = timeit(lambda: (x @ w.T).addmm_(xa, sb.T))
    row["fwd_kext_gemm"] = timeit(lambda: xe @ big[:n].T)
    row["fwd_kext_cat"] = timeit(lambda: torch.cat([x, xa], 1) @ big[:n].T)
    row["bwd_base"] = timeit(lambda: g @ w)
    row["bwd_thin_gb"] = timeit(lambda: g @ sb)
    row["bwd_grad_a"] = timeit(lambda: (g @ sb).T @ x)
    row["bwd_grad_b"] = timeit(lambda: g.T @ xa)
    row["bwd_merged_gemm"] = timeit(lambda: g @ merged_weight(w, a, sb, transposed=True).T)
    gb = g @ sb
    row["bwd_unmerged_addmm"] = timeit(lambda: (g @ w).addmm_(gb, a))
    row["bwd_kext_gemm"] = timeit(lambda: ge @ big[:, :kdim])
    wide = torch.randn(n + r, kdim, device=dev, dtype=dt) / kdim**0.5
    wide_t = torch.randn(kdim + r, n, device=dev, dtype=dt) / n**0.5
    w_t = torch.randn(kdim, n, device=dev, dtype=dt) / n**0.5
    row["fwd_wide_gemm"] = timeit(lambda: x @ wide.T)
    row["bwd_base_Tlayout"] = timeit(lambda: g @ w_t.T)
    row["bwd_wide_gemm"] = timeit(lambda: g @ wide_t.T)
    res[f"site_N{n}_K{kdim}"] = row
    print(f"site N={n} K={kdim}", row, flush=True)

Path(sys.argv[1]).write_text(json.dumps(res, indent=1))
