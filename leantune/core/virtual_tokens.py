"""Virtual tokens: prompts before the input and key/value prefixes in attention.

These deltas do not change what any module computes; they add positions the
caller never sees. They still live at a :class:`Site` — the model's input
embedding module — so ``disabled``, ``set_active``, several adapters at once,
saving and loading work as for every other delta. Two hooks on the top model,
installed once, do the rest for every method:

* before ``forward``: prepend the live prompts to the input embeddings, fill a
  ``DynamicCache`` with the live prefixes (transformers' own mechanism for past
  keys/values), and extend ``attention_mask``, ``labels`` (``-100``),
  ``token_type_ids`` and ``position_ids`` to match;
* after ``forward``: drop the prompt positions from per-token outputs, so logits
  line up with the caller's tokens.

A cache that already holds tokens means the virtual tokens are in it (the
decoding steps of ``generate``): only masks and positions are shifted then.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import MethodConfig
from .forms import Stack
from .site import Delta, Site, base_module, iter_base_modules
from .targets import resolve_targets


@dataclass(frozen=True)
class KVShape:
    """Key/value geometry of a model's attention layers (keys and values alike)."""

    layers: int
    heads: int
    head_dim: int

    @property
    def width(self) -> int:
        """Key (or value) width of one layer: PEFT's ``token_dim`` for prefixes."""
        return self.heads * self.head_dim


def kv_shape(model: nn.Module) -> KVShape:
    """The cache shape of a transformers model (grouped-query heads counted once)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    try:
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return KVShape(cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or heads, head_dim)
    except AttributeError as err:
        raise ValueError(
            f"cannot read the attention shape from this model's config ({err}); key/value prefixes need a "
            "transformers model with num_hidden_layers, num_attention_heads and hidden_size in its config"
        ) from err


class VirtualTokens(Delta):
    """A delta made of positions the caller never sees.

    ``n_prompt`` vectors from :meth:`prompt` go before the input embeddings;
    ``n_prefix`` keys/values per layer from :meth:`prefix` go before the keys and
    values of every attention layer; :meth:`update_embeddings` may change the
    caller's own token embeddings by position.
    """

    n_prompt: int = 0
    n_prefix: int = 0
    updates_embeddings: bool = False

    def prompt(self) -> torch.Tensor:
        """``n_prompt × hidden`` vectors prepended to the input embeddings."""
        raise NotImplementedError

    def prefix(self) -> torch.Tensor:
        """``layers × 2 × heads × n_prefix × head_dim`` keys (index 0) and values (index 1)."""
        raise NotImplementedError

    def update_embeddings(self, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """The caller's token embeddings (``batch × T × hidden``, at positions
        ``start .. start + T - 1`` of the caller's sequence), changed."""
        return embeds


class Prompt(VirtualTokens):
    """Free prompt vectors (HF PEFT's prompt tuning); the plain form other prompts fold to."""

    def __init__(self, initial: torch.Tensor) -> None:
        super().__init__()
        self.n_prompt = initial.shape[0]
        self.weight = nn.Parameter(initial.detach().clone())

    def prompt(self) -> torch.Tensor:
        return self.weight


class Prefix(VirtualTokens):
    """Per-layer key/value prefixes of length ``n`` in HF PEFT's layout.

    With ``projection_dim`` the prefixes are trained through PEFT's MLP
    (``Linear → tanh → Linear`` from ``n`` embeddings of the key width); without,
    they are free values, stored flat as ``n × (layers · 2 · key width)``.
    """

    def __init__(self, n: int, shape: KVShape, projection_dim: int | None = None,
                 flat: torch.Tensor | None = None) -> None:
        super().__init__()
        self.n_prefix = n
        self.shape = shape
        out = shape.layers * 2 * shape.width
        if projection_dim is None:
            self.weight = nn.Parameter(torch.randn(n, out) if flat is None else flat.detach().clone())
        else:
            self.embedding = nn.Parameter(torch.randn(n, shape.width))
            self.transform = nn.Sequential(nn.Linear(shape.width, projection_dim), nn.Tanh(),
                                           nn.Linear(projection_dim, out))

    def flat(self) -> torch.Tensor:
        """``n × (layers · 2 · heads · head_dim)``: what PEFT saves as ``prompt_embeddings``."""
        return self.transform(self.embedding) if hasattr(self, "transform") else self.weight

    def prefix(self) -> torch.Tensor:
        s = self.shape
        return self.flat().view(self.n_prefix, s.layers, 2, s.heads, s.head_dim).permute(1, 2, 3, 0, 4)

    def folded(self) -> Prefix:
        if not hasattr(self, "transform"):
            return self
        with torch.no_grad():
            return Prefix(self.n_prefix, self.shape, flat=self.flat())


