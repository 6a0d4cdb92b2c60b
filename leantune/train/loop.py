"""The training loop: accumulation, autocast, schedules, evaluation, checkpoints, Ctrl-C.

Batches are a pure function of (seed, epoch, position): each epoch's order is a
permutation drawn from a generator seeded with ``seed + epoch``, so a resumed
run sees exactly the batches an uninterrupted one would, and together with the
restored optimizer, scheduler and RNG states reaches the same weights.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..api import param_groups, schedules
from ..engine.compiling import compile as compile_function
from ..engine.lean import configure
from ..engine.mezo import MeZO
from .checkpoint import RunDir, read_trainer_state, rng_state, save_checkpoint, set_rng_state, write_adapter
from .config import COMPILE_MODES, TrainingSection, higher_is_better
from .distributed import Dist
from .logs import MetricsLog, memory_mb
from .tasks import Example, Task

AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class StepInfo:
    """What callbacks see after each optimizer step; gradients are still in place.
    Set ``stop`` to end the run after this step (a checkpoint is saved)."""

    step: int
    total_steps: int
    loss: float
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    stop: bool = False


class Callback:
    """Hooks into the loop (e.g. an adaptive method reallocating rank); override what you need."""

    def on_step_end(self, info: StepInfo) -> None:
        """After the optimizer and scheduler stepped, before gradients are cleared."""

    def on_evaluate(self, step: int, metrics: dict[str, float]) -> None:
        """After each evaluation (rank 0 only)."""


@dataclass
class Result:
    """How a run ended."""

    step: int
    total_steps: int
    stopped: bool
    metrics: dict[str, float] = field(default_factory=dict)
    best_metric: str = ""
    best_step: int | None = None
    best_value: float | None = None
    output: Path | None = None


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, total: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps, then linear decay to 0, half a cosine to 0, or constant."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Order:
    """Which examples make micro-batch ``m``: epoch ``m // per_epoch`` shuffled with ``seed + epoch``,
    split across ranks as rank ``r`` taking every ``world``-th index (padded by wrapping)."""

    def __init__(self, n: int, batch_size: int, seed: int, rank: int, world: int) -> None:
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.per_rank = math.ceil(n / world)
        self.per_epoch = math.ceil(self.per_rank / batch_size)
        self._epoch, self._order = -1, []

    def batch(self, m: int) -> list[int]:
        epoch, b = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()
            perm += perm[: self.per_rank * self.world - self.n]
            self._epoch, self._order = epoch, perm[self.rank::self.world]
        return self._order[b * self.batch_size:(b + 1) * self.batch_size]


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision for ``bf16``/``fp16``; nothing for ``fp32``."""
    dtype = AUTOCAST.get(precision)
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def evaluate_model(model: nn.Module, task: Task, data: Sequence[Example], cfg: TrainingSection,
                   device: torch.device) -> dict[str, float]:
    """The task's metrics of ``model`` (in eval mode) on ``data``."""
    size = cfg.eval_batch_size or 2 * cfg.batch_size
    batches = ({k: v.to(device) for k, v in task.collate([data[i] for i in range(s, min(s + size, len(data)))]).items()}
               for s in range(0, len(data), size))
    model.eval()
    with autocast(cfg.precision, device):
        return task.evaluate(model, batches)


