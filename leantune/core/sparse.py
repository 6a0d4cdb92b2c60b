"""Sparse and structured weight deltas: ``ΔW`` made from a few trainable numbers.

Every sparse method (SpIEL, LT-SFT, PaCA, SaRA, DSEE's residual, mask tuning,
SAID) is a :class:`StructuredDelta`: a delta on a weight site whose logical
``out × in`` update is a cheap function of a few tensors. The forward adds the
update through the base module's own operator (``F.linear`` for Linear and
GPT-2 Conv1D, ``F.embedding`` for Embedding); ``ΔW`` is built in a no-grad buffer
inside one autograd function that keeps only the input and the small tensors,
rebuilds ``ΔW`` in backward, and reduces the transient dense gradient of ``ΔW``
to those tensors right away. So parameters, their gradients and optimizer state
are proportional to the trainable numbers, and no dense trainable matrix or
dense gradient outlives a backward call. All of them merge (``ΔW`` is linear in
the base weight or independent of it).

Indices are flat positions in the logical ``out × in`` matrix (row-major), the
same for every module kind; :func:`storage_index` maps them to the base
weight's own layout for merging.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F
from torch import nn

from .site import Delta
from .weights import LINEAR_TYPES, WeightView

SPARSE_SITE_TYPES: tuple[type, ...] = (*LINEAR_TYPES, nn.Embedding)


def check_fraction(method: str, field: str, value: float) -> None:
    """A clear error unless ``0 < value <= 1``."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"{method}: {field} must be in (0, 1], got {value!r}")


def path_seed(seed: int, path: str) -> int:
    """A per-module seed, so modules of one shape get different random choices."""
    return (zlib.crc32(path.encode()) ^ (seed * 0x9E3779B1)) & 0x7FFFFFFF


def support_size(numel: int, density: float) -> int:
    """How many entries a ``density`` keeps of ``numel`` (at least one)."""
    return max(1, min(numel, round(density * numel)))


def random_support(numel: int, k: int, seed: int) -> torch.Tensor:
    """``k`` distinct flat positions drawn with a fixed seed, sorted."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(numel, generator=g)[:k].sort().values


def magnitude_support(weight: torch.Tensor, k: int, largest: bool) -> torch.Tensor:
    """Flat positions of the ``k`` largest (or smallest) ``|weight|`` entries, sorted."""
    scores = weight.detach().abs().float().reshape(-1)
    return torch.topk(scores, k, largest=largest).indices.sort().values.cpu()


def logical_weight(base: nn.Module, view: WeightView) -> torch.Tensor:
    """The base weight as the logical ``out × in`` matrix (a view, no copy)."""
    return base.weight if view.kind == "linear" else base.weight.T


def storage_index(view: WeightView, flat: torch.Tensor) -> torch.Tensor:
    """Logical ``out × in`` flat positions as positions in the base weight's storage."""
    if view.kind in ("conv1d_t", "embedding"):
        return (flat % view.in_features) * view.out_features + flat // view.in_features
    return flat


class _DeltaProduct(torch.autograd.Function):
    """``op(x, ΔW)`` for a :class:`StructuredDelta`; saves ``x`` and the delta's small inputs only."""

    @staticmethod
    def forward(ctx, x, delta, base, dtype, *inputs):
        with torch.no_grad():
            dw = delta.dense(base, dtype, *inputs)
        ctx.delta, ctx.base, ctx.dtype = delta, base, dtype
        ctx.save_for_backward(x, *inputs)
        if delta.view.kind == "embedding":
            return F.embedding(x, dw.T)
        return F.linear(x.to(dtype), dw)

    @staticmethod
    def backward(ctx, grad_out):
        x, *inputs = ctx.saved_tensors
        delta, base = ctx.delta, ctx.base
        view = delta.view
        g = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = None
        if view.kind == "embedding":
            grad_rows = g.new_zeros(view.in_features, view.out_features).index_add_(0, x.reshape(-1), g)
            if base.padding_idx is not None:  # as the base embedding: the padding row never learns
                grad_rows[base.padding_idx] = 0
            grad_dw = grad_rows.T
        else:
            dw = delta.dense(base, ctx.dtype, *inputs)
            if ctx.needs_input_grad[0]:
                grad_x = (g @ dw).reshape(x.shape).to(x.dtype)
            grad_dw = g.T @ x.reshape(-1, x.shape[-1]).to(g.dtype)
        grads = delta.reduce(base, grad_dw, *inputs)
        return (grad_x, None, None, None, *(gr.to(t.dtype) if gr is not None else None
                                            for gr, t in zip(grads, inputs, strict=True)))


