"""The ``leantune`` command: ``leantune demo``, ``leantune methods``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .commands import add_subcommands
from .registry import get_method, methods


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def cmd_methods(args: argparse.Namespace) -> int:
    """Print every registered method with its fields, defaults, mergeability, engine path and PEFT counterpart."""
    print("fused: trains nn.Linear sites through the engine's fused low-rank product (dropout 0); "
          "no: plain autograd, which every method keeps working on\n")
    for name, cls in methods().items():
        peft = f"yes ({cls.peft_type})" if cls.peft_type else "no"
        print(f"{name}  [{cls.__name__}]  mergeable: {_yes(cls.mergeable)}  fused: {_yes(cls.fused_linear)}  "
              f"HF PEFT: {peft}")
        summary = (cls.__doc__ or "").strip().splitlines()
        if summary:
            print(f"    {summary[0]}")
        for field, kind, default in cls.field_docs():
            print(f"    {field}: {kind} = {default!r}")
        print()
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Fine-tune MiniLM into a topic classifier on the chatterbot corpus and report the numbers."""
    from .demo import run  # transformers and the data load only when the demo runs

    run(out=args.out, method=args.method, epochs=args.epochs, steps=args.steps, seed=args.seed)
    return 0


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="leantune", description="Parameter- and memory-efficient fine-tuning: every PEFT method in one design space."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("demo", help="fine-tune all-MiniLM-L6-v2 as a topic classifier, offline (minutes on a CPU)")
    p.add_argument("--out", default="leantune-demo", help="folder for the adapter and summary.json (default: %(default)s)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--epochs", type=_positive, help="passes over the training data (default: the demo's tuned number)")
    budget.add_argument("--steps", type=_positive, help="optimizer steps instead of epochs")
    p.add_argument("--seed", type=int, default=0, help="seed for the head, data order and dropout (default: %(default)s)")
    p.add_argument("--method", default="lora", help="method name, see `leantune methods` (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("methods", help="list every method, its parameters, mergeable or not, HF PEFT equivalent")
    p.set_defaults(func=cmd_methods)
    add_subcommands(sub)
    _add_bench(sub)
    return parser


def _add_bench(sub: argparse._SubParsersAction) -> None:
    """``leantune bench quality|speed``: comparisons with tables and plots."""
    from .bench import quality, speed

    bench = sub.add_parser("bench", help="speed / memory / quality comparisons, with tables and plots")
    kinds = bench.add_subparsers(dest="bench", metavar="KIND", required=True)
    q = kinds.add_parser("quality", help="every method on MiniLM + SST-2: accuracy, parameters, time, memory")
    quality.add_arguments(q)
    q.set_defaults(func=quality.main)
    s = kinds.add_parser("speed", help="LoRA training speed and memory against HF PEFT on a Llama config (GPU)")
    speed.add_arguments(s)
    s.set_defaults(func=speed.run)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``leantune`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "method", None) is not None:
        try:  # before any work starts, and without a traceback: the registry's message names the fix
            get_method(args.method)
        except KeyError as err:
            print(f"leantune {args.command}: error: {err.args[0]}", file=sys.stderr)
            return 2
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
