"""What every registered method must do, written once.

``method_config(name, kind)`` builds a method's default config for a tiny
model; the harness test file parametrises over ``lt.methods()`` so that a new
method is checked by registering it, with no new test code.
"""

from __future__ import annotations

import torch
from torch import nn

import leantune as lt

from .models import TASKS, batch


def method_config(name: str, kind: str) -> lt.config.MethodConfig:
    """The method's default config, with the task of the tiny model."""
    return lt.get_method(name)(task=TASKS[kind])


def calibration(kind: str, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """A few model-input dicts for methods whose init reads data."""
    return [{k: v.to(device) for k, v in batch(kind, seed=s).items() if k != "labels"} for s in (10, 11)]


def train_steps(model: nn.Module, kind: str, steps: int = 4, lr: float = 1e-2, device: str = "cpu") -> list[float]:
    """A few AdamW steps on fixed batches, with the methods' schedules; returns the losses."""
    params = [p for p in model.parameters() if p.requires_grad]
    assert params, "the adapted model has no trainable parameters"
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedules = lt.schedules(model, steps)
    model.train()
    losses = []
    for step in range(steps):
        inputs = {k: v.to(device) for k, v in batch(kind, seed=100 + step % 2).items()}
        out = model(**inputs)
        (out.loss + sum(s.loss_term(out.loss) for s in schedules)).backward()
        opt.step()
        for s in schedules:
            s.after_step(step + 1, opt, lambda inputs=inputs: float(model(**inputs).loss))
        opt.zero_grad()
        losses.append(out.loss.item())
    for s in schedules:
        s.finish()
    model.eval()
    return losses


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer, cloned."""
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