@contextlib.contextmanager
def stop_on_sigint() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C asks the loop to save and stop after the current step; a second one aborts.

    Under ``torchrun`` the terminal's Ctrl-C reaches every worker and torchrun forwards its own copy
    as well, so a worker ignores the first repeat: a count, not a time window, since a worker busy in a
    collective or a loaded machine can run the copy's handler seconds late. The copy may land after the
    loop, during the final save, so there the handler stays until it has come (the worker process ends
    with the run).
    """
    seen: list[bool] = []
    echoes = [1 if "TORCHELASTIC_RUN_ID" in os.environ else 0]

    def handler(signum: int, frame: Any) -> None:
        if seen and echoes[0]:
            echoes[0] -= 1
            return
        if seen:
            raise KeyboardInterrupt
        seen.append(True)
        print("\nleantune: Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again aborts)",
              file=sys.stderr, flush=True)

    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(seen)
    finally:
        if not (seen and echoes[0]):
            signal.signal(signal.SIGINT, previous)


class Loop:
    """One run's training state and the steps that move it; ``run()`` drives it to the end."""

    def __init__(self, model: nn.Module, task: Task, train: Sequence[Example], evals: Sequence[Example] | None,
                 cfg: TrainingSection, run: RunDir, dist: Dist, callbacks: Sequence[Callback] = (),
                 progress: bool = True) -> None:
        if cfg.lean:  # before wrapping, so that DDP runs the checkpointed layers
            configure(model, lean=True, keep_attention=cfg.lean_keep_attention, layers=cfg.lean_layers)
        self.model, self.wrapped, self.task = model, dist.wrap(model), task
        self.train_data, self.eval_data, self.cfg, self.run_dir, self.dist = train, evals, cfg, run, dist
        self.callbacks, self.progress = list(callbacks), progress
        self.order = Order(len(train), cfg.batch_size, cfg.seed, dist.rank, dist.world)
        self.total = cfg.max_steps or math.ceil(cfg.epochs * self.order.per_epoch / cfg.grad_accum)
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters; attach an adapter first (lt.adapt)")
        self.params = params
        self.zeroth_order = cfg.optimizer == "mezo"  # forward passes only (engine/mezo.py)
        if self.zeroth_order:
            self.optimizer = MeZO(param_groups(model, cfg.learning_rate), lr=cfg.learning_rate, eps=cfg.mezo_eps,
                                  weight_decay=cfg.weight_decay, n_samples=cfg.mezo_samples, seed=cfg.seed)
        else:
            self.optimizer = torch.optim.AdamW(param_groups(model, cfg.learning_rate), weight_decay=cfg.weight_decay)
        warmup = cfg.warmup_steps or int(cfg.warmup_ratio * self.total)
        self.scheduler = lr_schedule(self.optimizer, cfg.schedule, self.total, warmup)
        self.schedules = schedules(model, self.total)  # AdaLoRA's rank budget, SpIEL's drop-and-grow, ...
        if dist.world > 1 and not all(s.distributed_ok for s in self.schedules):
            raise ValueError("this method changes which parameters train at each step (ist), which DDP cannot "
                             "follow; train it in one process")
        if self.zeroth_order and (self.schedules or dist.world > 1):
            raise ValueError("training.optimizer: mezo runs in one process and for methods without a training "
                             "schedule (those read gradients, which MeZO never makes); use adamw")
        # The training loss through torch.compile (lt.compile: keeps less for backward); evaluation stays eager.
        self.train_loss = self._compiled(task.loss) if cfg.compile else task.loss
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.precision == "fp16")
        self.log = MetricsLog(run.metrics, dist.main)
        self.metric = cfg.best_metric or task.main_metric
        self.step, self.best_step, self.best_value = 0, None, None
        self.last_metrics: dict[str, float] = {}
        self.saved_at = -1

    def _compiled(self, loss: Callable) -> Callable:
        """``loss`` through ``lt.compile``; with ``compile: cuda_graphs``, in the mode that replays it
        from CUDA graphs. Their replays cannot hold collectives, so that mode runs in one process."""
        mode = COMPILE_MODES.get(self.cfg.compile) if isinstance(self.cfg.compile, str) else None
        if mode is not None and self.dist.world > 1:
            raise ValueError(f"training.compile: {self.cfg.compile} runs in one process (a CUDA graph's replay "
                             "cannot hold DDP's gradient all-reduce); use compile: true under torchrun")
        return compile_function(loss, mode=mode)  # mode None: torch.compile's default

    # --- state ------------------------------------------------------------------------------
    def restore(self, checkpoint: Path, state: dict[str, Any]) -> None:
        """Continue from ``checkpoint`` (its adapter is already in the model)."""
        trainer = read_trainer_state(checkpoint)
        self.dist.load_optimizer_state(self.model, self.optimizer, trainer["optimizer"])
        for schedule, kept in zip(self.schedules, trainer.get("schedules", []), strict=False):
            schedule.load_state_dict(kept)
        self.scheduler.load_state_dict(trainer["scheduler"])
        self.scaler.load_state_dict(trainer["scaler"])
        rngs = trainer["rng"]
        set_rng_state(rngs[self.dist.rank] if len(rngs) == self.dist.world else rngs[0])
        self.step, self.best_step, self.best_value = state["step"], state["best_step"], state["best_value"]
        self.saved_at = self.step
        self.log.truncate_after(self.step)

    def save(self, info: dict[str, Any], method: dict[str, Any]) -> None:
        """A checkpoint at the current step (every rank takes part; rank 0 writes)."""
        rngs = self.dist.gather(rng_state())
        optimizer = self.dist.optimizer_state(self.model, self.optimizer)  # FSDP2: every rank gathers its shards
        with self.dist.full_adapter(self.model):
            if self.dist.main:
                trainer = {"optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                           "scaler": self.scaler.state_dict(), "rng": rngs,
                           "schedules": [s.state_dict() for s in self.schedules]}
                state = {"best_step": self.best_step, "best_value": self.best_value, "world": self.dist.world,
                         "total_steps": self.total, "method": method}
                save_checkpoint(self.run_dir, self.step, self.model, trainer, state, info, self.cfg.keep_checkpoints)
        self.saved_at = self.step
        self.dist.barrier()

    # --- the steps --------------------------------------------------------------------------
    def _batch(self, indices: list[int]) -> tuple[dict[str, torch.Tensor], int]:
        """The collated batch on the device, and its token count taken before it moves: counted
        on the device, it would make the host wait for the GPU to finish the step's backward
        before it could queue anything of the next step."""
        batch = self.task.collate([self.train_data[i] for i in indices])
        tokens = int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        return {k: v.to(self.dist.device) for k, v in batch.items()}, tokens

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.dist.autocast_precision, self.dist.device)  # FSDP2 casts by its own policy

    def train_step(self) -> tuple[float, int, int]:
        """One optimizer step over ``grad_accum`` micro-batches; (loss, samples, tokens) seen by this rank."""
        if self.zeroth_order:
            return self._mezo_step()
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, samples, tokens = 0.0, 0, 0
        accum = self.cfg.grad_accum
        for j in range(accum):
            batch, batch_tokens = self._batch(self.order.batch(self.step * accum + j))
            # DDP syncs gradients on the last micro-batch only; FSDP2 reduce-scatters each into fp32 shards.
            quiet = j < accum - 1 and self.dist.mode == "ddp"
            with self.wrapped.no_sync() if quiet else contextlib.nullcontext():
                with self._autocast():
                    task_loss = self.train_loss(self.wrapped, batch)
                    loss = (task_loss + sum(s.loss_term(task_loss) for s in self.schedules)) / accum
                self.scaler.scale(loss).backward()
            total_loss += task_loss.item() / accum
            samples += batch["input_ids"].shape[0]
            tokens += batch_tokens
        self.scaler.unscale_(self.optimizer)
        if self.cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        for s in self.schedules:
            s.after_step(self.step, self.optimizer, lambda: self._loss_of(batch))
        return total_loss, samples, tokens

    def _mezo_step(self) -> tuple[float, int, int]:
        """One MeZO step: the mean loss of the step's micro-batches, at θ + εz and θ - εz, forward only."""
        accum = self.cfg.grad_accum
        batches, counts = zip(*(self._batch(self.order.batch(self.step * accum + j)) for j in range(accum)), strict=True)

        def closure() -> torch.Tensor:
            with self._autocast():
                return sum(self.task.loss(self.wrapped, b).float() for b in batches) / accum

        loss = float(self.optimizer.step(closure))
        self.scheduler.step()
        self.step += 1
        samples = sum(b["input_ids"].shape[0] for b in batches)
        return loss, samples, sum(counts)

    @torch.no_grad()
    def _loss_of(self, batch: dict[str, torch.Tensor]) -> float:
        """The loss of ``batch`` under the current weights (what schedules probe with)."""
        with self._autocast():
            return float(self.task.loss(self.wrapped, batch))

    def evaluate(self) -> dict[str, float]:
        """The task's metrics on the evaluation data, rank 0's on every rank (under DDP the others
        wait; under FSDP2 every rank runs the forward passes, which need all shards)."""
        metrics: dict[str, float] = {}
        if self.eval_data and (self.dist.main or self.dist.sharded):
            metrics = evaluate_model(self.model, self.task, self.eval_data, self.cfg, self.dist.device)
            self.model.train()
        return self.dist.broadcast(metrics)

    def _write_adapter(self, dest: Path, info: dict[str, Any]) -> None:
        """Every rank calls it (FSDP2 gathers the adapter's shards); rank 0 writes."""
        with self.dist.full_adapter(self.model):
            if self.dist.main:
                write_adapter(dest, self.model, info)

    def _after_eval(self, metrics: dict[str, float], info: dict[str, Any]) -> None:
        """Every rank calls it; rank 0 logs and tells the callbacks."""
        self.last_metrics = metrics
        self.log.write({"split": "eval", "step": self.step, **metrics})
        for cb in self.callbacks if self.dist.main else ():
            cb.on_evaluate(self.step, metrics)
        value = metrics[self.metric]
        better = self.best_value is None or (
            value > self.best_value if higher_is_better(self.metric) else value < self.best_value)
        if better:
            self.best_step, self.best_value = self.step, value
            self._write_adapter(self.run_dir.best, {**info, "step": self.step, "metrics": metrics})

    # --- the run ----------------------------------------------------------------------------
    def run(self, info: dict[str, Any], method: dict[str, Any]) -> Result:
        """Train until the step budget is spent or someone stops the run; save, evaluate, report."""
        cfg, d = self.cfg, self.dist
        self.model.train()
        bar = tqdm(total=self.total, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.progress and d.main), file=sys.stderr)
        window: list[float] = []
        first = self.step
        busy, samples, tokens = 0.0, 0, 0  # throughput counts training time only, not evaluation or saving
        stopped = False
        with stop_on_sigint() as interrupted:
            while self.step < self.total:
                start = time.perf_counter()
                loss, n, t = self.train_step()
                busy += time.perf_counter() - start
                window.append(loss)
                samples, tokens = samples + n * d.world, tokens + t * d.world
                step_info = StepInfo(self.step, self.total, loss, self.model, self.optimizer, self.scheduler)
                for cb in self.callbacks:
                    cb.on_step_end(step_info)
                speed = {"loss": sum(window) / len(window), "lr": self.scheduler.get_last_lr()[0],
                         "samples_per_s": samples / busy, "tokens_per_s": tokens / busy,
                         "mem_mb": memory_mb(d.device)}
                bar.update(1)
                bar.set_postfix(loss=f"{speed['loss']:.4f}", samples_s=f"{speed['samples_per_s']:.1f}",
                                mem=f"{speed['mem_mb']:.0f}MB", refresh=False)
                if self.step % cfg.log_every == 0 or self.step == self.total:
                    speed["loss"] = d.mean(speed["loss"])
                    epoch = self.step * cfg.grad_accum / self.order.per_epoch
                    self.log.write({"split": "train", "step": self.step, "epoch": round(epoch, 4), **speed})
                    window, busy, samples, tokens = [], 0.0, 0, 0
                if self.eval_data and cfg.eval_every and self.step % cfg.eval_every == 0:
                    self._after_eval(self.evaluate(), info)
                if d.any(interrupted() or step_info.stop):
                    stopped = True
                    break
                if cfg.save_every and self.step % cfg.save_every == 0:
                    self.save(info, method)
        bar.close()
        evaluated = cfg.eval_every and self.step % cfg.eval_every == 0
        if not stopped and self.eval_data and self.step > first and not evaluated:
            self._after_eval(self.evaluate(), info)
        if self.saved_at != self.step:
            self.save(info, method)
        if not stopped:
            for s in self.schedules:
                s.finish()
        if not stopped:
            self._write_adapter(self.run_dir.adapter, {**info, "step": self.step, "metrics": self.last_metrics})
        return Result(self.step, self.total, stopped, self.last_metrics, self.metric, self.best_step,
                      self.best_value, self.run_dir.root)