class StructuredDelta(Delta):
    """A weight delta whose logical ``ΔW`` is built from :meth:`inputs` (parallel add).

    Subclasses give :meth:`inputs` (the trainable tensors), :meth:`dense` (``ΔW``
    from them) and :meth:`reduce` (their gradients from the gradient of ``ΔW``).
    """

    mergeable = True

    def __init__(self, view: WeightView) -> None:
        super().__init__()
        if view.kind not in ("linear", "conv1d_t", "embedding"):
            raise TypeError(f"sparse deltas act on Linear, GPT-2 Conv1D and Embedding weights, not {view.kind!r}")
        self.view = view

    def inputs(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def dense(self, base: nn.Module, dtype: torch.dtype, *inputs: torch.Tensor) -> torch.Tensor:
        """``ΔW`` (logical ``out × in``, in ``dtype``) from ``inputs``."""
        raise NotImplementedError

    def reduce(self, base: nn.Module, grad: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients of ``inputs`` from ``grad``, the transient gradient of ``ΔW``."""
        raise NotImplementedError

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + _DeltaProduct.apply(x, self, base, h.dtype, *self.inputs())

    def delta_weight(self, base: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            return self.view.to_weight_layout(self.dense(base, torch.float32, *self.inputs()))


class GrowthTracker:
    """Where a sparse delta should grow: accumulated ``|∂L/∂ΔW|`` outside its support.

    Keeping the dense accumulated gradient would cost a full weight per site.
    Instead, each backward folds the transient dense gradient into a candidate
    list of at most ``size`` entries (positions and sums): the list's sums are
    added to the new ``|gradient|``, and the top ``size`` of the result are kept.
    An entry's sum is exact while it stays in the list; one that drops out loses
    its history (SpIEL's accumulated-gradient growth with bounded memory).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.index: torch.Tensor | None = None
        self.score: torch.Tensor | None = None

    def observe(self, grad: torch.Tensor, active: torch.Tensor) -> None:
        score = grad.detach().abs().float().reshape(-1)
        score[active] = 0
        if self.index is not None:
            score.index_add_(0, self.index, self.score)
        self.score, self.index = torch.topk(score, min(self.size, score.numel()))

    def candidates(self, active: torch.Tensor) -> torch.Tensor:
        """Positions outside ``active`` with some gradient, largest sum first."""
        if self.index is None:
            return active.new_empty(0)
        keep = (self.score > 0) & ~torch.isin(self.index, active)
        return self.index[keep]

    def reset(self) -> None:
        self.index = self.score = None


class SparseDelta(StructuredDelta):
    """Trainable ``values`` at fixed flat ``indices`` of ``ΔW`` (saved with the adapter).

    Forward scatters the values into a dense no-grad buffer; backward gathers the
    weight gradient at the indices. Merging is a scatter-add into the base weight.
    """

    def __init__(self, view: WeightView, indices: torch.Tensor) -> None:
        super().__init__(view)
        self.register_buffer("indices", indices.to(torch.int64))
        self.values = nn.Parameter(torch.zeros(indices.numel()))
        self.tracker: GrowthTracker | None = None

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.values,)

    def dense(self, base: nn.Module, dtype: torch.dtype, values: torch.Tensor) -> torch.Tensor:
        out = values.new_zeros(self.view.out_features * self.view.in_features, dtype=dtype)
        return out.index_put_((self.indices,), values.to(dtype), accumulate=True).view(
            self.view.out_features, self.view.in_features)

    def reduce(self, base: nn.Module, grad: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor]:
        if self.tracker is not None:
            self.tracker.observe(grad, self.indices)
        return (grad.reshape(-1)[self.indices],)

    def merge(self, base: nn.Module) -> None:
        self._scatter_add(base, 1.0)

    def unmerge(self, base: nn.Module) -> None:
        self._scatter_add(base, -1.0)

    def _scatter_add(self, base: nn.Module, sign: float) -> None:
        weight = base.weight.data
        weight.view(-1).index_add_(0, storage_index(self.view, self.indices),
                                   self.values.detach().to(weight.dtype), alpha=sign)

    def drop_and_grow(self, fraction: float, optimizer: torch.optim.Optimizer | None = None) -> int:
        """Move up to ``fraction`` of the entries: drop the smallest ``|values|``, regrow
        where :attr:`tracker` saw the largest accumulated gradient; new values start at
        zero and their optimizer state is cleared. Returns how many entries moved."""
        if self.tracker is None:
            raise RuntimeError("drop_and_grow needs a GrowthTracker on the delta (delta.tracker)")
        grown = self.tracker.candidates(self.indices)[: round(fraction * self.values.numel())]
        n = grown.numel()
        if n:
            with torch.no_grad():
                slots = torch.topk(self.values.abs(), n, largest=False).indices
                self.indices[slots] = grown
                self.values[slots] = 0
            state = optimizer.state.get(self.values, {}) if optimizer is not None else {}
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == self.values.shape:
                    value[slots] = 0
        self.tracker.reset()
        return n


class ColumnDelta(SparseDelta):
    """Trainable whole input columns of ``ΔW`` (``out × k`` values; PaCA's form).

    Forward multiplies only the selected input features, so autograd saves
    ``x[..., columns]`` (``N × k``) instead of ``x``. ``indices`` holds the flat
    positions, row-major over ``out × k``, so merging is the shared scatter-add.
    """

    def __init__(self, view: WeightView, columns: torch.Tensor) -> None:
        if view.kind == "embedding":
            raise TypeError("column deltas act on Linear and GPT-2 Conv1D weights")
        rows = torch.arange(view.out_features)[:, None] * view.in_features
        super().__init__(view, (rows + columns.to(torch.int64)[None, :]).reshape(-1))

    def columns(self) -> torch.Tensor:
        return self.indices[: self.values.numel() // self.view.out_features] % self.view.in_features

    def post(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        block = self.values.view(self.view.out_features, -1).to(h.dtype)
        return h + F.linear(x.index_select(-1, self.columns()).to(h.dtype), block)


class MaskDelta(StructuredDelta):
    """A learnable binary mask on the frozen weight: ``W' = W ⊙ 1[scores > 0]``.

    ``ΔW = W ⊙ (mask − 1)``; the mask is trained straight-through (the gradient
    of ``scores`` is that of the mask, ``∂L/∂W' ⊙ W``), optionally with gradient
    dropout as a regulariser. Merging zeroes the masked weights and keeps them
    aside, so unmerging restores them exactly.
    """

    def __init__(self, view: WeightView, init_score: float, grad_dropout: float = 0.0) -> None:
        super().__init__(view)
        self.scores = nn.Parameter(torch.full((view.out_features, view.in_features), float(init_score)))
        self.grad_dropout = grad_dropout
        self._kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.scores,)

    def dense(self, base: nn.Module, dtype: torch.dtype, scores: torch.Tensor) -> torch.Tensor:
        weight = logical_weight(base, self.view).to(dtype)
        return weight * ((scores > 0).to(dtype) - 1)

    def reduce(self, base: nn.Module, grad: torch.Tensor, scores: torch.Tensor) -> tuple[torch.Tensor]:
        g = grad * logical_weight(base, self.view).to(grad.dtype)
        if self.training and self.grad_dropout > 0:
            keep = torch.empty_like(g).bernoulli_(1 - self.grad_dropout)
            g = g * keep / (1 - self.grad_dropout)
        return (g,)

    def merge(self, base: nn.Module) -> None:
        flat = base.weight.data.view(-1)
        dropped = self.view.to_weight_layout(self.scores.detach() <= 0).reshape(-1).nonzero().squeeze(1)
        self._kept = (dropped, flat[dropped].clone())
        flat[dropped] = 0

    def unmerge(self, base: nn.Module) -> None:
        if self._kept is not None:
            dropped, values = self._kept
            base.weight.data.view(-1)[dropped] = values
            self._kept = None


_GOLDEN = 0x9E3779B97F4A7C15
_MIX = (0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64))  # as signed int64


def _signed64(value: int) -> int:
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def hashed_projection(numel: int, dim: int, seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``j`` of a ``numel × dim`` random projection with one ``±1`` per row:
    ``(column[j], sign[j])``. Computed from ``(seed, j)`` by a splitmix64 hash in
    int64 arithmetic, so it is the same on every device and never stored."""
    z = torch.arange(numel, dtype=torch.int64, device=device) + _signed64(seed * _GOLDEN)
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX[0]
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX[1]
    z = z ^ ((z >> 31) & ((1 << 33) - 1))
    sign = ((z >> 40) & 1) * 2 - 1
    return torch.remainder(z, dim), sign


class ProjectedDelta(StructuredDelta):
    """``ΔW = scale · reshape(P z)``: ``z`` (``dim`` values) may be shared by many sites.

    ``P`` is :func:`hashed_projection` (one ``±1`` per row, so its columns are
    orthogonal), regenerated from ``seed`` whenever needed. A shared ``z`` is the
    same ``nn.Parameter`` registered in every site's delta: the model's
    ``parameters()`` (and so the optimizer) hold it once, while each site's state
    dict carries it under its own key, as PyTorch does for tied weights.
    """

    def __init__(self, view: WeightView, z: nn.Parameter, seed: int) -> None:
        super().__init__(view)
        self.z = z
        self.scale = nn.Parameter(torch.ones(()))
        self.seed = seed

    def inputs(self) -> tuple[torch.Tensor, ...]:
        return (self.z, self.scale)

    def _projection(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return hashed_projection(self.view.out_features * self.view.in_features, self.z.numel(), self.seed, device)

    def dense(self, base: nn.Module, dtype: torch.dtype, z: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        column, sign = self._projection(z.device)
        flat = z.to(dtype)[column] * sign.to(dtype) * scale.to(dtype)
        return flat.view(self.view.out_features, self.view.in_features)

    def reduce(self, base: nn.Module, grad: torch.Tensor, z: torch.Tensor,
               scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        column, sign = self._projection(z.device)
        signed = grad.reshape(-1).float() * sign
        grad_z = torch.zeros(z.numel(), device=z.device).index_add_(0, column, signed) * scale.float()
        grad_scale = (signed * z.float()[column]).sum()
        return grad_z, grad_scale
