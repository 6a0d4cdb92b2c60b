"""A/B: attention inputs made contiguous (B, H, S, D) before SDPA, for leantune's modes.

Prepared in session 14, not yet run (no machine came). Each label is a bench mode run by
``leantune.bench.speed.run_mode`` in one process; ``+contig`` swaps transformers' "sdpa"
attention function for one that makes q, k and v contiguous first:

    PYTHONPATH=. python docs/bench/session14/ab_attention_layout.py 1b \
        lt_compile+contig,lt_compile,peft_compile,lt_lst_compile+contig,frozen_compile+contig /tmp/ab 20
"""
import json
import sys
from pathlib import Path

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from leantune.bench import speed as S

torch._dynamo.config.recompile_limit = 64
size, labels, out = sys.argv[1], sys.argv[2].split(","), Path(sys.argv[3])
steps = int(sys.argv[4])
data = S.batches(size, 4, 4, 1024, "cuda")
orig = AttentionInterface._global_mapping["sdpa"]


def contiguous_sdpa(module, query, key, value, attention_mask, **kwargs):
    return sdpa_attention_forward(module, query.contiguous(), key.contiguous(), value.contiguous(),
                                  attention_mask, **kwargs)


res = []
for lab in labels:
    base, *variants = lab.split("+")
    AttentionInterface._global_mapping["sdpa"] = contiguous_sdpa if "contig" in variants else orig
    try:
        r = S.run_mode(base, size, data, steps, 3, 1e-3, "cuda")
    except Exception as e:
        r = dict(error=repr(e)[:500])
    r["mode"] = lab
    res.append(r)
    print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    (out / f"ab_attn_{size}.json").write_text(json.dumps(res))
    torch._dynamo.reset()
    torch.cuda.empty_cache()
