"""More forms: bottleneck MLPs (dense, PHM/Kronecker, masked), vector scale and
shift, a dense full-rank update, and a tuned copy of a small module.

Like :mod:`.forms`, each is one :class:`Delta` that any method instantiates
with its own shapes, scale and initialisation. The vector forms and the dense
update are linear in the base weights and merge; the bottlenecks do not.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .site import Delta
from .weights import LINEAR_TYPES, weight_view

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "silu": F.silu, "swish": F.silu, "tanh": torch.tanh,
}


def io_widths(module: nn.Module) -> tuple[int, int]:
    """(input width, output width) of a Linear-like module, or of a block that starts
    and ends with one (an MLP, BERT's output block)."""
    if isinstance(module, LINEAR_TYPES):
        view = weight_view(module)
        return view.in_features, view.out_features
    linears = [m for m in module.modules() if isinstance(m, LINEAR_TYPES)]
    if not linears:
        raise TypeError(f"{type(module).__name__} has no Linear layer to read its widths from")
    return io_widths(linears[0])[0], io_widths(linears[-1])[1]


def residual_argument(module: nn.Module) -> str | None:
    """Name of the residual argument of a post-LN output block (HF's ``BertOutput(hidden_states,
    input_tensor)`` and its relatives add ``input_tensor`` back before their LayerNorm)."""
    params = list(inspect.signature(module.forward).parameters)
    return params[1] if len(params) > 1 and params[1] == "input_tensor" else None


# --- bottleneck projections ------------------------------------------------------
class Projection(nn.Module):
    """A dense ``out × in`` projection with a bias. ``masked`` adds a fixed boolean mask
    (a saved buffer) that keeps pruned weights at zero (SparseAdapter)."""

    def __init__(self, d_in: int, d_out: int, masked: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(d_out, d_in))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.register_buffer("mask", torch.ones(d_out, d_in, dtype=torch.bool) if masked else None)

    def matrix(self) -> torch.Tensor:
        return self.weight if self.mask is None else self.weight * self.mask

    def prune(self, keep: torch.Tensor) -> None:
        """Keep only the weights where ``keep`` is true, from now on."""
        with torch.no_grad():
            self.mask.copy_(keep)
            self.weight.mul_(keep)


class PHMProjection(nn.Module):
    """Compacter's PHM layer: ``W = Σᵢ Aᵢ ⊗ (sᵢ tᵢᵀ)``.

    ``rule`` holds the ``n`` matrices ``Aᵢ`` (n × n) and is the same Parameter
    object in every projection of one adapter: ``state_dict`` lists it under each
    site (so save/load work site by site with identical values), while
    ``parameters()`` — and so the optimizer — sees it once.
    """

    def __init__(self, d_in: int, d_out: int, rule: nn.Parameter) -> None:
        super().__init__()
        n = rule.shape[0]
        if d_in % n or d_out % n:
            raise ValueError(f"PHM: widths {d_in} → {d_out} must be divisible by phm_dim n={n}")
        self.rule = rule
        self.s = nn.Parameter(torch.empty(n, d_out // n))
        self.t = nn.Parameter(torch.empty(n, d_in // n))
        self.bias = nn.Parameter(torch.zeros(d_out))
        nn.init.xavier_uniform_(self.s)
        nn.init.xavier_uniform_(self.t)

    def matrix(self) -> torch.Tensor:
        n, p, q = self.rule.shape[0], self.s.shape[1], self.t.shape[1]
        return torch.einsum("iab,ic,id->acbd", self.rule, self.s, self.t).reshape(n * p, n * q)


class Bottleneck(Delta):
    """``h + scale · U σ(D z)``, where ``z`` is chosen by ``source``:

    - ``"output"``: the site's output ``h`` (sequential adapter, Houlsby/Pfeiffer);
    - ``"input"``: the site's input ``x`` (parallel adapter beside an FFN module);
    - ``"residual"``: the ``input_tensor`` a post-LN output block (BERT) adds back as its
      residual; the branch is added to that argument, so it lands next to the FFN
      output inside the block's LayerNorm, as a parallel adapter should.

    Not linear in the base weights, so it does not merge.
    """

    def __init__(self, down: nn.Module, up: nn.Module, activation: str = "relu", scale: float = 1.0,
                 source: str = "output", residual_arg: str = "input_tensor") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if source not in ("output", "input", "residual"):
            raise ValueError(f"unknown bottleneck source {source!r}; use 'output', 'input' or 'residual'")
        self.down, self.up = down, up
        self.activation, self.scale, self.source, self.residual_arg = activation, scale, source, residual_arg

    def branch(self, z: torch.Tensor) -> torch.Tensor:
        """``scale · U σ(D z)`` in ``z``'s dtype (bf16 stays bf16)."""
        mid = F.linear(z, self.down.matrix().to(z.dtype), self.down.bias.to(z.dtype))
        return F.linear(ACTIVATIONS[self.activation](mid), self.up.matrix().to(z.dtype), self.up.bias.to(z.dtype)) * self.scale

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        if self.source == "output":
            return h + self.branch(h)
        if self.source == "input":
            return h + self.branch(x)
        return h

    def module(self, base: nn.Module) -> nn.Module:
        if self.source != "residual":
            return base
        if isinstance(base, _ResidualBranches):  # several adapters read the same original residual
            return _ResidualBranches(base.block, [*base.branches, self], self.residual_arg)
        return _ResidualBranches(base, [self], self.residual_arg)


class _ResidualBranches:
    """Runs a post-LN output block with ``Σ branch(r)`` added to its residual argument ``r``
    (a plain callable: it borrows the block and the branches, so it adds no state)."""

    def __init__(self, block: nn.Module, branches: list[Bottleneck], arg: str) -> None:
        self.block, self.branches, self.arg = block, branches, arg

    def _with_branches(self, residual: torch.Tensor) -> torch.Tensor:
        return residual + sum(b.branch(residual) for b in self.branches)

    def __call__(self, h: torch.Tensor, *args, **kwargs):
        if args:
            return self.block(h, self._with_branches(args[0]), *args[1:], **kwargs)
        if self.arg not in kwargs:
            raise TypeError(f"parallel adapter: {type(self.block).__name__} was called without its residual "
                            f"argument {self.arg!r}")
        return self.block(h, **{**kwargs, self.arg: self._with_branches(kwargs[self.arg])})


def houlsby_init(*projections: Projection, std: float = 1e-2) -> None:
    """Houlsby's near-identity init: weights ~ N(0, std²) truncated at ±2 std, biases zero."""
    for p in projections:
        nn.init.trunc_normal_(p.weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(p.bias)


def lora_init(down: Projection, up: Projection) -> None:
    """Exact identity at init (He et al.): D Kaiming-uniform, U and biases zero."""
    nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))
    for t in (down.bias, up.weight, up.bias):
        nn.init.zeros_(t)


# --- vector forms (linear in the weights: they merge) ------------------------------
class VectorScale(Delta):
    """Multiply a Linear's output channels (``side="output"``) or input features
    (``side="input"``) by ``γ``.

    ``γ`` is stored as ``(out, 1)`` or ``(1, in)``: the shape that broadcasts over the
    logical ``out × in`` weight, which is also HF PEFT's IA3 layout. Merging multiplies
    the weight (and, for outputs, the bias); unmerging divides.
    """

    mergeable = True

    def __init__(self, module: nn.Module, side: str = "output", init: float = 1.0, std: float = 0.0) -> None:
        super().__init__()
        if side not in ("output", "input"):
            raise ValueError(f"unknown scale side {side!r}; use 'output' or 'input'")
        self.view = weight_view(module)
        self.side = side
        shape = (self.view.out_features, 1) if side == "output" else (1, self.view.in_features)
        self.scale = nn.Parameter(torch.full(shape, float(init)))
        if std > 0:
            nn.init.normal_(self.scale, mean=init, std=std)

    def pre(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.flatten().to(x.dtype) if self.side == "input" else x

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h * self.scale.flatten().to(h.dtype) if self.side == "output" else h

    def _apply_to(self, base: nn.Module, divide: bool) -> None:
        s = self.scale.float()
        if not divide and bool((s == 0).any()):
            raise ValueError("this scale vector has zero entries; merging would erase weights irreversibly "
                             "(keep the adapter unmerged)")
        factor = 1 / s if divide else s
        base.weight.data = (base.weight.float() * self.view.to_weight_layout(factor)).to(base.weight.dtype)
        if self.side == "output" and base.bias is not None:
            base.bias.data = (base.bias.float() * factor.flatten()).to(base.bias.dtype)

    def merge(self, base: nn.Module) -> None:
        self._apply_to(base, divide=False)

    def unmerge(self, base: nn.Module) -> None:
        self._apply_to(base, divide=True)


class VectorShift(Delta):
    """Add ``β`` to a module's output channels; merges into its bias.

    Where the base has no bias (Llama's Linears), merging creates one and
    unmerging removes it again, so the model's layout is restored exactly.
    """

    mergeable = True

    def __init__(self, width: int, std: float = 0.0) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros(width))
        if std > 0:
            nn.init.normal_(self.shift, std=std)
        self._created: list[bool] = []

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.shift.to(h.dtype)

    def merge(self, base: nn.Module) -> None:
        if "bias" not in base._parameters:
            raise TypeError(f"{type(base).__name__} has no bias slot to fold a shift into; keep it unmerged")
        created = base.bias is None
        if created:
            base.bias = nn.Parameter(torch.zeros_like(self.shift, dtype=base.weight.dtype), requires_grad=False)
        base.bias.data += self.shift.detach().to(base.bias.dtype)
        self._created.append(created)

    def unmerge(self, base: nn.Module) -> None:
        if self._created.pop():
            base.bias = None
        else:
            base.bias.data -= self.shift.detach().to(base.bias.dtype)


def output_width(module: nn.Module) -> int:
    """Channels a :class:`VectorShift` on ``module``'s output needs."""
    if isinstance(module, nn.LayerNorm):
        return int(module.normalized_shape[-1])
    return io_widths(module)[1]


# --- full-rank updates ---------------------------------------------------------------
class DenseUpdate(Delta):
    """A full, trainable ``ΔW`` (and ``Δb``) beside a frozen Linear: ``h + x ΔWᵀ + Δb``.

    Stored in the base weight's own layout, zero at init; merges as ``W += ΔW``.
    """

    mergeable = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.view = weight_view(module)
        self.weight = nn.Parameter(torch.zeros_like(module.weight, dtype=torch.float32))
        bias = getattr(module, "bias", None)
        self.bias = nn.Parameter(torch.zeros_like(bias, dtype=torch.float32)) if bias is not None else None

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        w = self.weight.to(h.dtype)
        out = x @ w if self.view.kind == "conv1d_t" else F.linear(x, w)
        return h + out + (self.bias.to(h.dtype) if self.bias is not None else 0)

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        return self.weight.float()

    def merge(self, base: nn.Module) -> None:
        super().merge(base)
        if self.bias is not None:
            base.bias.data += self.bias.detach().to(base.bias.dtype)

    def unmerge(self, base: nn.Module) -> None:
        super().unmerge(base)
        if self.bias is not None:
            base.bias.data -= self.bias.detach().to(base.bias.dtype)


class TunedCopy(Delta):
    """A trainable copy of a small module (a norm layer): ``h + copy(x) − original(x)``.

    Alone, that is the copy's output (HF PEFT's LN tuning runs the copy); with
    other adapters active, the changes add up instead of the last one winning.
    The original parameters are kept as non-saved buffers so the change stays
    right while another adapter is merged into the base. Merging loads
    ``base + (copy − original)``; unmerging restores the saved base exactly.
    """

    mergeable = True

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.trained = copy.deepcopy(module)
        self.trained.requires_grad_(True)
        self._names = [n for n, _ in module.named_parameters()]
        for i, (_, p) in enumerate(module.named_parameters()):
            self.register_buffer(f"original_{i}", p.detach().clone(), persistent=False)
        self._saved: list[dict[str, torch.Tensor]] = []

    def _originals(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, f"original_{i}") for i, n in enumerate(self._names)}

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + (self.trained(x) - functional_call(self.trained, self._originals(), (x,)))

    def merge(self, base: nn.Module) -> None:
        self._saved.append({n: p.detach().clone() for n, p in base.named_parameters()})
        trained = dict(self.trained.named_parameters())
        for name, original in self._originals().items():
            p = base.get_parameter(name)
            p.data += (trained[name].detach() - original).to(p.dtype)

    def unmerge(self, base: nn.Module) -> None:
        for name, value in self._saved.pop().items():
            base.get_parameter(name).data.copy_(value)
