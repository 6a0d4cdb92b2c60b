"""``train`` and ``evaluate``: a run config (and optionally a model object) in, a trained adapter out.

Everything that can be wrong with a run — the config, the data's columns and
labels, the model and tokenizer, an occupied output folder — is checked here
before the first step, in the order that makes the cheapest check come first.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import random
import shutil
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from ..api import adapt, adapters, delete_adapter, trainable_parameters
from ..config import MethodConfig
from ..storage import load_adapter
from . import checkpoint as ckpt
from .config import ConfigError, RunConfig, load
from .data import Row, load_split, resolve_columns
from .distributed import Dist, local_device, setup, teardown
from .logs import read_metrics
from .loop import Callback, Loop, Result, evaluate_model
from .models import load_model, load_tokenizer
from .plots import draw_curves
from .tasks import TASKS, Task, check_packing, model_inputs

ConfigLike = str | Path | dict[str, Any] | RunConfig


def _say(dist: Dist, text: str) -> None:
    if dist.main:
        print(text, file=sys.stderr, flush=True)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _tokenizer(cfg: RunConfig, model: nn.Module | None, given: Any) -> Any:
    if given is not None:
        return given
    source = cfg.model.tokenizer or cfg.model.name or getattr(model, "name_or_path", "")
    if not source:
        raise ConfigError("model.tokenizer: required when the model is passed in without a tokenizer")
    return load_tokenizer(source)


def _task(cfg: RunConfig, tokenizer: Any, train: list[Row], others: Sequence[list[Row]], source: str) -> Task:
    cls = TASKS[cfg.task.type]
    columns = resolve_columns(cfg.data.columns, cls.required, cls.optional, train, source, cls.name)
    for rows in others:
        resolve_columns(cfg.data.columns, cls.required, cls.optional, rows, cfg.data.eval or "eval data", cls.name)
    task = cls(cfg.task, tokenizer, columns)
    task.fit(train, others)
    metric = cfg.training.best_metric
    if metric and metric not in cls.metric_names:
        near = difflib.get_close_matches(metric, cls.metric_names, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"training.best_metric: {cls.name} reports {', '.join(cls.metric_names)}{hint}")
    return task


def _base_model(cfg: RunConfig, task: Task, tokenizer: Any) -> nn.Module:
    kwargs = task.model_kwargs()
    if task.name == "seq-cls":  # models that classify from the last token find it by the pad id
        kwargs["pad_token_id"] = tokenizer.pad_token_id
    return load_model(cfg.model.name, task.auto_class, cfg.model.dtype, **kwargs)


def _check_output(run: ckpt.RunDir, cfg: RunConfig, resume: bool) -> tuple[Path | None, list[Path]]:
    """(checkpoint to resume from, parts of an old run to replace): a new run never silently mixes with an old one."""
    if resume:
        return ckpt.latest_checkpoint(run), []
    old = [p for p in (run.checkpoints, run.adapter, run.best, run.metrics, run.curves) if p.exists()]
    if old and not cfg.output.overwrite:
        raise ConfigError(f"output.dir: {run.root} already holds a run ({', '.join(p.name for p in old)}); "
                          "pass --resume to continue it, set output.overwrite=true to replace it, "
                          "or choose another output.dir")
    return None, old


def _clear(run: ckpt.RunDir, old: list[Path]) -> None:
    """Remove the replaced run's parts and a killed save's leftovers (only once every check passed)."""
    for p in old:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    ckpt.sweep_leftovers(run)
    run.root.mkdir(parents=True, exist_ok=True)


def _attach(model: nn.Module, cfg: RunConfig, resume_from: Path | None, state: dict[str, Any],
            calibration: list[dict]) -> dict[str, Any]:
    """Attach the run's adapter (fresh, or the checkpoint's); return its method config as a dict."""
    have = adapters(model)
    if len(have) > 1:
        raise ValueError(f"the model carries several adapters ({', '.join(have)}); train one at a time")
    if resume_from is None:
        if not have:
            adapt(model, cfg.method_config(), calibration=calibration)
        return ckpt.method_of(model)
    wanted = ckpt.method_of(model) if have else cfg.method_config().to_dict()
    if state["method"] != wanted:
        raise ConfigError(f"--resume: {resume_from} was trained with method {state['method']}, "
                          f"but this run asks for {wanted}")
    name = next(iter(have), "default")
    if have:
        delete_adapter(model, name)
    load_adapter(model, resume_from / ckpt.ADAPTER_DIR, name=name, is_trainable=True)
    return state["method"]


def _acts_between_steps(model: nn.Module) -> bool:
    """Whether an adapter's method has a training-time schedule (AdaLoRA, SpIEL, IST), asked of its
    class: building the schedule needs the run's step count and may change the model."""
    return any(type(r.config).schedule is not MethodConfig.schedule for r in adapters(model).values())


def train(
    model: nn.Module | None,
    config: ConfigLike,
    *,
    tokenizer: Any = None,
    overrides: Sequence[str] = (),
    resume: bool = False,
    callbacks: Sequence[Callback] = (),
) -> Result:
    """Fine-tune an adapter as ``config`` describes; return how the run ended.

    ``model``: ``None`` loads ``model.name`` from the config with the task's
    auto class; an ``nn.Module`` is trained as given (adapted with the config's
    method unless it already carries one adapter). It is called with the
    tokenizer's outputs (``input_ids``, ``attention_mask``, ...) as keyword
    arguments and must return logits.
    ``overrides``: ``"key=value"`` strings as with ``--set``. ``resume``:
    continue from the newest checkpoint in ``output.dir``. Under ``torchrun``
    every process calls this; rank 0 writes the run folder.
    """
    cfg = load(config, list(overrides), needs_model=model is None)
    dist = setup(cfg.training.device, cfg.training.distributed, cfg.training.precision)
    result = _train(model, cfg, tokenizer, resume, callbacks, dist)
    teardown(dist)  # only after a clean run: tearing down while a failed rank's peers sit in a collective hangs
    return result


