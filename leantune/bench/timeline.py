"""Where a profiled step's GPU time goes: kernels, and the gaps in which the GPU waited.

A step's wall time is its kernels plus the gaps between them. A gap that ends when the
host launches the next kernel (the launch came after the previous kernel had finished)
means the GPU waited for the CPU: many short kernels, Python or launch overhead. Other
gaps are waits on synchronisation or memory allocation. ``gap_summary`` reads a Chrome
trace written by ``torch.profiler`` (``prof.export_chrome_trace``).
"""

from __future__ import annotations

from collections import Counter

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}
# A gap shorter than this is the GPU's own dispatch latency between back-to-back kernels.
SMALL_GAP_US = 2.0


def gap_summary(trace: dict, top: int = 12) -> dict:
    """Busy and idle time of the device events in ``trace`` (µs): the time before the first
    kernel (``lead_us``, the host's work before it launches anything), the idle time between
    kernels split into gaps waiting on a launch from the host and other gaps, and the longest gaps."""
    events = trace.get("traceEvents", trace) if isinstance(trace, dict) else trace
    device = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES),
                    key=lambda e: e["ts"])
    if not device:
        raise ValueError("the trace has no device events: profile with ProfilerActivity.CUDA")
    launches = {e["args"]["correlation"]: e["ts"] for e in events
                if e.get("ph") == "X" and e.get("cat") in ("cuda_runtime", "cuda_driver")
                and "correlation" in e.get("args", {})}
    busy = idle_launch = idle_other = small = 0.0
    end = device[0]["ts"]
    gaps, by_kernel = [], Counter()
    for e in device:
        start, stop = e["ts"], e["ts"] + e["dur"]
        gap = start - end
        if gap > SMALL_GAP_US:
            launched = launches.get(e.get("args", {}).get("correlation"))
            waited_on_host = launched is not None and launched >= end - 1.0
            if waited_on_host:
                idle_launch += gap
            else:
                idle_other += gap
            gaps.append((gap, e["name"], "host launch" if waited_on_host else "other"))
        elif gap > 0:
            small += gap
        busy += max(0.0, stop - max(start, end))
        by_kernel[e["name"]] += e["dur"]
        end = max(end, stop)
    host = [e for e in events if e.get("ph") == "X" and e.get("cat") not in DEVICE_CATEGORIES and "ts" in e]
    first = min([e["ts"] for e in host] + [device[0]["ts"]])
    # What the host did before the first kernel ran: its longest spans there (they nest).
    lead = Counter()
    for e in host:
        if e["ts"] < device[0]["ts"]:
            lead[e["name"]] += min(e["ts"] + e.get("dur", 0), device[0]["ts"]) - e["ts"]
    gaps.sort(reverse=True)
    return dict(span_us=round(end - first), lead_us=round(device[0]["ts"] - first), busy_us=round(busy), idle_host_launch_us=round(idle_launch),
                idle_other_us=round(idle_other), idle_small_us=round(small), kernels=len(device),
                gaps_over_small=len(gaps), longest_gaps=[dict(us=round(g, 1), before=n[:90], kind=k) for g, n, k in gaps[:top]],
                top_kernels=[dict(name=n[:90], us=round(t)) for n, t in by_kernel.most_common(top)],
                lead_host_spans=[dict(name=n[:90], us=round(t)) for n, t in lead.most_common(top)])
