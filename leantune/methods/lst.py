"""LST: Ladder Side-Tuning (Sung et al., 2022). Site: every block's hidden state; form: a side network.

The frozen backbone runs as usual; nothing that requires grad enters it, so autograd records
none of it. Each block's delta is a rung of the ladder: it reads the block's input ``h_i``
(detached) and steps a side network of width d/k by one block,
``s_i = side_i(μ_i · down_i(h_i) + (1 − μ_i) · s_{i−1})``, ``μ_i = sigmoid(α_i / T)``
(``s_0 = side_0(down_0(h_0))``), where ``side_i`` is a structurally pruned copy of block ``i``.
The last rung adds ``up(s_L)`` (zero at init) to the last block's output, the hidden state the
head reads (through the final norm where the family has one).

Pruning keeps the channels whose weights have the largest L1 norm (Li et al., 2017, as the
paper): the d/k hidden channels, chosen once over all blocks so the side residual stream means
the same everywhere (``down_i`` starts as their selection); per block, the FFN channels and, in
every head, the head's channels (RoPE channels in rotation pairs, the cosines sliced to match).
Decoding works: the side blocks keep their own key/value cache beside the backbone's.

Why longer than ~150 lines — the shared parts lacked: (1) a post hook that sees the site's call
arguments (a side block needs the mask, position embeddings and cache its backbone block got):
added as ``Delta.post_call`` in core/site.py; (2) a map of which channels each block weight holds
(core/families.py names modules, not channel layouts), which structured pruning needs: ``FAMILIES``
below, to move to core once a second method prunes structurally.
"""

from __future__ import annotations

import copy
import functools
import inspect
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from ..core.families import model_type
from ..core.site import Delta, base_module
from ..engine.compress import BITS, compressed_linear
from ..registry import register

# What blocks call their key/value cache: ``cache`` from transformers 5.25 on, before that the rest.
_CACHES = ("cache", "past_key_values", "past_key_value", "layer_past")


@dataclass(frozen=True)
class Family:
    """How to prune a family's block. ``roles``: module path in the block -> channel role of each
    weight dim, (out, in) in Linear layout: ``d`` hidden, ``f`` FFN, ``q``/``k``/``v`` per-head
    channels, ``o`` attention output (v's channels), ``qk`` one head's q/k channels, ``qkv`` fused."""

    roles: dict[str, tuple[str, ...]]
    ffn: str = "intermediate_size"
    kv_heads: str | None = None
    own_head_dim: bool = False  # the config sets head_dim (else hidden size / heads)
    rotary: bool = False  # rotate-half RoPE: q/k channel j pairs with j + head_dim / 2
    conv1d: bool = False  # weights stored (in, out)


_LLAMA = Family({"self_attn.q_proj": ("q", "d"), "self_attn.k_proj": ("k", "d"), "self_attn.v_proj": ("v", "d"),
                 "self_attn.o_proj": ("d", "o"), "self_attn.q_norm": ("qk",), "self_attn.k_norm": ("qk",),
                 "mlp.gate_proj": ("f", "d"), "mlp.up_proj": ("f", "d"), "mlp.down_proj": ("d", "f"),
                 "input_layernorm": ("d",), "post_attention_layernorm": ("d",)},
                kv_heads="num_key_value_heads", own_head_dim=True, rotary=True)
_GPT2 = Family({"ln_1": ("d",), "attn.c_attn": ("qkv", "d"), "attn.c_proj": ("d", "o"), "ln_2": ("d",),
                "mlp.c_fc": ("f", "d"), "mlp.c_proj": ("d", "f")}, ffn="n_inner", conv1d=True)
_BERT = Family({"attention.self.query": ("q", "d"), "attention.self.key": ("k", "d"),
                "attention.self.value": ("v", "d"), "attention.output.dense": ("d", "o"),
                "attention.output.LayerNorm": ("d",), "intermediate.dense": ("f", "d"),
                "output.dense": ("d", "f"), "output.LayerNorm": ("d",)})
