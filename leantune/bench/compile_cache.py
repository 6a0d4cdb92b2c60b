"""``torch.compile``'s cache artifacts carried from one process to another, even to another machine.

Compiling is most of what a benchmark costs on a lent GPU: a 3B Llama's step takes about 140 s to
compile per mode, against seconds of timed steps. Inductor can write what it compiled (graphs,
kernels) as one blob, and load such a blob into a fresh process before it compiles, which then finds
its graphs there instead of building them. A blob only helps where the code, PyTorch, Triton and
the GPU's kind are the same; anything else compiles as usual. Dynamo still traces each step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch._dynamo.utils import counters

from leantune.demo import write_bytes_atomically


def load(path: Path) -> int:
    """Load the artifacts saved at ``path`` into this process's caches, if the file exists; its size.
    A blob this PyTorch cannot read is reported and skipped: the run then compiles as usual."""
    if not path.is_file():
        return 0
    data = path.read_bytes()
    try:
        loaded = torch.compiler.load_cache_artifacts(data)  # None (and a logged warning) for a bad blob
        problem = None if loaded is not None else "not a cache this PyTorch can read"
    except Exception as err:  # a cache is an optimisation: never a reason to stop a benchmark
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        print(f"compile cache: could not load {path} ({problem}); compiling as usual", flush=True)
        return 0
    return len(data)


def save(path: Path) -> int:
    """Write every artifact this process compiled or loaded to ``path`` (atomically); its size.
    A failure is reported and leaves the file as it was."""
    try:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return 0
        write_bytes_atomically(path, saved[0])
    except Exception as err:
        print(f"compile cache: could not save to {path} ({type(err).__name__}: {err})", flush=True)
        return 0
    return len(saved[0])


def graph_lookups() -> dict[str, int]:
    """How many compiled graphs this process found in inductor's cache, and how many it built."""
    inductor = counters["inductor"]
    return {"hit": inductor["fxgraph_cache_hit"], "miss": inductor["fxgraph_cache_miss"]}
