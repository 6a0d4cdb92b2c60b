"""Session 20 (H200, 1B): per-phase host and GPU time of one compiled step, GC time, syncs, allocator calls,
and the host events inside the largest GPU gap of a profiled step.

`PYTHONPATH=. python docs/bench/session20/phases.py 1b lt_compile,peft_compile 6` -> raw_phases_1b_h200.txt
"""

import gc
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import leantune as lt
from leantune.bench.speed import batches, build, setup, split_label

size, modes = sys.argv[1], sys.argv[2].split(",")
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 6
data = batches(size, 4, 4, 1024, "cuda")
gc_time = [0.0]
_t = [0.0]


def cb(phase, info):
    if phase == "start":
        _t[0] = time.perf_counter()
    else:
        gc_time[0] += time.perf_counter() - _t[0]
        gc_log.append((info["generation"], round((time.perf_counter() - _t[0]) * 1e3, 2)))


gc_log = []
gc.callbacks.append(cb)


def step(loss_fn, opt, ids, rec=None):
    pc = time.perf_counter
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(5)]
    torch.cuda.synchronize()
    g0 = gc_time[0]
    gc_log.clear()
    m0 = torch.cuda.memory_stats()
    h = [pc()]
    ev[0].record()
    loss = loss_fn(ids, ids)
    h.append(pc())
    ev[1].record()
    loss.backward()
    h.append(pc())
    ev[2].record()
    opt.step()
    h.append(pc())
    ev[3].record()
    opt.zero_grad(set_to_none=True)
    h.append(pc())
    ev[4].record()
    torch.cuda.synchronize()
    h.append(pc())
    m1 = torch.cuda.memory_stats()
    host = [round((h[i + 1] - h[i]) * 1e3, 2) for i in range(5)]
    gpu = [round(ev[i].elapsed_time(ev[i + 1]), 2) for i in range(4)]
    return dict(
        host_fwd_bwd_opt_zero_wait=host,
        gpu_fwd_bwd_opt_zero=gpu,
        total=round((h[5] - h[0]) * 1e3, 2),
        gc_ms=round((gc_time[0] - g0) * 1e3, 2),
        gc_log=list(gc_log),
        mem={
            k: m1.get(k, 0) - m0.get(k, 0)
            for k in ("num_device_alloc", "num_device_free", "num_alloc_retries", "num_sync_all_streams")
        },
    )


def gap_hosts(loss_fn, opt, ids):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        loss_fn(ids, ids).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp) / "t.json"
        prof.export_chrome_trace(str(p))
        tr = json.loads(p.read_text())
    ev = tr["traceEvents"]
    dev = sorted(
        (e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
        key=lambda e: e["ts"],
    )
    end, best = dev[0]["ts"], (0, None, None)
    for e in dev:
        if e["ts"] - end > best[0]:
            best = (e["ts"] - end, end, e)
        end = max(end, e["ts"] + e["dur"])
    gap, start, nxt = best
    stop = nxt["ts"]
    print(f"biggest gap {gap:.0f} us before {nxt['name'][:60]}", flush=True)
    host = [
        e
        for e in ev
        if e.get("ph") == "X"
        and e.get("cat") not in ("kernel", "gpu_memcpy", "gpu_memset")
        and "ts" in e
        and e["ts"] < stop
        and e["ts"] + e.get("dur", 0) > start
    ]
    host.sort(key=lambda e: -e.get("dur", 0))
    within = [e for e in host if e["ts"] >= start and e["ts"] + e.get("dur", 0) <= stop]
    print("  inside the gap:", flush=True)
    for e in within[:45]:
        print(
            f"  {e.get('dur', 0):9.0f} us  start {e['ts'] - start:9.0f}  {e.get('cat')}  {e['name'][:110]}",
            flush=True,
        )
    print("  spanning:", flush=True)
    for e in [e for e in host if e not in within][:25]:
        print(
            f"  {e.get('dur', 0):9.0f} us  start {e['ts'] - start:9.0f}  {e.get('cat')}  {e['name'][:110]}",
            flush=True,
        )
    # leaves: host events inside the gap and not containing others, by total time
    from collections import Counter

    inside = Counter()
    for e in host:
        a, b = max(e["ts"], start), min(e["ts"] + e.get("dur", 0), stop)
        if e.get("cat") == "python_function":
            continue
        inside[e["name"][:90]] += b - a
    print("  cpu_op time inside gap:", inside.most_common(25), flush=True)


for label in modes:
    mode, cm = split_label(label)
    torch._dynamo.reset()
    gc.collect()
    s = setup(mode, build(size, "cuda"))
    loss_fn = (lt.compile if mode.startswith("lt") else torch.compile)(s.loss)
    opt = torch.optim.AdamW(s.params, lr=1e-4, fused=True)
    t = time.perf_counter()
    for i in range(3):
        step(loss_fn, opt, data[i % 4])
    print(label, "warmup s", round(time.perf_counter() - t, 1), flush=True)
    rs = [step(loss_fn, opt, data[i % 4]) for i in range(steps)]
    for r in rs:
        print(label, json.dumps(r), flush=True)
    print(label, "median total", statistics.median(r["total"] for r in rs), flush=True)
    gc.disable()
    rs = [step(loss_fn, opt, data[i % 4]) for i in range(steps)]
    gc.enable()
    print(
        label,
        "gc off median total",
        statistics.median(r["total"] for r in rs),
        json.dumps(rs[-1]),
        flush=True,
    )
    gc.freeze()
    rs = [step(loss_fn, opt, data[i % 4]) for i in range(steps)]
    gc.unfreeze()
    print(label, "gc frozen median total", statistics.median(r["total"] for r in rs), flush=True)
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        loss_fn(data[0], data[0]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    print(label, "sync warnings:", len(w), [str(x.message)[:200] for x in w[:5]], flush=True)
    gap_hosts(loss_fn, opt, data[0])
    del s, loss_fn, opt
