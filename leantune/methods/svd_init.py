"""Low-rank methods initialised from a decomposition of the base weight: PiSSA, CorDA, SVFit.

PiSSA and CorDA start ``(A, B)`` on principal components and train them against
the residual. leantune leaves the base weight untouched and subtracts a frozen
copy of the start instead (:class:`~leantune.core.factored.Residual`): the same
model, but ``disabled``, other adapters and deletion keep seeing the original
base, and ``lt.export_lora`` writes it as the rank-2r plain LoRA HF PEFT exports.
Saved adapters carry their start (``A0``, ``B0``), so loading needs neither the
decomposition again nor CorDA's calibration data (the saved config has ``restore=True``).

Length: three methods (about 70 lines a method; CorDA's two calibration modes the longest).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core.factored import Factored, Residual, to_lowrank_layout, weight_matrix
from ..core.site import all_disabled, base_module
from ..core.weights import LINEAR_TYPES, WeightView, weight_view
from ..registry import register


def _check_rank(method: str, path: str, r: int, view: WeightView) -> None:
    if r > min(view.out_features, view.in_features):
        raise ValueError(
            f"{method}: r={r} exceeds min(out, in) = {min(view.out_features, view.in_features)} of {path}; "
            "lower r or exclude this module"
        )


def principal_factors(w: torch.Tensor, r: int, scale: float, niter: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = √(S/scale) Vhᵣ``, ``B = Uᵣ √(S/scale)`` from the top-r SVD of ``w`` (so ``scale·B A = Uᵣ Sᵣ Vhᵣ``).

    ``niter > 0`` uses a randomized SVD with that many subspace iterations (faster, approximate).
    """
    if niter:
        u, s, v = torch.svd_lowrank(w, q=r, niter=niter)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
    s = s[:r] / scale
    return vh[:r] * s.sqrt()[:, None], u[:, :r] * s.sqrt()


class _Restorable:
    """Saved configs say ``restore=True``: loading then skips the decomposition and fills the saved start."""

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "restore": True}  # type: ignore[misc]


