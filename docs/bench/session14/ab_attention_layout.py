"""A/B: attention inputs made contiguous (B, H, S, D) before SDPA, for leantune's modes.

Prepared in session 14, not yet run (no machine came). It is ``leantune bench speed`` (one
process, the bench's tables, JSON and chart) with one addition: a label ending in ``+contig``
runs its mode with transformers' "sdpa" attention function swapped for one that makes q, k
and v contiguous first, and is named so in the report:

    PYTHONPATH=. python docs/bench/session14/ab_attention_layout.py --size 1b --steps 20 --out /tmp/ab \\
        --modes lt_compile+contig,lt_compile,peft_compile,lt_lst_compile+contig,frozen_compile+contig

The bench's rival ratios match labels exactly, so they leave the ``+contig`` rows out: compare
those rows' tokens/s with the plain rows of the same process.
"""

import sys

from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import AttentionInterface

from leantune.bench import speed

SUFFIX = "+contig"
plain_sdpa = AttentionInterface._global_mapping["sdpa"]
plain_run_mode = speed.run_mode


def contiguous_sdpa(module, query, key, value, attention_mask, **kwargs):
    return sdpa_attention_forward(module, query.contiguous(), key.contiguous(), value.contiguous(),
                                  attention_mask, **kwargs)


def run_mode(label: str, *args, **kwargs) -> dict:
    contig = label.endswith(SUFFIX)
    AttentionInterface._global_mapping["sdpa"] = contiguous_sdpa if contig else plain_sdpa
    try:
        result = plain_run_mode(label.removesuffix(SUFFIX), *args, **kwargs)
    finally:
        AttentionInterface._global_mapping["sdpa"] = plain_sdpa
    if contig:
        result.update(mode=label, name=f"{result['name']}, q/k/v contiguous")
    return result


speed.run_mode = run_mode
raise SystemExit(speed.main(sys.argv[1:]))