def initial_prompt(embedding: nn.Module, n: int, init: str, ids: list[int] | None) -> torch.Tensor:
    """``n × hidden`` starting vectors: N(0, 1) (``random``, as PEFT), rows of the
    vocabulary (``vocab``), or the embeddings of ``ids`` repeated/trimmed to ``n`` (``text``)."""
    weight = embedding.weight
    if init == "random":
        return torch.randn(n, weight.shape[1])
    if init == "vocab":
        ids = torch.randint(0, weight.shape[0], (n,)).tolist()
    elif not ids:
        raise ValueError("init='text' needs the token ids of the text; pass init_text= and tokenizer=")
    ids = (ids * math.ceil(n / len(ids)))[:n]
    with torch.no_grad():
        return embedding(torch.tensor(ids, device=weight.device)).detach().float().cpu()


# --- locating the input embeddings ---------------------------------------------------
def input_embedding_path(model: nn.Module) -> str:
    """Path of ``model.get_input_embeddings()``; a clear error for models without one."""
    get = getattr(model, "get_input_embeddings", None)
    module = get() if callable(get) else None
    if isinstance(module, Site):
        module = module.base
    if not isinstance(module, nn.Embedding):
        raise ValueError(
            f"{type(model).__name__} has no input embedding layer (get_input_embeddings()); prompts and prefixes "
            "need a transformers model that accepts inputs_embeds"
        )
    for path, m in iter_base_modules(model):
        if m is module:
            return path
    raise ValueError(f"the input embeddings of {type(model).__name__} are not a submodule of it")


def live_virtual_tokens(model: nn.Module) -> list[VirtualTokens]:
    """The virtual-token deltas taking part in the next forward pass, in activation order."""
    get = getattr(model, "get_input_embeddings", None)
    site = get() if callable(get) else None
    if not isinstance(site, Site):
        return []
    live = []
    for delta in site.live_deltas():
        live.extend(p for p in (delta.parts if isinstance(delta, Stack) else [delta]) if isinstance(p, VirtualTokens))
    return live


def _has_virtual_tokens(model: nn.Module) -> bool:
    get = getattr(model, "get_input_embeddings", None)
    site = get() if callable(get) else None
    return isinstance(site, Site) and any(
        isinstance(p, VirtualTokens)
        for d in site.deltas.values() for p in (d.parts if isinstance(d, Stack) else [d])
    )


# --- the two model-level hooks -----------------------------------------------------------
_STATE = "_leantune_virtual_call"  # (prompt positions inserted, caller length, caller wanted a tuple)
# The key/value cache keyword: transformers 5.25 renamed ``past_key_values`` to ``cache`` (the old name
# still works there, with a warning, until 5.40).
_CACHE_KWARGS = ("cache", "past_key_values")


def cache_kwarg(model: nn.Module) -> str:
    """The keyword that carries the key/value cache into ``model``, read from its forward or, for a
    head that passes it on in ``**kwargs`` (BERT's classifiers), its backbone's."""
    return _cache_kwarg(type(model), type(getattr(model, "base_model", model)))


@functools.cache
def _cache_kwarg(*classes: type) -> str:
    for cls in classes:
        params = inspect.signature(cls.forward).parameters
        found = next((name for name in _CACHE_KWARGS if name in params), None)
        if found:
            return found
    return "past_key_values"  # the name every transformers 5.x release accepts