def _train(model: nn.Module | None, cfg: RunConfig, tokenizer: Any, resume: bool,
           callbacks: Sequence[Callback], dist: Dist) -> Result:
    run = ckpt.RunDir(Path(cfg.output.dir).expanduser())
    resume_from, old = _check_output(run, cfg, resume)
    train_rows = load_split(cfg.data, "train")
    eval_rows = load_split(cfg.data, "eval")
    tokenizer = _tokenizer(cfg, model, tokenizer)
    task = _task(cfg, tokenizer, train_rows, [eval_rows] if eval_rows else [], cfg.data.train)
    train_data = task.examples(train_rows)
    eval_data = task.examples(eval_rows) if eval_rows else None
    _seed(cfg.training.seed)
    # FSDP2 moves each process's shards to its device itself: the whole base never sits on one GPU.
    home = torch.device("cpu") if dist.sharded else dist.device
    model = (model if model is not None else _base_model(cfg, task, tokenizer)).to(home)
    if cfg.task.packing:
        check_packing(model)
    size = cfg.training.batch_size
    calibration = [{k: v.to(home) for k, v in model_inputs(task.collate(
        [train_data[i] for i in range(s, min(s + size, len(train_data)))])).items()}
        for s in range(0, min(4 * size, len(train_data)), size)]
    state = ckpt.read_state(resume_from) if resume_from is not None else {}
    method = _attach(model, cfg, resume_from, state, calibration)
    info = {**task.info(), "base_model": cfg.model.name}
    if dist.sharded and _acts_between_steps(model):
        raise ConfigError(f"training.distributed: {method['method']} changes its adapter's shape or mask as it "
                          "trains, which leantune does not do on FSDP2 shards; use training.distributed: ddp")
    loop = Loop(model, task, train_data, eval_data, cfg.training, run, dist, callbacks, cfg.output.progress)
    if dist.main:
        _clear(run, old)
        run.config.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    if resume_from is not None:
        loop.restore(resume_from, state)
    trainable, total = trainable_parameters(model)
    _say(dist, f"leantune train: {method['method']} on {cfg.model.name or type(model).__name__} ({task.name}"
         + (f", {len(task.labels)} labels" if task.labels else "") + f"), {trainable:,} of {total:,} parameters "
         f"trainable ({100 * trainable / total:.2f}%), {len(train_data)} train / {len(eval_data or [])} eval "
         f"examples, {loop.total} steps on {dist.world} x {dist.device.type}"
         + (f" ({dist.mode})" if dist.world > 1 else "")
         + (f", resuming at step {loop.step}" if resume_from else ""))
    result = loop.run(info, method)
    if dist.main:
        _finish(cfg, run, result)
    return result


def _finish(cfg: RunConfig, run: ckpt.RunDir, result: Result) -> None:
    """Curves and a summary; a plotting failure never costs the trained run."""
    if cfg.output.plots:
        try:
            draw_curves(read_metrics(run.metrics), run.curves)
        except ImportError:
            warnings.warn("matplotlib is not installed: no curves.png (pip install matplotlib)", stacklevel=2)
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.metrics.items())
    where = run.checkpoints / f"{ckpt.PREFIX}{result.step:06d}"
    if result.stopped:
        print(f"leantune train: stopped at step {result.step}/{result.total_steps}; checkpoint {where}; "
              "continue with --resume", file=sys.stderr, flush=True)
        return
    best = f"; best {result.best_metric} {result.best_value:.4f} at step {result.best_step} " \
           f"in {run.best}" if result.best_step is not None else ""
    print(f"leantune train: done, {result.step} steps" + (f"; eval: {metrics}" if metrics else "")
          + f"{best}\n  adapter: {run.adapter}\n  metrics: {run.metrics}"
          + (f"\n  curves:  {run.curves}" if run.curves.exists() else ""), file=sys.stderr, flush=True)


def evaluate(config: ConfigLike, adapter: str | Path, *, model: nn.Module | None = None, tokenizer: Any = None,
             overrides: Sequence[str] = ()) -> dict[str, float]:
    """The task's metrics of ``adapter`` on the config's evaluation data.

    The label order comes from the adapter folder (as trained), so the numbers
    match those the training run reported.
    """
    cfg = load(config, list(overrides), needs_model=model is None)
    adapter = Path(adapter)
    info_path = adapter / ckpt.TASK_FILE
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if info.get("task", cfg.task.type) != cfg.task.type:
        raise ConfigError(f"task.type: the adapter in {adapter} was trained for {info['task']}, not {cfg.task.type}")
    eval_rows = load_split(cfg.data, "eval")
    if eval_rows is None:
        raise ConfigError("data.eval: required to evaluate (a data file or hf:NAME)")
    tokenizer = _tokenizer(cfg, model, tokenizer)
    if info.get("labels"):
        cfg = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, labels=info["labels"]))
        task = _task(cfg, tokenizer, eval_rows, [], cfg.data.eval or "")
    else:
        task = _task(cfg, tokenizer, load_split(cfg.data, "train"), [eval_rows], cfg.data.train)
    _seed(cfg.training.seed)
    model = model if model is not None else _base_model(cfg, task, tokenizer)
    load_adapter(model, adapter)
    device = local_device(cfg.training.device)
    return evaluate_model(model.to(device), task, task.examples(eval_rows), cfg.training, device)