FAMILIES = {**dict.fromkeys(["llama", "mistral", "qwen2", "qwen3"], _LLAMA), "gpt2": _GPT2,
            **dict.fromkeys(["bert", "roberta", "xlm-roberta", "electra"], _BERT)}


def family_of(model: nn.Module) -> Family:
    kind = model_type(model)
    if kind not in FAMILIES:
        raise ValueError(f"lst initialises its side network from a structurally pruned copy of the backbone's "
                         f"blocks and knows how to prune {', '.join(sorted(FAMILIES))}, not model type {kind!r}")
    return FAMILIES[kind]


def top(score: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the ``n`` largest scores, in order (so channel pairs and heads keep their layout)."""
    return score.topk(n).indices.sort().values


def per_head(channels: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """The same ``channels`` of each of ``heads`` heads, as flat indices."""
    return (torch.arange(heads, device=channels.device)[:, None] * head_dim + channels).flatten()


def block_weights(block: nn.Module, fam: Family) -> dict[str, tuple[torch.Tensor, tuple[str, ...]]]:
    """The block's own parameters (through sites other adapters put in it), Linear layout, with roles."""
    out = {}
    for name, p in block.named_parameters():
        if ".deltas." in f".{name}":
            continue
        name = name.replace(".base.", ".")
        roles = fam.roles.get(name.rpartition(".")[0])
        if roles is None:
            raise ValueError(f"lst cannot prune {type(block).__name__} structurally: it does not know which "
                             f"channels {name} holds")
        out[name] = (p.detach().T if fam.conv1d and p.ndim == 2 else p.detach(), roles[: p.ndim])
    return out


class Rail:
    """What one side network's rungs pass along: the side state, and a side key/value cache per
    backbone cache (decoding). Copies and pickles start empty."""

    def __init__(self) -> None:
        self.state: torch.Tensor | None = None
        self.caches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __reduce__(self) -> tuple:
        return Rail, ()

    def cache_for(self, backbone_cache: Any) -> Any:
        from transformers import DynamicCache

        if backbone_cache not in self.caches:
            self.caches[backbone_cache] = DynamicCache()
        return self.caches[backbone_cache]


@functools.cache
def _signature(cls: type) -> inspect.Signature:
    return inspect.signature(cls.forward)


class Rung(Delta):
    """One block's ladder: steps the side network; the last rung also adds ``up(s)`` to the output."""

    def __init__(self, side: nn.Module, down: nn.Linear, up: nn.Linear | None, gated: bool,
                 rope: torch.Tensor | None, temperature: float, rail: Rail, ladder_bits: int | None = None) -> None:
        super().__init__()
        self.side, self.down, self.up, self.ladder_bits = side, down, up, ladder_bits
        self.alpha = nn.Parameter(torch.zeros(1, dtype=down.weight.dtype)) if gated else None
        self.register_buffer("rope", rope)
        self.temperature, self.rail = temperature, rail

    def post_call(self, base: nn.Module, x: torch.Tensor, h: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        sig = _signature(type(base))
        call: dict[str, Any] = {}
        for name, value in list(sig.bind(base, x, *args, **kwargs).arguments.items())[2:]:
            is_var = sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD
            call.update(value if is_var else {name: value})
        for name in _CACHES:  # the side blocks write their own cache, never the backbone's
            if call.get(name) is not None:
                call[name] = self.rail.cache_for(call[name])
        if self.rope is not None and call.get("position_embeddings") is not None:
            call["position_embeddings"] = tuple(t[..., self.rope] for t in call["position_embeddings"])
        z = compressed_linear(x.detach(), self.down, self.ladder_bits)
        if self.alpha is not None:
            mu = torch.sigmoid(self.alpha / self.temperature)
            z = mu * z + (1 - mu) * self.rail.state
        s = self.side(z, **call)
        s = s[0] if isinstance(s, tuple) else s
        if self.up is None:
            self.rail.state = s
            return h
        self.rail.state = None  # hold no graph between forward passes
        return h + self.up(s)


@register
@dataclass
class LST(MethodConfig):
    """LST (Sung et al., 2022): a side network of width d / ``reduction`` reads every block's hidden
    state through gated down-projections and adds its up-projected output (zero at init) to the
    backbone's last hidden state; the backbone keeps no activations for backward. Side blocks start
    as a structurally pruned copy of the backbone's. ``temperature``: T of the gates ``sigmoid(α/T)``.
    ``ladder_bits`` (8 or 4): keep the ladders' full-width inputs quantized for their weight
    gradient (engine/compress.py; exact forward, approximate ladder gradient), off by default.
    ``heads``: ``"whole"`` keeps 1/k of the heads whole, ``"narrow"`` every head narrowed to 1/k of
    its channels, ``"auto"`` (default) whole heads where k divides the head counts. Narrow heads
    cost the side network as much attention time as the backbone's (H100, 1B Llama: 101k
    tokens/s against 117–123k with whole heads).
    """

    reduction: int = 8
    temperature: float = 0.1
    ladder_bits: int | None = None
    heads: str = "auto"

    name: ClassVar[str] = "lst"
    mergeable: ClassVar[bool] = False
    default_targets: ClassVar[str | list[str]] = "@block"
    site_types: ClassVar[tuple[type, ...]] = (nn.Module,)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.reduction, int) or self.reduction < 1:
            raise ValueError(f"lst: reduction must be a positive integer, got {self.reduction!r}")
        if not self.temperature > 0:
            raise ValueError(f"lst: temperature must be positive, got {self.temperature!r}")
        if self.heads not in ("auto", "whole", "narrow"):
            raise ValueError(f"lst: heads must be 'auto', 'whole' or 'narrow', got {self.heads!r}")
        if self.ladder_bits is not None and self.ladder_bits not in BITS:
            raise ValueError(f"lst: ladder_bits must be one of {BITS} or None, got {self.ladder_bits!r}")

    def resolved_targets(self, model: nn.Module) -> str | list[str]:
        family_of(model)
        return super().resolved_targets(model)

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        fam, cfg, k = family_of(model), model.config, self.reduction
        d, heads = cfg.hidden_size, cfg.num_attention_heads
        kv, hd = getattr(cfg, fam.kv_heads or "", None) or heads, getattr(cfg, "head_dim", None) or d // heads
        f = getattr(cfg, fam.ffn, None) or 4 * d
        if d % k:
            raise ValueError(f"lst: reduction={k} must divide the hidden size {d} (and not exceed it)")
        divides = heads % k == 0 and kv % k == 0
        if self.heads == "whole" and not divides:
            raise ValueError(f"lst: heads='whole' needs reduction={k} to divide the {heads} query and {kv} key/value "
                             "heads; use heads='narrow' (every head, narrowed) or 'auto'")
        whole = self.heads == "whole" or (self.heads == "auto" and divides)
        if not whole and not fam.own_head_dim and (d // k) % heads:
            raise ValueError(f"lst: reduction={k} leaves {d // k} side channels, not a multiple of the {heads} heads")
        side_hd = hd if whole else 2 * max(1, hd // (2 * k)) if fam.rotary else hd // k
        weights = [block_weights(base_module(model, p), fam) for p in paths]
        scores = [self._scores(w, heads * hd, kv * hd) for w in weights]
        hidden = top(sum(s["d"] for s in scores), d // k)
        side_cfg = copy.deepcopy(cfg)
        side_cfg.hidden_size = d // k
        setattr(side_cfg, fam.ffn, max(1, f // k))
        if fam.own_head_dim:
            side_cfg.head_dim = side_hd
        if whole:
            side_cfg.num_attention_heads = heads // k
            if fam.kv_heads:
                setattr(side_cfg, fam.kv_heads, kv // k)
        rail, self._made = Rail(), {}
        for i, (path, w, s) in enumerate(zip(paths, weights, scores, strict=True)):
            dtype = next(iter(w.values()))[0].dtype
            if whole:
                idx, rope = self._whole_heads(s, heads, kv, hd, k), None
            else:
                idx, rope = self._narrow_heads(s, heads, kv, hd, side_hd, fam.rotary)
            idx.update(d=hidden, f=top(s["f"], max(1, f // k)))
            idx["qkv"] = torch.cat([idx["q"], idx["k"] + heads * hd, idx["v"] + (heads + kv) * hd])
            state = {}
            for name, (t, roles) in w.items():
                for dim, role in enumerate(roles):
                    t = t.index_select(dim, idx[role])
                state[name] = t.T if fam.conv1d and t.ndim == 2 else t
            side = type(base_module(model, path))(side_cfg, layer_idx=i).to(dtype)
            side.load_state_dict(state)
            down, up = nn.Linear(d, d // k, dtype=dtype), nn.Linear(d // k, d, dtype=dtype) if i == len(paths) - 1 else None
            with torch.no_grad():
                down.weight.zero_()[torch.arange(d // k), hidden.cpu()] = 1
                down.bias.zero_()
                if up is not None:
                    up.weight.zero_()
                    up.bias.zero_()
            self._made[path] = Rung(side.train(model.training), down, up, i > 0, rope, self.temperature, rail,
                                    self.ladder_bits)

    @staticmethod
    def _whole_heads(s: dict[str, torch.Tensor], heads: int, kv: int, hd: int, k: int) -> dict[str, torch.Tensor]:
        """Channel indices keeping the ``kv / k`` key/value heads (with their query groups) of largest norm."""
        group = heads // kv
        q_score = s["q"].view(heads, hd).sum(1) + s["o"].view(heads, hd).sum(1)
        kv_score = s["k"].view(kv, hd).sum(1) + s["v"].view(kv, hd).sum(1) + q_score.view(kv, group).sum(1)
        kept_kv = top(kv_score, kv // k)
        kept_q = (kept_kv[:, None] * group + torch.arange(group, device=kept_kv.device)).flatten()
        every = torch.arange(hd, device=kept_kv.device)
        q, kvs = (kept_q[:, None] * hd + every).flatten(), (kept_kv[:, None] * hd + every).flatten()
        return {"qk": every, "q": q, "o": q, "k": kvs, "v": kvs}

    @staticmethod
    def _narrow_heads(s: dict[str, torch.Tensor], heads: int, kv: int, hd: int, side_hd: int,
                      rotary: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Channel indices keeping every head, each narrowed to its ``side_hd`` channels of largest norm;
        and the RoPE channels to slice the cosines by (rotary families)."""
        qk = s["q"].view(heads, hd).sum(0) + s["k"].view(kv, hd).sum(0)
        if rotary:  # keep (j, j + hd/2) pairs: the kept channels rotate at their own frequencies
            j = top(qk.view(2, hd // 2).sum(0), side_hd // 2)
            qk_idx = torch.cat([j, j + hd // 2])
        else:
            qk_idx = top(qk, side_hd)
        vo_idx = top(s["v"].view(kv, hd).sum(0) + s["o"].view(heads, hd).sum(0), side_hd)
        idx = {"qk": qk_idx, "q": per_head(qk_idx, heads, hd), "k": per_head(qk_idx, kv, hd),
               "v": per_head(vo_idx, kv, hd), "o": per_head(vo_idx, heads, hd)}
        return idx, qk_idx.cpu() if rotary else None

    @staticmethod
    def _scores(weights: dict[str, tuple[torch.Tensor, tuple[str, ...]]], q: int, kv: int) -> dict[str, torch.Tensor]:
        """Per role, the summed L1 norm of the weights that read or write each channel."""
        s: dict[str, Any] = {}
        for t, roles in weights.values():
            if t.ndim == 2:
                a = t.float().abs()
                for role, norm in zip(roles, (a.sum(1), a.sum(0)), strict=True):
                    parts = zip("qkv", norm.split([q, kv, kv]), strict=True) if role == "qkv" else [(role, norm)]
                    for r, n in parts:
                        s[r] = s.get(r, 0) + n
        return s

    def make_delta(self, path: str, module: nn.Module) -> Rung:
        return self._made.pop(path)