def install_hooks(model: nn.Module, prompts: bool, prefixes: bool) -> None:
    """Check that ``model`` can take virtual tokens and hook it once (idempotent)."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            f"{type(model).__name__} is an encoder-decoder model; leantune's prompts and prefixes support "
            "decoder-only and encoder-only models"
        )
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for needed, wanted in (("inputs_embeds", prompts), (cache_kwarg(model), prefixes)):
        if wanted and needed not in params and not takes_any:
            raise ValueError(f"{type(model).__name__}.forward takes no {needed}, which this method needs")
    if _before_forward not in model._forward_pre_hooks.values():
        model.register_forward_pre_hook(_before_forward, with_kwargs=True)
        model.register_forward_hook(_after_forward, with_kwargs=True)


def _remove_hooks(model: nn.Module) -> None:
    for hooks, fn in ((model._forward_pre_hooks, _before_forward), (model._forward_hooks, _after_forward)):
        for key in [k for k, v in hooks.items() if v is fn]:
            del hooks[key]


def _as_kwargs(model: nn.Module, args: tuple, kwargs: dict) -> dict:
    if not args:
        return dict(kwargs)
    names = [n for n, p in inspect.signature(model.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(names):
        raise TypeError(f"{type(model).__name__}.forward takes {len(names)} positional arguments, got {len(args)}")
    return {**dict(zip(names, args, strict=False)), **kwargs}


def _prepend(t: torch.Tensor, n: int, value: float) -> torch.Tensor:
    return torch.cat([t.new_full((*t.shape[:-1], n), value), t], dim=-1)


def _fill_prefix(cache: Any, prefixes: list[torch.Tensor], batch: int, dtype: torch.dtype) -> None:
    kv = torch.cat(prefixes, dim=3).to(dtype)  # layers × 2 × heads × n × head_dim
    for layer in range(kv.shape[0]):
        k, v = (t.unsqueeze(0).expand(batch, -1, -1, -1) for t in kv[layer])
        cache.update(k, v, layer)


def _before_forward(model: nn.Module, args: tuple, kwargs: dict):
    model.__dict__[_STATE] = None
    live = live_virtual_tokens(model)
    if not live:
        if not _has_virtual_tokens(model):  # every such adapter was deleted or unloaded
            _remove_hooks(model)
        return None
    kwargs = _as_kwargs(model, args, kwargs)
    ids, embeds = kwargs.get("input_ids"), kwargs.get("inputs_embeds")
    ref = embeds if embeds is not None else ids
    if ref is None:
        raise ValueError("prompts and prefixes need input_ids or inputs_embeds in the model call")
    batch, length = ref.shape[:2]
    n_prompt = sum(d.n_prompt for d in live)
    n_prefix = sum(d.n_prefix for d in live)
    n_virtual = n_prompt + n_prefix
    cache = next((kwargs[k] for k in _CACHE_KWARGS if kwargs.get(k) is not None), None)  # either name
    past = cache.get_seq_length() if cache is not None else 0
    first = past == 0  # otherwise the cache already holds the virtual tokens (decoding steps)
    inserted = n_prompt if first else 0
    dtype = model.get_input_embeddings().weight.dtype

    if first and n_prefix:
        checkpointing = getattr(model, "is_activation_checkpointing", None)  # transformers >= 5.x name
        if checkpointing is None:
            checkpointing = getattr(model, "is_gradient_checkpointing", False)
        if model.training and checkpointing:
            raise ValueError("key/value prefixes do not work with gradient checkpointing; disable it for this model")
        if cache is None:
            from transformers import DynamicCache

            for name in _CACHE_KWARGS:  # a None under the other name would make transformers warn
                kwargs.pop(name, None)
            cache = kwargs[cache_kwarg(model)] = DynamicCache(config=model.config)
        _fill_prefix(cache, [d.prefix() for d in live if d.n_prefix], batch, dtype)

    if inserted or any(d.updates_embeddings for d in live):
        if embeds is None:
            embeds = model.get_input_embeddings()(ids)
        start = 0 if first else past - n_virtual
        for d in live:
            embeds = d.update_embeddings(embeds, start)
        if inserted:
            prompts = torch.cat([d.prompt() for d in live if d.n_prompt]).to(embeds.dtype)
            embeds = torch.cat([prompts.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
        kwargs["inputs_embeds"], kwargs["input_ids"] = embeds, None

    mask = kwargs.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("prompts and prefixes need a 2-D attention_mask (batch × tokens) or none")
        kwargs["attention_mask"] = _prepend(mask, n_virtual, 1)
    if inserted:
        labels = kwargs.get("labels")  # per-token class ids (LM, token classification) get -100 for the prompt
        if isinstance(labels, torch.Tensor) and not labels.is_floating_point() and labels.dim() >= 2 \
                and labels.shape[1] == length:
            kwargs["labels"] = torch.cat([labels.new_full((batch, inserted, *labels.shape[2:]), -100), labels], 1)
        if kwargs.get("token_type_ids") is not None:
            kwargs["token_type_ids"] = _prepend(kwargs["token_type_ids"], inserted, 0)
        for key in ("start_positions", "end_positions"):  # question answering: spans move with the tokens
            if kwargs.get(key) is not None:
                kwargs[key] = kwargs[key] + inserted
    positions = kwargs.get("position_ids")
    if positions is not None:  # the virtual tokens take positions 0 .. n_virtual - 1
        if inserted:
            virtual = torch.arange(n_prompt, device=positions.device, dtype=positions.dtype)
            positions = torch.cat([virtual.expand(*positions.shape[:-1], -1), positions + n_prompt], dim=-1)
            kwargs["position_ids"] = positions + n_prefix
        else:
            kwargs["position_ids"] = positions + n_virtual
    want_tuple = kwargs.get("return_dict") is False
    if want_tuple:
        kwargs["return_dict"] = True
    model.__dict__[_STATE] = (inserted, length, want_tuple)
    return (), kwargs


# Per-token outputs that carry the prompt positions (dimension 1), with their rank.
_PER_TOKEN = {"logits": 3, "last_hidden_state": 3, "start_logits": 2, "end_logits": 2}


def _after_forward(model: nn.Module, args: tuple, kwargs: dict, output: Any):
    state = model.__dict__.get(_STATE)
    if state is None:
        return None
    inserted, length, want_tuple = state

    def strip(t: Any, rank: int) -> Any:
        if isinstance(t, torch.Tensor) and t.dim() == rank and t.shape[1] == inserted + length:
            return t[:, inserted:]
        return t

    if inserted and isinstance(output, dict):  # transformers' ModelOutput
        for key, rank in _PER_TOKEN.items():
            if output.get(key) is not None:
                output[key] = strip(output[key], rank)
        if output.get("hidden_states") is not None:
            output["hidden_states"] = tuple(strip(h, 3) for h in output["hidden_states"])
    return output.to_tuple() if want_tuple else output


# --- what every prompt/prefix method's config shares ------------------------------------
_HEAD_TASKS = {"ForCausalLM": "CAUSAL_LM", "ForSequenceClassification": "SEQ_CLS",
               "ForTokenClassification": "TOKEN_CLS", "ForQuestionAnswering": "QUESTION_ANS"}


def peft_task_of(model: nn.Module) -> str:
    """HF PEFT's task type for a transformers model class (``LlamaForCausalLM`` → ``CAUSAL_LM``)."""
    name = type(model).__name__
    return next((task for suffix, task in _HEAD_TASKS.items() if name.endswith(suffix)), "FEATURE_EXTRACTION")


