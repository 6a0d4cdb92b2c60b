"""Low-rank methods whose matrices are shared across layers: VeRA, NOLA, MoS.

The shared tensors live in one :class:`~leantune.core.random_basis.Bank` per
adapter; each layer trains only what is its own (scaling vectors, mixing
coefficients, private shards). Frozen random tensors are regenerated from
``seed``, so a saved adapter holds the coefficients only.

Length: three methods (about 75 lines a method, mostly HF PEFT interop for VeRA).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core.factored import Factored
from ..core.random_basis import Bank, generator, largest_shape, seeded_uniform
from ..core.site import base_module
from ..core.weights import LINEAR_TYPES, WeightView, weight_view
from ..registry import register


def _positive(method: str, **values: int) -> None:
    for key, value in values.items():
        if not isinstance(value, int) or value <= 0:
            raise ValueError(f"{method}: {key} must be a positive integer, got {value!r}")


# --- VeRA --------------------------------------------------------------------------


class VeRADelta(Factored):
    """``h + b ⊙ (B (d ⊙ (A x)))`` with A (r × in) and B (out × r) slices of the adapter's shared pair."""

    def __init__(self, view: WeightView, bank: Bank, d_initial: float, dropout: float) -> None:
        super().__init__(view, 1.0, dropout)
        self.lambda_d = nn.Parameter(torch.full((bank.A.shape[0],), float(d_initial)))
        self.lambda_b = nn.Parameter(torch.zeros(view.out_features))
        bank.attach(self)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.bank.A[:, : self.view.in_features].to(self.lambda_d.device)
        b = self.bank.B[: self.view.out_features].to(self.lambda_b.device)
        return self.lambda_d[:, None] * a, self.lambda_b[:, None] * b


@register
@dataclass
class VeRA(MethodConfig):
    """VeRA (Kopiczko et al., 2024): one frozen random pair (A, B), sized to the largest adapted
    layer and sliced for smaller ones, shared by every layer; each layer trains ``d`` (r, init
    ``d_initial``) and ``b`` (out, init 0): ``ΔW = diag(b) B diag(d) A``. ``seed`` regenerates the
    pair (HF PEFT's ``projection_prng_key``); ``save_projection`` also writes it, as PEFT does by default."""

    r: int = 256
    dropout: float = 0.0
    d_initial: float = 0.1
    seed: int = 0
    save_projection: bool = False

    name: ClassVar[str] = "vera"
    fused_linear: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    peft_type: ClassVar[str | None] = "VERA"
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self.name, r=self.r)

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        out_features, in_features = largest_shape(model, paths)
        g = generator(self.seed)
        self._bank = Bank()
        self._bank.register_buffer("A", seeded_uniform((self.r, in_features), g), persistent=self.save_projection)
        self._bank.register_buffer("B", seeded_uniform((out_features, self.r), g), persistent=self.save_projection)

    def make_delta(self, path: str, module: nn.Module) -> VeRADelta:
        return VeRADelta(weight_view(module), self._bank, self.d_initial, self.dropout)

    # --- HF PEFT interop --------------------------------------------------------
    def peft_keys(self, delta: VeRADelta) -> dict[str, str]:
        return {"lambda_b": "vera_lambda_b", "lambda_d": "vera_lambda_d",
                "bank.A": "/base_model.vera_A", "bank.B": "/base_model.vera_B"}

    def peft_config(self, paths: list[str]) -> dict[str, Any]:
        return {"r": self.r, "target_modules": paths, "projection_prng_key": self.seed,
                "save_projection": self.save_projection, "vera_dropout": self.dropout, "d_initial": self.d_initial,
                "bias": "none", "init_weights": True, "layers_to_transform": None, "layers_pattern": None}

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], **common: Any) -> VeRA:
        if cfg.get("bias", "none") != "none":
            raise ValueError(f"this PEFT VeRA adapter uses bias={cfg['bias']!r}, which leantune's vera does not read")
        return cls(r=int(cfg.get("r", 256)), dropout=float(cfg.get("vera_dropout", 0.0)),
                   d_initial=float(cfg.get("d_initial", 0.1)), seed=int(cfg.get("projection_prng_key", 0)),
                   save_projection=bool(cfg.get("save_projection", True)), **common)


# --- NOLA --------------------------------------------------------------------------


class NoLADelta(Factored):
    """``A = Σᵢ αᵢ Aᵢ``, ``B = Σⱼ βⱼ Bⱼ`` over the adapter's frozen random bases (sliced to this layer)."""

    def __init__(self, view: WeightView, bank: Bank, scale: float, dropout: float) -> None:
        super().__init__(view, scale, dropout)
        k = bank.A.shape[0]
        self.alpha = nn.Parameter(torch.randn(k) / math.sqrt(k))
        self.beta = nn.Parameter(torch.zeros(bank.B.shape[0]))
        bank.attach(self)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.bank.A[:, :, : self.view.in_features].to(self.alpha.device)
        b = self.bank.B[:, : self.view.out_features].to(self.beta.device)
        return torch.einsum("k,kri->ri", self.alpha, a), torch.einsum("l,lor->or", self.beta, b)


