"""Why cuDNN attention runs slower inside the 1B model than alone: layout, L2 reuse, compile.

Prepared in session 14, not yet run: ``PYTHONPATH=. python docs/bench/session14/attention_layout_micro.py OUT.json``.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

dev, dt = "cuda", torch.bfloat16
b, h, kv, s, d = 4, 32, 8, 1024, 64
res = {}

def timeit(fn, iters=30, warm=5):
    for _ in range(warm):
        fn(0)
    torch.cuda.synchronize()
    st, en = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    st.record()
    for i in range(iters):
        fn(i)
    en.record()
    torch.cuda.synchronize()
    return round(st.elapsed_time(en) / iters * 1000, 1)

def make(layout, n=1):
    sets = []
    for _ in range(n):
        if layout == "bhsd":
            q = torch.randn(b, h, s, d, device=dev, dtype=dt)
            k = torch.randn(b, kv, s, d, device=dev, dtype=dt)
            v = torch.randn(b, kv, s, d, device=dev, dtype=dt)
            go = torch.randn(b, h, s, d, device=dev, dtype=dt)
        else:  # what HF passes: (b, s, h, d) viewed as (b, h, s, d)
            q = torch.randn(b, s, h, d, device=dev, dtype=dt).transpose(1, 2)
            k = torch.randn(b, s, kv, d, device=dev, dtype=dt).transpose(1, 2)
            v = torch.randn(b, s, kv, d, device=dev, dtype=dt).transpose(1, 2)
            go = torch.randn(b, s, h, d, device=dev, dtype=dt).transpose(1, 2)
        sets.append([t.requires_grad_() if i < 3 else t for i, t in enumerate((q, k, v, go))])
    return sets

for layout in ["bhsd", "bshd"]:
    for n in [1, 8]:
        sets = make(layout, n)
        def fw(i, sets=sets):
            q, k, v, _ = sets[i % len(sets)]
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        def fb(i, sets=sets):
            q, k, v, go = sets[i % len(sets)]
            torch.autograd.backward(F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), go)
        key = f"{layout}_sets{n}"
        res[key] = dict(fwd_us=timeit(fw), fwdbwd_us=timeit(fb))
        print(key, res[key], flush=True)

# HF-like block under torch.compile: projections' outputs (b, s, h*d) -> heads -> sdpa -> back
def block(xq, xk, xv, contiguous):
    q = xq.view(b, s, h, d).transpose(1, 2)
    k = xk.view(b, s, kv, d).transpose(1, 2)
    v = xv.view(b, s, kv, d).transpose(1, 2)
    q, k = q * 1.0001, k * 1.0001  # stands for RoPE: a pointwise producer
    if contiguous:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return o.transpose(1, 2).reshape(b, s, h * d)

for contiguous in [False, True]:
    fn = torch.compile(lambda a, c, e, cont=contiguous: block(a, c, e, cont))
    xs = [(torch.randn(b, s, h * d, device=dev, dtype=dt, requires_grad=True),
           torch.randn(b, s, kv * d, device=dev, dtype=dt, requires_grad=True),
           torch.randn(b, s, kv * d, device=dev, dtype=dt, requires_grad=True),
           torch.randn(b, s, h * d, device=dev, dtype=dt)) for _ in range(8)]
    def run(i, fn=fn, xs=xs):
        a, c, e, g = xs[i % 8]
        torch.autograd.backward(fn(a, c, e), g)
    def fwd(i, fn=fn, xs=xs):
        a, c, e, g = xs[i % 8]
        return fn(a, c, e)
    key = f"compiled_block_contiguous{contiguous}"
    res[key] = dict(fwd_us=timeit(fwd), fwdbwd_us=timeit(run))
    print(key, res[key], flush=True)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run(0)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=90), flush=True)
Path(sys.argv[1]).write_text(json.dumps(res, indent=1))
