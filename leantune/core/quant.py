"""A quantized base: frozen Linear weights stored as 4-bit NF4 codes.

Quantization is a transform of the base module, independent of any delta:
:func:`quantize_modules` swaps a site's ``nn.Linear`` (or GPT-2 ``Conv1D``) for a
:class:`QuantLinear`, and any low-rank delta then runs beside it unchanged. The
storage is bitsandbytes' NF4 layout with QLoRA's double quantization (codes of the
row-major ``out × in`` weight, two per byte, first in the high nibble; one absmax
per block of 64, itself stored in 8 bits), so the same buffers run through
bitsandbytes' kernels on CUDA when it is importable and through the pure-PyTorch
de-quantization here everywhere else.

Merging never re-quantizes: :class:`QuantLowRank` de-quantizes the base into a
dense weight (with a warning) before adding its delta, and unmerging gives the
4-bit codes back untouched. Quantizing a module that holds merged weights is an error.
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .forms import LowRank
from .site import Site, base_module
from .weights import WeightView, weight_view

BLOCK = 64  # weights per absmax
ABSMAX_BLOCK = 256  # absmax values per second-level scale (double quantization)
# The 16 NF4 values of QLoRA (Dettmers et al., 2023) as published (and used by bitsandbytes):
# quantiles of N(0, 1), 8 for the positive half and 7 for the negative half plus an exact zero,
# scaled to [-1, 1]. tests/test_quant.py rebuilds them from the normal quantiles.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
)
# (packed NF4 codes uint8 [⌈n/2⌉], absmax codes uint8 [⌈n/64⌉], their scales fp32 [⌈n/16384⌉], offset fp32 [1])
Codes = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


@functools.cache
def _levels(device: torch.device) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=torch.float32, device=device)


@functools.cache
def _dynamic_levels(device: torch.device) -> torch.Tensor:
    """The 256 signed 8-bit "dynamic" values (Dettmers, 2016) QLoRA quantizes the absmax with:
    for exponent ``e`` = 0..6, ``2^e`` fraction midpoints of [0.1, 1] scaled by ``10^(e-6)``,
    both signs, plus 0 and 1 (bitsandbytes' ``create_dynamic_map``)."""
    values: list[float] = [0.0, 1.0]
    for e in range(7):
        bounds = torch.linspace(0.1, 1, 2**e + 1, dtype=torch.float32)
        means = 10 ** (e - 6) * ((bounds[:-1] + bounds[1:]) / 2)
        values += means.tolist() + (-means).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32, device=device)