@register
@dataclass
class NoLA(MethodConfig):
    """NOLA (Koohpayegani et al., 2024): LoRA whose factors are mixtures of frozen random bases,
    ``A = Σ αᵢ Aᵢ`` (``num_basis_a`` bases), ``B = Σ βⱼ Bⱼ`` (``num_basis_b``), regenerated from
    ``seed`` and shared by all layers; only α, β train (β = 0 at init). Scale ``alpha / r``."""

    r: int = 8
    alpha: float = 8.0
    num_basis_a: int = 64
    num_basis_b: int = 64
    dropout: float = 0.0
    seed: int = 0

    name: ClassVar[str] = "nola"
    fused_linear: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self.name, r=self.r, num_basis_a=self.num_basis_a, num_basis_b=self.num_basis_b)

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        out_features, in_features = largest_shape(model, paths)
        g = generator(self.seed)
        a = torch.stack([seeded_uniform((self.r, in_features), g) for _ in range(self.num_basis_a)])
        b = torch.stack([seeded_uniform((out_features, self.r), g) for _ in range(self.num_basis_b)])
        self._bank = Bank()
        self._bank.register_buffer("A", a, persistent=False)
        self._bank.register_buffer("B", b, persistent=False)

    def make_delta(self, path: str, module: nn.Module) -> NoLADelta:
        return NoLADelta(weight_view(module), self._bank, self.alpha / self.r, self.dropout)


# --- MoS ---------------------------------------------------------------------------


class MoSDelta(Factored):
    """A's rows and B's columns: shards picked from the adapter's pools by fixed indices, then private ones."""

    def __init__(self, view: WeightView, bank: Bank, picks: tuple[torch.Tensor, torch.Tensor], private: int,
                 scale: float, dropout: float) -> None:
        super().__init__(view, scale, dropout)
        bound = 1 / math.sqrt(view.in_features)
        self.private_A = nn.Parameter(torch.empty(private, view.in_features).uniform_(-bound, bound))
        self.private_B = nn.Parameter(torch.zeros(view.out_features, private))
        self.register_buffer("pick_A", picks[0], persistent=False)
        self.register_buffer("pick_B", picks[1], persistent=False)
        bank.attach(self)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.view
        shared_a = self.bank.pools[f"a{v.in_features}"][self.pick_A].reshape(-1, v.in_features)
        shared_b = self.bank.pools[f"b{v.out_features}"][self.pick_B].reshape(-1, v.out_features).T
        return torch.cat([shared_a.to(self.private_A.device), self.private_A]), torch.cat(
            [shared_b.to(self.private_B.device), self.private_B], dim=1)


@register
@dataclass
class MoS(MethodConfig):
    """MoS, Mixture of Shards (Wang et al., 2024): layers with the same input (output) size share a
    trainable pool of A-row (B-column) shards. Each layer's first ``r − private`` rows of A and
    columns of B are concatenations of pool shards at fixed random indices drawn from ``seed``,
    independently for A and B; its last ``private`` ones are its own. Vectors are cut into
    ``shards_per_vector`` pieces chosen independently. ``pool_size``: shards per pool, by default a
    quarter of what the layers would hold unshared (at least one vector's worth). Scale ``alpha / r``."""

    r: int = 8
    alpha: float = 8.0
    private: int = 1
    shards_per_vector: int = 1
    pool_size: int | None = None
    dropout: float = 0.0
    seed: int = 0

    name: ClassVar[str] = "mos"
    fused_linear: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    site_types: ClassVar[tuple[type, ...]] = LINEAR_TYPES

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive(self.name, r=self.r, shards_per_vector=self.shards_per_vector)
        if not 0 <= self.private < self.r:
            raise ValueError(f"mos: private must be in [0, r) so that some shards are shared, got {self.private}")

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        views = [weight_view(base_module(model, p)) for p in paths]
        pieces, per_layer = self.shards_per_vector, (self.r - self.private) * self.shards_per_vector
        users: dict[str, int] = {}
        for v in views:
            for key, size in ((f"a{v.in_features}", v.in_features), (f"b{v.out_features}", v.out_features)):
                if size % pieces:
                    raise ValueError(f"mos: shards_per_vector={pieces} must divide every layer size; {size} is not")
                users[key] = users.get(key, 0) + 1
        if self.pool_size is not None and self.pool_size < per_layer:
            raise ValueError(f"mos: pool_size={self.pool_size} is smaller than the {per_layer} shards one layer uses")
        sizes = {k: self.pool_size or max(per_layer, n * per_layer // 4) for k, n in users.items()}
        self._bank = Bank()
        self._bank.pools = nn.ParameterDict()
        for key, n in sizes.items():
            length = int(key[1:]) // pieces
            pool = torch.zeros(n, length) if key[0] == "b" else torch.empty(n, length).uniform_(-1, 1)
            self._bank.pools[key] = nn.Parameter(pool / math.sqrt(int(key[1:])))
        g = generator(self.seed)
        self._picks = {
            p: tuple(torch.randperm(sizes[f"{side}{size}"], generator=g)[:per_layer]
                     for side, size in (("a", v.in_features), ("b", v.out_features)))
            for p, v in zip(paths, views, strict=True)
        }

    def make_delta(self, path: str, module: nn.Module) -> MoSDelta:
        return MoSDelta(weight_view(module), self._bank, self._picks.pop(path), self.private, self.alpha / self.r,
                        self.dropout)
