"""Bottleneck adapters (site: module output or input; form: bottleneck MLP).

Houlsby and Pfeiffer insert ``h + U σ(D h)`` after sub-block outputs
(sequential); the parallel adapter adds ``s · U σ(D x)`` from the sub-block's
input; Compacter builds ``D`` and ``U`` from Kronecker sums with a rule shared by
all layers; SparseAdapter prunes the adapter at init. None of them is linear in
the base weights, so none merges.

Length: five methods and their shared bottleneck pieces (about 50 lines a method).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MethodConfig
from ..core.forms_extra import (
    ACTIVATIONS,
    Bottleneck,
    PHMProjection,
    Projection,
    houlsby_init,
    io_widths,
    lora_init,
    residual_argument,
)
from ..core.site import base_module, remove_site, site_at
from ..core.weights import LINEAR_TYPES
from ..registry import register


@dataclass
class _Bottleneck(MethodConfig):
    """Fields every bottleneck adapter shares (not a method by itself).

    r: bottleneck width (``None``: the site's width ÷ ``reduction``);
    activation: ``relu``, ``gelu``, ``silu``/``swish`` or ``tanh``; scale: multiplies the branch;
    init: ``"houlsby"`` (small normal weights, near identity) or ``"lora"`` (U = 0: exact identity).
    """

    r: int | None = None
    reduction: int = 16
    activation: str = "relu"
    scale: float = 1.0
    init: str = "houlsby"

    mergeable: ClassVar[bool] = False
    default_targets: ClassVar[str | list[str]] = ["@attn_out", "@ffn_out"]
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r is not None and (not isinstance(self.r, int) or self.r <= 0):
            raise ValueError(f"{self.name}: r must be a positive integer or None, got {self.r!r}")
        if self.reduction <= 0:
            raise ValueError(f"{self.name}: reduction must be positive, got {self.reduction}")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{self.name}: activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")
        if self.init not in ("houlsby", "lora"):
            raise ValueError(f"{self.name}: init must be 'houlsby' or 'lora', got {self.init!r}")

    def width(self, d: int) -> int:
        return self.r if self.r is not None else max(1, d // self.reduction)

    def source(self, module: nn.Module) -> str:
        """What the branch reads: the site's output (sequential adapters)."""
        return "output"

    def projections(self, d_in: int, r: int, d_out: int) -> tuple[nn.Module, nn.Module]:
        down, up = Projection(d_in, r), Projection(r, d_out)
        if self.init == "houlsby":
            houlsby_init(down, up)
        else:
            lora_init(down, up)
        return down, up

    def make_delta(self, path: str, module: nn.Module) -> Bottleneck:
        d_in, d_out = io_widths(module)
        source = self.source(module)
        if source != "input":  # the branch reads (and returns) the output width
            d_in = d_out
        down, up = self.projections(d_in, self.width(d_in), d_out)
        return Bottleneck(down, up, self.activation, self.scale, source)


@register
@dataclass
class Houlsby(_Bottleneck):
    """Houlsby et al. (2019): a sequential bottleneck ``h + U σ(D h)`` after the attention
    output projection and after the FFN output projection of every layer (before the residual add)."""

    activation: str = "swish"

    name: ClassVar[str] = "houlsby"


@register
@dataclass
class Pfeiffer(_Bottleneck):
    """Pfeiffer et al. (2021): the Houlsby bottleneck after the FFN output projection only."""

    name: ClassVar[str] = "pfeiffer"
    default_targets: ClassVar[str | list[str]] = "@ffn_out"


@register
@dataclass
class ParallelAdapter(_Bottleneck):
    """He et al. (2022), scaled parallel adapter: ``FFN(x) + s · U σ(D x)``, s = 4, identity at init.

    Where the FFN is one module (Llama/GPT-2 ``mlp``, T5 ``DenseReluDense``) the branch reads
    its input. Post-LN BERT has none: the adapter sits on ``layer.N.output`` and adds its branch,
    computed from that block's residual argument (the FFN input), to the residual inside the
    block's LayerNorm — ``LN(FFN(x) + x + s·f(x))``, the same sum AdapterHub's parallel adapter forms.
    """

    reduction: int = 2
    scale: float = 4.0
    init: str = "lora"

    name: ClassVar[str] = "parallel_adapter"
    default_targets: ClassVar[str | list[str]] = "@ffn_block"
    site_types: ClassVar[tuple[type, ...]] = (nn.Module,)

    def source(self, module: nn.Module) -> str:
        return "residual" if residual_argument(module) else "input"


@register
@dataclass
class Compacter(_Bottleneck):
    """Compacter (Karimi Mahabadi et al., 2021): Houlsby placement, with ``D`` and ``U`` built as
    ``Σᵢ Aᵢ ⊗ (sᵢ tᵢᵀ)``. The ``phm_dim`` matrices ``Aᵢ`` (n × n) are one tensor shared by every
    projection of the adapter; the rank-one factors are per layer. ``r`` is rounded to a multiple of n.

    phm_dim: n; rule_std: std of the normal init of ``Aᵢ``.
    """

    reduction: int = 32
    activation: str = "gelu"
    phm_dim: int = 4
    rule_std: float = 0.01

    name: ClassVar[str] = "compacter"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.phm_dim <= 0:
            raise ValueError(f"compacter: phm_dim must be positive, got {self.phm_dim}")
        if self.r is not None and self.r % self.phm_dim:
            raise ValueError(f"compacter: r={self.r} must be a multiple of phm_dim={self.phm_dim}")

    def width(self, d: int) -> int:
        n = self.phm_dim
        return self.r if self.r is not None else n * max(1, round(d / self.reduction / n))

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        # One rule per adapt() call: every delta made below holds this very Parameter.
        self._rule = nn.Parameter(torch.randn(self.phm_dim, self.phm_dim, self.phm_dim) * self.rule_std)

    def projections(self, d_in: int, r: int, d_out: int) -> tuple[nn.Module, nn.Module]:
        return PHMProjection(d_in, r, self._rule), PHMProjection(r, d_out, self._rule)


@register
@dataclass
class SparseAdapter(_Bottleneck):
    """SparseAdapter (He et al., 2022): a Houlsby adapter pruned at init to ``sparsity`` by SNIP
    (``|w · ∂L/∂w|`` summed over the calibration batches; global threshold), or by ``|w|`` when no
    calibration data is given. The masks are saved buffers; pruned weights stay zero.

    widen: "large-sparse" — widen the bottleneck by 1 / (1 − sparsity), same trained-parameter budget.
    """

    sparsity: float = 0.5
    widen: bool = False

    name: ClassVar[str] = "sparse_adapter"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparse_adapter: sparsity must be in [0, 1), got {self.sparsity}")

    def width(self, d: int) -> int:
        r = super().width(d)
        return math.ceil(r / (1 - self.sparsity)) if self.widen else r

    def projections(self, d_in: int, r: int, d_out: int) -> tuple[nn.Module, nn.Module]:
        down, up = Projection(d_in, r, masked=True), Projection(r, d_out, masked=True)
        houlsby_init(down, up)  # both non-zero, so both get a SNIP gradient
        return down, up

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        made = {p: super(SparseAdapter, self).make_delta(p, base_module(model, p)) for p in paths}
        projections = [proj for d in made.values() for proj in (d.down, d.up)]
        batches = list(calibration or [])
        if batches:
            grads = _snip_gradients(model, made, batches, self.task)
            scores = [(proj.weight * g).abs() for proj, g in zip(projections, grads, strict=True)]
        else:
            scores = [proj.weight.detach().abs() for proj in projections]
        flat = torch.cat([s.flatten() for s in scores])
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[torch.topk(flat, round(flat.numel() * (1 - self.sparsity))).indices] = True
        for proj, k in zip(projections, keep.split([s.numel() for s in scores]), strict=True):
            proj.prune(k.view_as(proj.weight))
        self._made = made

    def make_delta(self, path: str, module: nn.Module) -> Bottleneck:
        return self._made.pop(path)


def _snip_gradients(model: nn.Module, made: dict[str, Bottleneck], batches: list[dict], task: str | None):
    """Σ ∂L/∂w over ``batches`` for every adapter weight, with the adapters attached for the
    occasion. L is the model's loss; without labels, the LM loss on the inputs (causal LMs) or
    the cross-entropy with the model's own predictions."""
    tmp = "__snip__"
    device = next(model.parameters()).device
    for path, delta in made.items():
        site = site_at(model, path)
        site.deltas[tmp] = delta.to(device)
        site.active = (*site.active, tmp)
    weights = [proj.weight for d in made.values() for proj in (d.down, d.up)]
    total = [torch.zeros_like(w) for w in weights]  # on the model's device, like the weights now
    try:
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if "labels" not in batch and task == "causal-lm":
                batch["labels"] = batch["input_ids"]
            out = model(**batch)
            loss = getattr(out, "loss", None)
            if loss is None:
                logits = out.logits if hasattr(out, "logits") else out[0]
                loss = F.cross_entropy(logits.flatten(0, -2).float(), logits.argmax(-1).flatten())
            for t, g in zip(total, torch.autograd.grad(loss, weights), strict=True):
                t += g
    finally:
        for path in made:
            site = site_at(model, path)
            del site.deltas[tmp]
            site.active = tuple(n for n in site.active if n != tmp)
            if not len(site.deltas):
                remove_site(model, path)
    return total