@dataclass
class VirtualTokenConfig(MethodConfig):
    """Methods that add virtual tokens act at the model's input embeddings
    (``get_input_embeddings()``); ``targets`` may only name that module."""

    site_types: ClassVar[tuple[type, ...]] = (nn.Embedding,)
    peft_prompt_learning: ClassVar[bool] = True
    uses_prefix: ClassVar[bool] = False

    def resolved_targets(self, model: nn.Module) -> str | list[str]:
        path = input_embedding_path(model)
        if self.targets is not None:
            chosen = resolve_targets(model, super().resolved_targets(model), self.exclude, method=self.name)
            if chosen != [path]:
                raise ValueError(f"{self.name} acts at the model's input embeddings ({path}), not at "
                                 f"{', '.join(chosen)}; leave `targets` unset")
        return [path]

    def prepare(self, model: nn.Module, paths: list[str], calibration: Iterable[dict] | None) -> None:
        path = paths[0]
        install_hooks(model, prompts=not self.uses_prefix, prefixes=self.uses_prefix)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        n, limit = getattr(self, "num_virtual_tokens", 0), getattr(cfg, "max_position_embeddings", None)
        if limit is not None and n >= limit:
            raise ValueError(f"{self.name}: num_virtual_tokens={n} leaves no room for input in this model's "
                             f"{limit} positions; use fewer virtual tokens")
        self._facts = {"num_layers": getattr(cfg, "num_hidden_layers", None),
                       "num_attention_heads": getattr(cfg, "num_attention_heads", None),
                       "token_dim": base_module(model, path).embedding_dim}
        if self.task is None:  # PEFT applies prompts only for a task type: name the model's own
            self._facts["task_type"] = peft_task_of(model)
        if self.uses_prefix:
            self._kv = kv_shape(model)
            self._facts.update(token_dim=self._kv.width, num_attention_heads=self._kv.heads)

    def _carry(self, other: VirtualTokenConfig) -> VirtualTokenConfig:
        """``other`` with the model facts read by :meth:`prepare` (for configs made by ``folded``)."""
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k in ("_facts", "_kv")})
        return other

    def common(self) -> dict[str, Any]:
        """The fields every method has, to build a related config."""
        return {"targets": self.targets, "exclude": self.exclude, "modules_to_save": self.modules_to_save,
                "task": self.task}

    def peft_config(self, paths: list[str]) -> dict[str, Any]:
        return {**self._facts, "num_transformer_submodules": 1}

    @staticmethod
    def check_peft_config(cfg: dict[str, Any]) -> None:
        if (cfg.get("num_transformer_submodules") or 1) != 1:
            raise ValueError("this PEFT adapter is for an encoder-decoder model, which leantune's prompts do not support")


