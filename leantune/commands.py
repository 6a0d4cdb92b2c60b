"""``leantune train | eval | merge | export``: the training pipeline on the command line.

Each command is a thin shell over ``leantune.train``; ``add_subcommands`` plugs
them into the ``leantune`` parser. Problems the user can fix (the config, the
data, a folder) print one clear message and exit with status 2; a run stopped
with Ctrl-C exits with 130 after saving its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from .train.config import ConfigError

STOPPED = 130  # the shell's code for a run ended by Ctrl-C


def _guarded(name: str, run: Callable[[argparse.Namespace], int], errors: tuple[type[Exception], ...]):
    def command(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except errors as err:
            message = err.args[0] if isinstance(err, KeyError) and err.args else err
            print(f"leantune {name}: error: {message}", file=sys.stderr)
            return 2

    return command


def _train(args: argparse.Namespace) -> int:
    from .train.runner import train

    result = train(None, args.config, overrides=args.overrides, resume=args.resume)
    return STOPPED if result.stopped else 0


def _eval(args: argparse.Namespace) -> int:
    from .train.runner import evaluate

    metrics = evaluate(args.config, args.adapter, overrides=args.overrides)
    print(json.dumps(metrics, indent=2))
    return 0


def _merge(args: argparse.Namespace) -> int:
    from .train.export import merge_to_model

    print(f"leantune merge: wrote {merge_to_model(args.base, args.adapter, args.out)}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from .train.export import export_adapter

    print(f"leantune export: wrote {export_adapter(args.adapter, args.format, args.out)}")
    return 0


def _overrides(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set training.max_steps=100 (repeatable; values are YAML)")


def add_subcommands(sub: argparse._SubParsersAction) -> None:
    """Register ``train``, ``eval``, ``merge`` and ``export`` on the ``leantune`` parser's subcommands."""
    user_errors = (ConfigError, FileNotFoundError)
    adapter_errors = (*user_errors, ValueError, KeyError)
    p = sub.add_parser("train", help="fine-tune an adapter as a YAML config describes (docs/training.md)")
    p.add_argument("config", help="the run's YAML file: model, task, data, method, training, output")
    _overrides(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in output.dir")
    p.set_defaults(func=_guarded("train", _train, user_errors))

    p = sub.add_parser("eval", help="evaluate an adapter on the config's data.eval with the task's metrics")
    p.add_argument("config", help="the run's YAML file")
    p.add_argument("--adapter", required=True, help="adapter folder (e.g. OUTPUT/adapter or OUTPUT/best)")
    _overrides(p)
    p.set_defaults(func=_guarded("eval", _eval, adapter_errors))

    p = sub.add_parser("merge", help="fold an adapter into its base and write a full transformers model")
    p.add_argument("--base", required=True, help="the base model: Hugging Face id or local folder")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="folder for the merged model (written atomically)")
    p.set_defaults(func=_guarded("merge", _merge, adapter_errors))

    p = sub.add_parser("export", help="write an adapter in another library's format")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--format", required=True, choices=["peft"], help="peft: HF PEFT's adapter folder")
    p.add_argument("--out", required=True, help="folder to write")
    p.set_defaults(func=_guarded("export", _export, adapter_errors))
