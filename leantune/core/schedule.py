"""Method schedules: what a method does between optimizer steps.

Some methods change their adapter while training: AdaLoRA and IncreLoRA move
rank between layers, SpIEL moves its sparse support, IST picks which layers the
next step updates. Each such method returns a :class:`Schedule` from
``MethodConfig.schedule``; every training loop drives all of them the same way,
so ``leantune train`` and the quality benchmark run these methods as their
papers describe without per-method code::

    schedules = lt.schedules(model, total_steps=1000)
    for step, batch in enumerate(data, 1):
        loss = model(**batch).loss + sum(s.loss_term(loss) for s in schedules)
        loss.backward(); optimizer.step()
        for s in schedules:   # reads the gradients: before zero_grad()
            s.after_step(step, optimizer, lambda: float(model(**batch).loss))
        optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class Schedule:
    """A method's training-time behaviour; override what the method needs."""

    # False where the schedule changes which parameters get gradients: DDP needs a fixed set.
    distributed_ok: bool = True

    def loss_term(self, loss: torch.Tensor) -> torch.Tensor | float:
        """Added to each micro-batch's loss before backward (a regulariser); 0 by default."""
        return 0.0

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, loss_of: Callable[[], float]) -> None:
        """Called after optimizer step ``step`` (counting from 1), gradients still in place;
        ``loss_of()`` is the loss of the step's last batch under the current weights, without autograd."""

    def finish(self) -> None:
        """Leave the adapter in its plain state after training (e.g. every delta trainable)."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must keep so a resumed run continues identically."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