INITS = ("random", "vocab", "text")


@dataclass
class PromptConfig(VirtualTokenConfig):
    """Fields of every method with a prompt before the input.

    num_virtual_tokens: prompt length. init: ``"random"`` (N(0, 1), as HF PEFT),
    ``"vocab"`` (embeddings of random vocabulary tokens) or ``"text"`` (the
    embeddings of ``init_text``, repeated or trimmed to length, tokenised with
    ``tokenizer`` — an object or a name/path for ``AutoTokenizer``; only its name
    is kept, the token ids go to ``init_ids``).
    """

    num_virtual_tokens: int = 20
    init: str = "random"
    init_text: str | None = None
    tokenizer: Any = None
    init_ids: list[int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_virtual_tokens, int) or self.num_virtual_tokens <= 0:
            raise ValueError(f"{self.name}: num_virtual_tokens must be a positive integer, got {self.num_virtual_tokens!r}")
        if self.init not in INITS:
            raise ValueError(f"{self.name}: unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.init == "text" and not self.init_ids:
            if not self.init_text or self.tokenizer is None:
                raise ValueError(f"{self.name}: init='text' needs init_text= and tokenizer= (an object or a name)")
            tokenizer = self.tokenizer
            if isinstance(tokenizer, str):
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(tokenizer)
            self.init_ids = list(tokenizer(self.init_text)["input_ids"])
        if self.tokenizer is not None and not isinstance(self.tokenizer, str):
            self.tokenizer = getattr(self.tokenizer, "name_or_path", None) or None

    def initial(self, embedding: nn.Module) -> torch.Tensor:
        """The starting prompt, read from the model's input embeddings."""
        return initial_prompt(embedding, self.num_virtual_tokens, self.init, self.init_ids)
