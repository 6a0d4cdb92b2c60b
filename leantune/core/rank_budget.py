"""Rank budgets: move a total rank between layers while training, by importance.

AdaLoRA prunes singular values towards a smaller total rank, IncreLoRA adds rank
where it matters; both need the same three parts, written here once:

* the form, :class:`SVDLowRank`: ``ΔW = scale · B diag(E ⊙ active) A``, whose r
  components (a row of ``A``, a value of ``E``, a column of ``B``) can be switched
  off (``E = 0``) or on (``active``) individually;
* the importance of each component: sensitivity ``|p · ∂L/∂p|`` smoothed by an
  EMA, times its uncertainty (EMA of the deviation), summed over the component's
  entries as in AdaLoRA;
* the schedule: the total budget moves from its start to its target on a cubic
  curve between ``tinit`` and ``total_step − tfinal``.

A method supplies the policy (prune to the budget, or grow to it). A training
loop drives everything through one :class:`~leantune.core.schedule.Schedule`
(``leantune train`` and the quality benchmark do this by themselves)::

    budget = lt.rank_budget(model, total_step=1000)
    for step, batch in enumerate(data):
        loss = model(**batch).loss + budget.penalty()
        loss.backward(); optimizer.step()
        budget.step(step)            # after optimizer.step(), before zero_grad(): it reads the gradients
        optimizer.zero_grad()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .factored import Factored
from .schedule import Schedule
from .weights import WeightView

# Which axis of each tensor of an SVDLowRank indexes its r components.
COMPONENT_AXES = {"A": 0, "E": 0, "B": 1}


class SVDLowRank(Factored):
    """``h + scale · B diag(E ⊙ active) A x`` (AdaLoRA's ``P Λ Q``); A and B ~ N(0, 0.02²), E = 0.

    ``active`` marks the components in use: all of them for pruning methods (a
    pruned component has ``E = 0`` and may come back), a prefix for growing ones
    (an inactive component contributes nothing and gets no gradient).
    """

    def __init__(self, view: WeightView, r: int, scale: float, dropout: float = 0.0, active: int | None = None):
        super().__init__(view, scale, dropout)
        self.A = nn.Parameter(torch.randn(r, view.in_features) * 0.02)
        self.E = nn.Parameter(torch.zeros(r, 1))
        self.B = nn.Parameter(torch.randn(view.out_features, r) * 0.02)
        mask = torch.zeros(r)
        mask[: r if active is None else active] = 1.0
        self.register_buffer("active", mask, persistent=active is not None)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A * (self.E * self.active[:, None].to(self.E.dtype)), self.B

    def orthogonality(self) -> torch.Tensor:
        """``‖A Aᵀ − I‖_F + ‖Bᵀ B − I‖_F`` over the active components (AdaLoRA's regulariser)."""
        on = self.active.bool()
        a, b = self.A[on], self.B[:, on]
        eye = torch.eye(a.shape[0], device=a.device, dtype=a.dtype)
        return torch.linalg.norm(a @ a.T - eye) + torch.linalg.norm(b.T @ b - eye)

    def rank(self) -> int:
        """Components that currently contribute (active with a non-zero singular value)."""
        return int(((self.E.detach().view(-1) != 0) & self.active.bool()).sum())


def cubic_budget(step: int, start: int, target: int, tinit: int, tfinal: int, total_step: int) -> int:
    """AdaLoRA's schedule: ``start`` until ``tinit``, ``target`` after ``total_step − tfinal``, cubic between."""
    if step <= tinit:
        return start
    if step > total_step - tfinal:
        return target
    remaining = 1 - (step - tinit) / (total_step - tfinal - tinit)
    return int((start - target) * remaining**3 + target)


class Importance:
    """Per-component importance: EMA sensitivity × EMA uncertainty (AdaLoRA, eq. 8–10)."""

    def __init__(self, beta1: float, beta2: float) -> None:
        self.beta1, self.beta2 = beta1, beta2
        self.sensitivity: dict[int, torch.Tensor] = {}
        self.uncertainty: dict[int, torch.Tensor] = {}

    @torch.no_grad()
    def update(self, deltas: list[SVDLowRank]) -> None:
        for d in deltas:
            for name in COMPONENT_AXES:
                p = getattr(d, name)
                if p.grad is None:
                    continue
                ipt = (p * p.grad).abs().float()
                avg = self.sensitivity.get(id(p), torch.zeros_like(ipt))
                unc = self.uncertainty.get(id(p), torch.zeros_like(ipt))
                avg = self.beta1 * avg + (1 - self.beta1) * ipt
                self.uncertainty[id(p)] = self.beta2 * unc + (1 - self.beta2) * (ipt - avg).abs()
                self.sensitivity[id(p)] = avg

    def scores(self, delta: SVDLowRank) -> torch.Tensor:
        """One score per component: the singular value's score plus the mean scores of its vectors."""
        total = torch.zeros(delta.E.shape[0], device=delta.E.device)
        for name, axis in COMPONENT_AXES.items():
            p = getattr(delta, name)
            if id(p) in self.sensitivity:
                element = self.sensitivity[id(p)] * self.uncertainty[id(p)]
                total += element.movedim(axis, 0).flatten(1).mean(1)
        return total

    def reset(self) -> None:
        self.sensitivity.clear()
        self.uncertainty.clear()


class PruneToBudget:
    """AdaLoRA's policy: zero the singular values of the least important components."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] | None = None

    @torch.no_grad()
    def allocate(self, deltas: list[SVDLowRank], scores: list[torch.Tensor], budget: int) -> None:
        capacity = sum(int(d.active.sum()) for d in deltas)
        everything = torch.cat([s.cpu() for s in scores])
        if budget >= capacity or everything.numel() == 0:
            self.kept = [torch.ones_like(s, dtype=torch.bool) for s in scores]
            return
        threshold = torch.kthvalue(everything, capacity - budget).values.item() if budget > 0 else float("inf")
        self.kept = [s > threshold for s in scores]
        self.hold(deltas)

    @torch.no_grad()
    def hold(self, deltas: list[SVDLowRank]) -> None:
        for d, keep in zip(deltas, self.kept or [], strict=True):
            d.E.masked_fill_(~keep.to(d.E.device).view(-1, 1), 0.0)


class GrowToBudget:
    """IncreLoRA's policy: give one more component at a time to the modules that score highest."""

    @torch.no_grad()
    def allocate(self, deltas: list[SVDLowRank], scores: list[torch.Tensor], budget: int) -> None:
        used = [int(d.active.sum()) for d in deltas]
        spare = budget - sum(used)
        merit = [float(s[d.active.bool()].mean()) if n else 0.0 for d, s, n in zip(deltas, scores, used, strict=True)]
        order = sorted(range(len(deltas)), key=lambda i: merit[i], reverse=True)
        while spare > 0:
            grown = False
            for i in order:
                if spare == 0:
                    break
                if used[i] < deltas[i].active.numel():
                    deltas[i].active[used[i]] = 1.0
                    used[i] += 1
                    spare -= 1
                    grown = True
            if not grown:
                break

    def hold(self, deltas: list[SVDLowRank]) -> None:
        """Grown components stay; nothing to re-apply."""


@dataclass
class BudgetPlan:
    """What a rank-adaptive method asks of :class:`RankBudget` (from its config)."""

    target: int  # average rank per module at the end
    tinit: int
    tfinal: int
    delta_t: int
    beta1: float
    beta2: float
    orth_reg_weight: float
    total_step: int
    policy: PruneToBudget | GrowToBudget


class RankBudget(Schedule):
    """The training-loop schedule; build it with :func:`rank_budget`."""

    def __init__(self, deltas: list[SVDLowRank], plan: BudgetPlan) -> None:
        if not deltas:
            raise ValueError("no rank-adaptive deltas found: attach an adalora or increlora adapter first")
        if plan.tinit >= plan.total_step - plan.tfinal:
            raise ValueError(
                f"tinit={plan.tinit} and tfinal={plan.tfinal} leave no budgeting phase in total_step="
                f"{plan.total_step}; lower tinit/tfinal or raise total_step"
            )
        self.deltas = deltas
        self.plan = plan
        self.importance = Importance(plan.beta1, plan.beta2)
        self.start = sum(int(d.active.sum()) for d in deltas)
        self.target = plan.target * len(deltas)

    def budget(self, step: int) -> int:
        p = self.plan
        return cubic_budget(step, self.start, self.target, p.tinit, p.tfinal, p.total_step)

    def step(self, step: int) -> None:
        """Update importance and re-allocate rank; call after ``optimizer.step()``, before ``zero_grad()``."""
        p = self.plan
        final = p.total_step - p.tfinal
        if step < final:
            self.importance.update(self.deltas)
            if step > p.tinit and step % p.delta_t == 0:
                self._allocate(step)
        elif step == final:
            self._allocate(step)
            self.importance.reset()
        else:
            p.policy.hold(self.deltas)

    def _allocate(self, step: int) -> None:
        scores = [self.importance.scores(d) for d in self.deltas]
        self.plan.policy.allocate(self.deltas, scores, self.budget(step))

    def penalty(self) -> torch.Tensor:
        """``orth_reg_weight`` × mean orthogonality error of the P and Q factors; add it to the loss."""
        terms = [d.orthogonality() for d in self.deltas]
        return self.plan.orth_reg_weight * torch.stack(terms).sum() / (2 * len(terms))

    def loss_term(self, loss: torch.Tensor) -> torch.Tensor | float:
        return self.penalty() if self.plan.orth_reg_weight else 0.0

    def after_step(self, step: int, optimizer: torch.optim.Optimizer, loss_of: Callable[[], float]) -> None:
        self.step(step)

    def state_dict(self) -> dict[str, Any]:
        params = [getattr(d, n) for d in self.deltas for n in COMPONENT_AXES]
        imp = self.importance
        kept = getattr(self.plan.policy, "kept", None)
        return {"sensitivity": [imp.sensitivity.get(id(p)) for p in params],
                "uncertainty": [imp.uncertainty.get(id(p)) for p in params],
                "kept": kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = [getattr(d, n) for d in self.deltas for n in COMPONENT_AXES]
        imp = self.importance
        imp.reset()
        for p, sens, unc in zip(params, state["sensitivity"], state["uncertainty"], strict=True):
            if sens is not None:
                imp.sensitivity[id(p)], imp.uncertainty[id(p)] = sens.to(p.device), unc.to(p.device)
        if state.get("kept") is not None:
            self.plan.policy.kept = state["kept"]

    def ranks(self) -> list[int]:
        """The rank each module uses now, in module order."""
        return [d.rank() for d in self.deltas]


def rank_budget(model: nn.Module, name: str = "default", total_step: int | None = None) -> RankBudget:
    """The rank-budget callback for adapter ``name`` (an ``adalora`` or ``increlora`` adapter).

    ``total_step`` (the number of training steps) overrides the config's.
    """
    from ..api import adapter_paths, adapters  # the api builds on core; import at call time

    have = adapters(model)
    if name not in have:
        raise KeyError(f"no adapter named {name!r}; this model has {sorted(have) or 'none'}")
    config = have[name].config
    plan_for = next((c.budget_plan for c in config.components() if hasattr(c, "budget_plan")), None)
    if plan_for is None:
        raise TypeError(f"adapter {name!r} uses {config.name}, which has no rank budget; use adalora or increlora")
    deltas = [d for _, _, d in adapter_paths(model, name) if isinstance(d, SVDLowRank)]
    return RankBudget(deltas, plan_for(total_step))
