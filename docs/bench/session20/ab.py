"""Session 20's A/B of ways to issue fewer host launches per step, in one process.

``leantune bench speed`` where a label may end in flags:

- ``+fg``: LoRA sites take both factor gradients from one Triton launch (``factor_grads.py``);
- ``+cpp``: inductor writes its wrapper in C++ (``cpp_wrapper``), so each launch skips Python;
- ``+keep``: sites merged both ways keep the forward's ``W'`` for the backward (session 21,
  ``../session21/keep_merged.py``);
- ``+combo``: inductor's combo kernels (``combo_kernels``): independent small kernels of a graph,
  such as the factors' casts, share one launch (session 21).
- ``+stack``: sibling sites (``q, k, v``; ``gate, up``) run stacked (session 22,
  ``leantune.core.siblings.stack_siblings``; session 23 gave each sibling its own output);
- ``+copy``: the deltas' in-place adds trace as out-of-place ``addmm`` again, which copies
  their output first (before session 23's ``leantune.engine.inplace``).

CUDA graphs need no flag: they are the bench's ``_compile_cg`` suffix, and flags follow it. Session 22's plan (3B, one process)::

    PYTHONPATH=. python docs/bench/session20/ab.py --size 3b --steps 20 --warmup 3 --out /tmp/ab \\
        --modes peft_compile,lt_compile,lt_compile+keep+fg,peft_compile_cg,lt_compile_cg,lt_compile_cg+keep+fg
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import leantune as lt
from leantune.bench import speed
from leantune.core.siblings import stack_siblings

# the modules, which the package's names for their functions shadow
lowrank_module, stacked_module = sys.modules["leantune.engine.lowrank_linear"], sys.modules["leantune.engine.stacked_linear"]

sys.path.insert(0, str(Path(__file__).parent))
import factor_grads  # noqa: E402  (the experiment's kernel, beside this file)

sys.path.insert(0, str(Path(__file__).parents[1] / "session21"))
import keep_merged  # noqa: E402  (session 21's experiment)

FLAGS = {"+fg": ", fused factor gradients", "+cpp": ", C++ wrapper",
         "+keep": ", merged weight kept", "+combo": ", combo kernels", "+stack": ", siblings stacked",
         "+copy": ", copying addmm"}


def split_flags(label: str) -> tuple[str, list[str]]:
    """``"lt_compile+fg+cpp"`` -> ``("lt_compile", ["+fg", "+cpp"])``."""
    mode, flags = label, []
    while any(mode.endswith(f) for f in FLAGS):
        flag = next(f for f in FLAGS if mode.endswith(f))
        mode, flags = mode.removesuffix(flag), [flag, *flags]
    return mode, flags


def rival_pairs(results: list[dict]) -> list[tuple[str, str]]:
    """The bench's loss pairs, plus each flagged mode against its unflagged mode's rival."""
    pairs = _plain_rival_pairs(results)
    rival = dict(_plain_rival_pairs([dict(r, mode=split_flags(r["mode"])[0]) for r in results]))
    return pairs + [(r["mode"], rival[m]) for r in results if (m := split_flags(r["mode"])[0]) != r["mode"] and m in rival]


def run_mode(label: str, *args, **kwargs) -> dict:
    """``speed.run_mode`` for ``label`` without its flags, with the flags' changes in force."""
    mode, flags = split_flags(label)
    lowrank = factor_grads.L.LowRankLinear
    if "+fg" in flags:
        lowrank.backward = staticmethod(factor_grads.backward)
    if "+keep" in flags:  # its own forward and backward, which take +fg's kernel for the kept sites
        fused = "+fg" in flags
        keep_merged.switch(True, lowrank.backward, factor_grads.factor_grads if fused else None)
    adapt = lt.adapt
    if "+stack" in flags:
        lt.adapt = lambda model, *a, **k: (adapt(model, *a, **k), stack_siblings(model))[0]
    in_place = lowrank_module.addmm_into
    if "+copy" in flags:
        for module in (lowrank_module, stacked_module):
            module.addmm_into = _copying_addmm
    try:
        with torch._inductor.config.patch(cpp_wrapper="+cpp" in flags, combo_kernels="+combo" in flags):
            res = _plain_run_mode(mode, *args, **kwargs)
    finally:
        lowrank.backward = staticmethod(factor_grads._original_backward)
        keep_merged.switch(False)
        lt.adapt = adapt
        for module in (lowrank_module, stacked_module):
            module.addmm_into = in_place
    res["mode"], res["name"] = label, res["name"] + "".join(FLAGS[f] for f in flags)
    return res


def _copying_addmm(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return out.addmm_(a, b)


_plain_run_mode, _plain_rival_pairs = speed.run_mode, speed.rival_pairs

if __name__ == "__main__":
    speed.run_mode, speed.rival_pairs = run_mode, rival_pairs
    raise SystemExit(speed.main(sys.argv[1:]))
