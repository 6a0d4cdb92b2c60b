"""Which inputs CUDA-graph trees copy per replay of leantune's compiled 1B LoRA step.

Run in session 14 (``cuda_graph_copies_1b.json``): ``PYTHONPATH=. python docs/bench/session14/cuda_graph_copies.py OUT.json``.
Its "mb" column counts 2 bytes an element whatever the dtype (the int64 token ids are 0.03 MiB, not 0.01).
"""
import collections
import json
import sys
from pathlib import Path

import torch
from torch._inductor import cudagraph_trees as ct

from leantune.bench import speed

seen = collections.Counter()
orig = ct.CUDAGraphNode._copy_inputs_and_remove_from_src

def spy(self, dsts, srcs):
    for idx in self.non_static_input_idx:
        t = srcs[idx]
        if isinstance(t, torch.Tensor):
            seen[(tuple(t.shape), str(t.dtype), t.requires_grad, type(t).__name__)] += 1
    return orig(self, dsts, srcs)

ct.CUDAGraphNode._copy_inputs_and_remove_from_src = spy
label = sys.argv[2] if len(sys.argv) > 2 else "lt_compile_cg"
data = speed.batches("1b", 4, 4, 1024, "cuda")
r = speed.run_mode(label, "1b", data, 6, 2, 1e-4, "cuda")
r.pop("losses")
out = dict(result=r, copies=[dict(shape=k[0], dtype=k[1], requires_grad=k[2], type=k[3], count=v,
                                  mb=round(torch.Size(k[0]).numel() * 2 / 2**20, 2)) for k, v in seen.most_common(40)])
Path(sys.argv[1]).write_text(json.dumps(out, indent=1))
print(json.dumps(out)[:3000])
