"""Host time a compiled training step spends in TorchDynamo's guards, before any kernel runs.

Every call of a ``torch.compile``d function first checks its guards; for a Llama with LoRA on
all seven projections that is thousands of checks per call, and the GPU waits for them at the
start of each step. This times ``TorchDynamo Cache Lookup`` (``torch.profiler``, CPU) per call of
the compiled loss for leantune's LoRA through ``lt.compile`` and HF PEFT's through
``torch.compile``, on a narrow Llama (hidden size 64) with as many layers as asked, so that
the model's structure, not its arithmetic, sets the cost::

    python -m leantune.bench.guards --layers 16,28 --repeats 3
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

import torch

import leantune as lt
from leantune.bench import speed

LOOKUP = "TorchDynamo Cache Lookup"


def narrow_llama(layers: int) -> None:
    """Register size ``host<layers>``: the 1B model's layout and layer count at width 64."""
    speed.SIZES[f"host{layers}"] = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)


def lookup_ms(step: Callable[[], None], calls: int = 10) -> float:
    """Mean time per call in the guard check, over ``calls`` profiled calls of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            step()
    event = next((e for e in prof.key_averages() if e.key == LOOKUP), None)
    if event is None:
        raise RuntimeError(f"no {LOOKUP!r} event: is the step compiled?")
    return event.cpu_time_total / event.count / 1e3


def measure(library: str, layers: int, repeats: int) -> list[float]:
    """Guard time per call (ms), ``repeats`` times, after three warm-up steps."""
    narrow_llama(layers)
    torch._dynamo.reset()
    setup = speed.setup("lt" if library == "leantune" else "peft", speed.build(f"host{layers}", "cpu"))
    loss = (lt.compile if library == "leantune" else torch.compile)(setup.loss)
    ids = torch.randint(0, 1000, (1, 16))

    def step() -> None:
        loss(ids, ids).backward()

    for _ in range(3):
        step()
    return [round(lookup_ms(step), 3) for _ in range(repeats)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="16", help="comma-separated layer counts")
    ap.add_argument("--libraries", default="leantune,peft")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    libraries = args.libraries.split(",")
    for library in libraries:
        if library not in ("leantune", "peft"):
            raise SystemExit(f"--libraries: {library!r} is neither leantune nor peft")
    torch.set_num_threads(1)
    for layers in (int(n) for n in args.layers.split(",")):
        for library in libraries:
            ms = measure(library, layers, args.repeats)
            print(json.dumps({"library": library, "layers": layers, "lookup_ms": ms}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