def _nearest(x: torch.Tensor, levels: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax quantization of flat ``x``: (nearest level index per value, absmax per block)."""
    n = x.numel()
    blocks = F.pad(x, (0, (-n) % block)).view(-1, block)
    absmax = blocks.abs().amax(1)
    scaled = (blocks * (1.0 / absmax.clamp_min(1e-38))[:, None]).clamp_(-1, 1).view(-1)[: n + n % 2]
    return torch.bucketize(scaled, (levels[:-1] + levels[1:]) / 2).to(torch.uint8), absmax


def _expand(values: torch.Tensor, scales: torch.Tensor, block: int) -> torch.Tensor:
    n = values.numel()
    return (F.pad(values, (0, (-n) % block)).view(-1, block) * scales[:, None]).view(-1)[:n]


def nf4_quantize(weight: torch.Tensor) -> Codes:
    """NF4 codes of ``weight`` flattened row-major, with double-quantized absmax.

    Each value maps to the nearest NF4 level of ``value / absmax`` (absmax per
    block of 64); the absmax values, less their mean, are then stored as 8-bit
    dynamic codes with one fp32 scale per 256 (QLoRA's double quantization:
    0.516 bytes per weight instead of 0.5625). The layout is bitsandbytes'
    ``quantize_4bit(..., quant_type="nf4", compress_statistics=True)``.
    """
    codes, absmax = _nearest(weight.detach().reshape(-1).float(), _levels(weight.device), BLOCK)
    offset = absmax.mean()
    absmax_codes, scales = _nearest(absmax - offset, _dynamic_levels(weight.device), ABSMAX_BLOCK)
    return (codes[0::2] << 4) | codes[1::2], absmax_codes[: absmax.numel()], scales, offset.reshape(1)


def nf4_absmax(absmax_codes: torch.Tensor, scales: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The fp32 absmax per block of 64 that the double-quantized codes stand for."""
    return _expand(_dynamic_levels(absmax_codes.device)[absmax_codes.int()], scales.float(), ABSMAX_BLOCK) + offset


def nf4_dequantize(codes: Codes, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight that :func:`nf4_quantize` encoded, in ``dtype`` (computed in fp32)."""
    packed, absmax_codes, scales, offset = codes
    n = math.prod(shape)
    nibbles = torch.stack((packed >> 4, packed & 15), dim=1).view(-1)[:n]
    absmax = nf4_absmax(absmax_codes, scales, offset.float())
    return _expand(_levels(packed.device)[nibbles.int()], absmax, BLOCK).view(shape).to(dtype)


@functools.cache
def _bitsandbytes():
    try:
        import bitsandbytes
        import bitsandbytes.functional
    except ImportError:
        return None
    return bitsandbytes


class _NF4Linear(torch.autograd.Function):
    """``x Wᵀ`` with ``W`` de-quantized on the fly; only the codes (no new tensor) are kept for backward."""

    @staticmethod
    def forward(ctx, x, shape, *codes):
        ctx.shape = shape
        ctx.save_for_backward(*codes)
        return F.linear(x, nf4_dequantize(codes, shape, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        grad_x = grad_out @ nf4_dequantize(ctx.saved_tensors, ctx.shape, grad_out.dtype)
        return (grad_x, None, *(None for _ in ctx.saved_tensors))


STORAGE = ("packed", "absmax_codes", "absmax_scales", "absmax_offset")


class QuantLinear(nn.Linear):
    """A frozen Linear whose weight is stored as NF4 codes (the :data:`STORAGE` buffers).

    ``layout`` is the source module's (``"linear"`` or GPT-2's ``"conv1d_t"``): it
    only matters once a merge makes the weight dense again, which then takes the
    source layout, so a merged and unloaded model has its original state-dict
    shapes. The fp32 scales are stored as their raw bits (int32) so that
    ``model.to(torch.bfloat16)`` cannot round them (bitsandbytes keeps them fp32
    too); the compute dtype follows such moves. ``kernel = "torch"`` forces
    the pure-PyTorch path on CUDA (for reference comparisons); ``chunk_weights``
    bounds how much of the weight is de-quantized at once (:meth:`row_chunks`).
    """

    kernel: str = "auto"
    chunk_weights: int = 1 << 22

    def __init__(self, codes: Codes, out_features: int, in_features: int, bias: nn.Parameter | None,
                 layout: str, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.layout = layout
        self.compute_dtype = dtype
        packed, absmax_codes, scales, offset = codes
        self.register_buffer("packed", packed)
        self.register_buffer("absmax_codes", absmax_codes)
        self.register_buffer("absmax_scales", scales.float().view(torch.int32))
        self.register_buffer("absmax_offset", offset.float().view(torch.int32))
        self.register_parameter("bias", bias)
        self.merges = 0

    @classmethod
    def from_module(cls, module: nn.Module, codes: Codes | None = None) -> QuantLinear:
        """Quantize a Linear or GPT-2 Conv1D (or take ``codes`` of its replacement weight)."""
        view = weight_view(module)
        if view.kind not in ("linear", "conv1d_t"):
            raise TypeError(f"only Linear and GPT-2 Conv1D weights are quantized, not {type(module).__name__}")
        if codes is None:
            codes = nf4_quantize(module.weight if view.kind == "linear" else module.weight.T)
        return cls(codes, view.out_features, view.in_features, module.bias, view.kind, module.weight.dtype)

    def leantune_weight_view(self) -> WeightView:
        """What deltas see (core/weights.py asks for it): the source module's layout."""
        return WeightView(self.layout, self.out_features, self.in_features)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name != "weight":
                raise
            raise AttributeError(
                f"this {type(self).__name__} stores its weight as 4-bit NF4 codes (buffers {', '.join(STORAGE)}), "
                "not as a `weight`; read it with .dequantize(dtype)"
            ) from None

    def codes(self) -> Codes:
        return (self.packed, self.absmax_codes, self.absmax_scales.view(torch.float32),
                self.absmax_offset.view(torch.float32))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The logical ``out × in`` weight the codes stand for."""
        return nf4_dequantize(self.codes(), (self.out_features, self.in_features), dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "weight" in self._parameters:  # merged: a dense weight in the source layout
            if self.layout == "linear":
                return F.linear(x, self.weight, self.bias)
            out = x @ self.weight
            return out + self.bias if self.bias is not None else out
        bnb = _bitsandbytes() if x.is_cuda and self.kernel == "auto" else None
        parts = []
        for r0, r1 in self.row_chunks():
            codes, shape = self.chunk_codes(r0, r1), (r1 - r0, self.in_features)
            if bnb is not None:
                parts.append(bnb.matmul_4bit(x, codes[0].view(-1, 1).t(), self._bnb_state(codes, shape, x.dtype)))
            else:
                parts.append(_NF4Linear.apply(x, shape, *codes))
        out = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        return out + self.bias if self.bias is not None else out

    def row_chunks(self) -> list[tuple[int, int]]:
        """Row ranges of at most :attr:`chunk_weights` weights whose codes slice cleanly
        (starts on a multiple of 64 · 256 weights), so that forward and backward only ever
        de-quantize one chunk at a time: the transient stays small whatever the layer size."""
        step = ABSMAX_BLOCK * BLOCK // math.gcd(self.in_features, ABSMAX_BLOCK * BLOCK)
        rows = max(step, self.chunk_weights // self.in_features // step * step)
        return [(r, min(r + rows, self.out_features)) for r in range(0, self.out_features, rows)]

    def chunk_codes(self, r0: int, r1: int) -> Codes:
        """The :data:`Codes` of rows ``r0:r1`` (views of the buffers)."""
        packed, absmax_codes, scales, offset = self.codes()
        a, b = r0 * self.in_features, r1 * self.in_features
        per_scale = ABSMAX_BLOCK * BLOCK
        return (packed[a // 2: (b + 1) // 2], absmax_codes[a // BLOCK: -(-b // BLOCK)],
                scales[a // per_scale: -(-b // per_scale)], offset)

    def _bnb_state(self, codes: Codes, shape: tuple[int, int], dtype: torch.dtype):
        """bitsandbytes' nested (double-quantized) state over our buffers: nothing is copied."""
        functional = _bitsandbytes().functional
        _, absmax_codes, scales, offset = codes
        device = absmax_codes.device
        return functional.QuantState(
            absmax=absmax_codes, shape=torch.Size(shape), code=_levels(device), blocksize=BLOCK, quant_type="nf4",
            dtype=dtype, offset=offset.reshape(()),
            state2=functional.QuantState(absmax=scales, code=_dynamic_levels(device), blocksize=ABSMAX_BLOCK,
                                         dtype=torch.float32),
        )

    def _apply(self, fn, recurse: bool = True):
        super()._apply(fn, recurse)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return self

    # --- merging: de-quantize, never re-quantize ------------------------------------
    def begin_merge(self) -> None:
        """Give the module a dense weight (de-quantized) for deltas to merge into."""
        if self.merges == 0:
            warnings.warn(
                "merging into a 4-bit NF4 base de-quantizes it: the merged module holds a dense "
                f"{self.compute_dtype} weight and is not re-quantized (unmerge gives the 4-bit codes back)",
                UserWarning, stacklevel=4,
            )
            dense = self.dequantize()
            self.weight = nn.Parameter(dense if self.layout == "linear" else dense.T.contiguous(),
                                       requires_grad=False)
            for name in STORAGE:  # kept for unmerge, left out of the state dict
                self.register_buffer(name, self._buffers[name], persistent=False)
        self.merges += 1

    def end_merge(self) -> None:
        """Back to the 4-bit codes once no merged delta is left."""
        self.merges -= 1
        if self.merges == 0:
            del self.weight
            for name in STORAGE:
                self.register_buffer(name, self._buffers[name], persistent=True)


class QuantLowRank(LowRank):
    """A low-rank delta on a possibly quantized base: merging de-quantizes it first."""

    def merge(self, base: nn.Module) -> None:
        if isinstance(base, QuantLinear):
            base.begin_merge()
        super().merge(base)

    def unmerge(self, base: nn.Module) -> None:
        super().unmerge(base)
        if isinstance(base, QuantLinear):
            base.end_merge()


def replace_base(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` as the base (inside the site there, if one wraps it)."""
    current = model.get_submodule(path)
    if isinstance(current, Site):
        current.base = module
        return
    parent_path, _, attr = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, attr, module)


def quantize_modules(model: nn.Module, paths: list[str]) -> None:
    """Store the weights at ``paths`` as NF4 (modules already quantized are left as they are)."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    for path in paths:
        module = base_module(model, path)
        if isinstance(module, QuantLinear):
            if "weight" in module._parameters:
                raise ValueError(
                    f"{path} holds merged, de-quantized weights; quantizing them again would re-quantize a merged "
                    "model, which leantune never does. Keep the merged model dense, or quantize the original base "
                    "and load the adapter onto it"
                )
            continue
        if owners.get(id(module.weight), 0) > 1:
            raise ValueError(f"cannot quantize {path}: its weight is tied to another module's; add it to `exclude`")
        replace_base(model, path, QuantLinear.from_module(module))


def lq_decompose(weight: torch.Tensor, rank: int, iters: int) -> tuple[Codes, torch.Tensor, torch.Tensor]:
    """LQ-LoRA's split ``W ≈ Q + L`` with ``Q`` NF4 and ``L`` of rank ``rank``.

    Alternates ``Q = quantize(W − L)`` and ``L = SVD_rank(W − Q)`` ``iters`` times and
    returns the best pair seen, as the :data:`Codes` of ``Q`` and the factors
    ``(U_r √S_r, √S_r V_rᵀ)`` of ``L``.
    """
    w = weight.detach().float()
    low = torch.zeros_like(w)
    best = None
    for _ in range(iters):
        codes = nf4_quantize(w - low)
        residual = w - nf4_dequantize(codes, tuple(w.shape))
        u, s, vh = torch.linalg.svd(residual, full_matrices=False)
        root = s[:rank].sqrt()
        b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
        b, a = F.pad(b, (0, rank - b.shape[1])), F.pad(a, (0, 0, 0, rank - a.shape[0]))  # rank > min(out, in)
        error = torch.linalg.matrix_norm(residual - b @ a).item()
        if best is None or error < best[0]:
            best = (error, codes, b, a)
        low = b @ a
    return best[1], best[2], best[3]