@register
@dataclass
class PiSSA(_Restorable, MethodConfig):
    """PiSSA (Meng et al., 2024): ``(A, B)`` start on the top-r singular components of W and train
    against the residual; scale ``alpha / r``. ``niter > 0``: randomized SVD (PEFT's ``pissa_niter_k``).
    ``restore`` is set in saved configs (factors come from the file); leave it False."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    niter: int = 0
    restore: bool = False

    name: ClassVar[str] = "pissa"
    fused_linear: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True

    def make_delta(self, path: str, module: nn.Module) -> Residual:
        view = weight_view(module)
        _check_rank(self.name, path, self.r, view)
        scale = self.alpha / self.r
        w = weight_matrix(view, module)
        if self.restore:
            a, b = w.new_zeros(self.r, w.shape[1]), w.new_zeros(w.shape[0], self.r)
        else:
            a, b = principal_factors(w, self.r, scale, self.niter)
        return Residual(view, a, b, scale, self.dropout)


def input_covariances(model: nn.Module, paths: list[str], calibration: Iterable[Mapping]) -> dict[str, torch.Tensor]:
    """Mean over calibration batches of ``XᵀX / max(X)²`` of each module's input (HF PEFT's CorDA
    statistic), with every adapter disabled so it describes the base model."""
    sums: dict[str, torch.Tensor] = {}
    counts = dict.fromkeys(paths, 0)

    def hook(path: str):
        def record(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            x = x / x.max().abs()
            sums[path] = sums[path] + x.T @ x if path in sums else x.T @ x
            counts[path] += 1
        return record

    device = next(model.parameters()).device
    handles = [base_module(model, p).register_forward_hook(hook(p)) for p in paths]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), all_disabled(model):
            for batch in calibration:
                if not isinstance(batch, Mapping):
                    raise TypeError(f"calibration must yield model-input dicts, got {type(batch).__name__}")
                model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    unseen = [p for p in paths if not counts[p]]
    if unseen:
        raise ValueError(f"the calibration batches never reached {unseen[:5]}; pass at least one batch the model runs")
    return {p: sums[p] / counts[p] for p in paths}


def corda_factors(w: torch.Tensor, cov: torch.Tensor, r: int, scale: float, mode: str):
    """SVD of ``W C`` (C damped until invertible): ``W = U S (Vh C⁻¹)``; ``ipa`` keeps the largest r
    components, ``kpa`` the smallest. Factors split ``S / scale`` as PiSSA does."""
    damp = 0.01
    eye = torch.eye(cov.shape[0], device=cov.device)
    while True:
        fixed = cov + eye * (torch.mean(torch.diag(cov)) * damp)
        inverse = torch.linalg.inv(fixed)
        if torch.dist(fixed @ inverse, eye).item() < 0.05:
            break
        damp *= 2
    u, s, vh = torch.linalg.svd(w @ fixed, full_matrices=False)
    v = (vh @ inverse).T
    keep = slice(0, r) if mode == "ipa" else slice(s.shape[0] - r, None)
    s = s[keep] / scale
    return v[:, keep].T * s.sqrt().view(-1, 1), u[:, keep] * s.sqrt()


@register
@dataclass
class CorDA(_Restorable, MethodConfig):
    """CorDA (Yang et al., 2024): decompose ``W C`` with C the input covariance from calibration
    batches (``lt.adapt(model, lt.CorDA(), calibration=batches)``); ``mode="ipa"`` trains the largest
    r components (instruction-previewed), ``"kpa"`` the smallest (knowledge-preserved). Scale
    ``alpha / r``. ``restore`` is set in saved configs; leave it False."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    mode: str = "ipa"
    restore: bool = False

    name: ClassVar[str] = "corda"
    fused_linear: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in ("ipa", "kpa"):
            raise ValueError(f"corda: mode must be 'ipa' or 'kpa', got {self.mode!r}")
        self._covariances: dict[str, torch.Tensor] = {}

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        if self.restore:
            return
        if calibration is None:
            raise ValueError(
                "corda builds its adapter from input statistics: pass a few batches, "
                "lt.adapt(model, lt.CorDA(...), calibration=[{'input_ids': ...}, ...])"
            )
        self._covariances = input_covariances(model, paths, calibration)

    def make_delta(self, path: str, module: nn.Module) -> Residual:
        view = weight_view(module)
        _check_rank(self.name, path, self.r, view)
        scale = self.alpha / self.r
        w = weight_matrix(view, module)
        if self.restore:
            a, b = w.new_zeros(self.r, w.shape[1]), w.new_zeros(w.shape[0], self.r)
        else:
            a, b = corda_factors(w, self._covariances.pop(path).to(w.device), self.r, scale, self.mode)
        return Residual(view, a, b, scale, self.dropout)


class SVFitDelta(Factored):
    """``U diag(σ − σ₀) Vh`` over the top-r singular vectors of W; only σ (r values) trains."""

    def __init__(self, view: WeightView, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> None:
        super().__init__(view)
        self.sigma = nn.Parameter(s.clone())
        self.register_buffer("sigma0", s.clone())
        self.register_buffer("U", u.contiguous())
        self.register_buffer("Vh", vh.contiguous())

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = (self.sigma - self.sigma0.to(self.sigma.dtype))[:, None] * self.Vh.to(self.sigma.dtype)
        return to_lowrank_layout(self.view, a, self.U)


@register
@dataclass
class SVFit(_Restorable, MethodConfig):
    """SVFit (Sun et al., 2024): ``W ≈ U Σ Vh + R`` from the top-r SVD; only the r singular values
    train. ``restore`` is set in saved configs; leave it False."""

    r: int = 16
    restore: bool = False

    name: ClassVar[str] = "svfit"
    fused_linear: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True

    def make_delta(self, path: str, module: nn.Module) -> SVFitDelta:
        view = weight_view(module)
        _check_rank(self.name, path, self.r, view)
        w = weight_matrix(view, module)
        if self.restore:
            return SVFitDelta(view, w.new_zeros(w.shape[0], self.r), w.new_zeros(self.r), w.new_zeros(self.r, w.shape[1]))
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        return SVFitDelta(view, u[:, : self.r], s[: self.r], vh[: self.r])
