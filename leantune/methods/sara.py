"""SaRA: train the smallest-magnitude weights as a sparse update, kept low-rank by a penalty."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..api import adapter_paths, adapters
from ..config import MethodConfig
from ..core.sparse import (
    SPARSE_SITE_TYPES,
    SparseDelta,
    check_fraction,
    logical_weight,
    magnitude_support,
    support_size,
)
from ..core.weights import weight_view
from ..registry import register


@register
@dataclass
class SaRA(MethodConfig):
    """SaRA (Hu et al., 2024): the ``density`` smallest-``|W|`` entries of each weight train
    as a sparse ``ΔW``; add :func:`sara_penalty` (``nuclear_weight · Σ ‖ΔW‖_*``) to the loss
    to keep each update low-rank."""

    density: float = 0.01
    nuclear_weight: float = 1e-3

    name: ClassVar[str] = "sara"
    mergeable: ClassVar[bool] = True
    site_types: ClassVar[tuple[type, ...]] = SPARSE_SITE_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction(self.name, "density", self.density)
        if self.nuclear_weight < 0:
            raise ValueError(f"{self.name}: nuclear_weight must be >= 0, got {self.nuclear_weight!r}")

    def make_delta(self, path: str, module: nn.Module) -> SparseDelta:
        view = weight_view(module)
        weight = logical_weight(module, view)
        return SparseDelta(view, magnitude_support(weight, support_size(weight.numel(), self.density), False))


def sara_penalty(model: nn.Module, name: str = "default") -> torch.Tensor:
    """SaRA's regulariser for adapter ``name``: ``nuclear_weight · Σ_sites ‖ΔW‖_*``.

    Differentiable in the sparse values; add it to the loss before ``backward()``.
    Each site's ``ΔW`` is built densely here (an SVD needs it), once per call.
    """
    record = adapters(model).get(name)
    if record is None or not isinstance(record.config, SaRA):
        raise ValueError(f"sara_penalty needs a sara adapter named {name!r}; this model has "
                         f"{ {n: r.config.name for n, r in adapters(model).items()} or 'no adapters'}")
    total = None
    for _, _, delta in adapter_paths(model, name):
        if isinstance(delta, SparseDelta):
            view = delta.view
            dense = delta.values.new_zeros(view.out_features * view.in_features).index_put((delta.indices,), delta.values)
            norm = torch.linalg.matrix_norm(dense.float().view(view.out_features, view.in_features), ord="nuc")
            total = norm if total is None else total + norm
    return record.config.nuclear_weight * total
