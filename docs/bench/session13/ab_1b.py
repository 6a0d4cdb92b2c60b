"""The A/B that session 13 ran on the H100 against main at 2df7d66 (where ``lt_ungrouped_compile``
and ``lt.compile(group_thin_products=...)`` still existed; both were removed after this run).

    PYTHONPATH=. python docs/bench/session13/ab_1b.py 1b \
        peft_compile,lt_compile,lt_ungrouped_compile,lt_compile+both /tmp/ab 30 --profile

Each label is a bench mode, run by ``leantune.bench.speed.run_mode`` in one process; ``+both``
runs it with session 11's merge rule (merge both directions where rows·(N + K) > N·K) in place
of ``merge_pays``'s per-direction choice. ``+combo`` (not used) would add inductor's combo kernels.
Profile labels are the bench modes', so a ``+both`` run's profile shares its mode's label.
"""

import importlib
import json
import sys
from pathlib import Path

import torch

from leantune.bench import speed as S

ll = importlib.import_module("leantune.engine.lowrank_linear")
torch._dynamo.config.recompile_limit = 64
size, labels, out = sys.argv[1], sys.argv[2].split(","), Path(sys.argv[3])
steps = int(sys.argv[4]) if len(sys.argv) > 4 else 30
prof = out / f"profile_{size}.txt" if "--profile" in sys.argv else None
out.mkdir(parents=True, exist_ok=True)
data = S.batches(size, 4, 4, 1024, "cuda")
orig = ll.merge_pays


def both(x, w, r):
    """Session 11's rule: merge both directions iff rows·(n + k) > n·k."""
    if not (torch.compiler.is_compiling() and ll.merge_kernel.available(w, r)):
        return False, False
    rows = x.numel() // x.shape[-1]
    n, k = w.shape
    m = rows * (n + k) > n * k
    return m, m


orig_compile = S.lt.compile


def combo_compile(fn, **kw):
    kw["options"] = {**(kw.get("options") or {}), "combo_kernels": True}
    return orig_compile(fn, **kw)


res = []
for lab in labels:
    base, *variants = lab.split("+")
    ll.merge_pays = both if "both" in variants else orig
    S.lt.compile = combo_compile if "combo" in variants else orig_compile
    try:
        r = S.run_mode(base, size, data, steps, 3, 1e-3, "cuda", prof)
    except Exception as e:
        r = dict(error=repr(e))
    r["mode"] = lab
    res.append(r)
    print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    (out / f"ab_{size}.json").write_text(json.dumps(res))
    torch._dynamo.reset()
    torch.cuda.empty_cache()
