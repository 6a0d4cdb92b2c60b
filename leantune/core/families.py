"""Where things are in common transformers families, so methods need no module names.

Each role maps to module-name suffixes (the ``targets`` form), or to one
full-match regex where no suffix is unambiguous (BERT's ``output.dense`` ends both
the attention and the FFN sub-blocks); ``block`` is the repeated transformer block.
A method's default targets name a role; :func:`role_targets` resolves it for the
model at hand and says what to set when the family is unknown.
"""

from __future__ import annotations

import re

from torch import nn

Pattern = list[str] | str

_LLAMA = {
    "attn_q": ["q_proj"], "attn_k": ["k_proj"], "attn_v": ["v_proj"], "attn_out": ["o_proj"],
    "attn_block": ["self_attn"], "ffn_block": ["mlp"], "ffn_in": ["gate_proj", "up_proj"],
    "ffn_act": ["up_proj"], "ffn_out": ["down_proj"], "norm": ["input_layernorm", "post_attention_layernorm", "norm"],
    "block": r"(.*\.)?layers\.\d+",
}
_GPT2 = {
    "attn_q": ["attn.c_attn"], "attn_k": ["attn.c_attn"], "attn_v": ["attn.c_attn"], "attn_out": ["attn.c_proj"],
    "attn_block": ["attn"], "ffn_block": ["mlp"], "ffn_in": ["mlp.c_fc"], "ffn_act": ["mlp.c_fc"],
    "ffn_out": ["mlp.c_proj"], "norm": ["ln_1", "ln_2", "ln_f"], "block": r"(.*\.)?h\.\d+",
}
# Post-LN BERT has no single FFN module: its output block ``BertOutput(ffn_hidden, input_tensor)``
# closes the FFN sub-block and receives the FFN input as its residual ``input_tensor``.
_BERT = {
    "attn_q": ["query"], "attn_k": ["key"], "attn_v": ["value"], "attn_out": ["attention.output.dense"],
    "attn_block": ["attention"], "ffn_block": r"(.*\.)?layer\.\d+\.output", "ffn_in": ["intermediate.dense"],
    "ffn_act": ["intermediate.dense"], "ffn_out": r"(.*\.)?layer\.\d+\.output\.dense", "norm": ["LayerNorm"],
    "block": r"(.*\.)?layer\.\d+",
}
_T5 = {
    "attn_q": ["SelfAttention.q", "EncDecAttention.q"], "attn_k": ["SelfAttention.k", "EncDecAttention.k"],
    "attn_v": ["SelfAttention.v", "EncDecAttention.v"], "attn_out": ["SelfAttention.o", "EncDecAttention.o"],
    "attn_block": ["SelfAttention", "EncDecAttention"], "ffn_block": ["DenseReluDense"],
    "ffn_in": ["wi", "wi_0", "wi_1"], "ffn_act": ["wi", "wi_1"], "ffn_out": ["wo"],
    "norm": ["layer_norm", "final_layer_norm"], "block": r"(.*\.)?block\.\d+",
}

FAMILIES: dict[str, dict[str, Pattern]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2"], _LLAMA),
    "gpt2": _GPT2,
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "distilbert_like", "electra"], _BERT),
    **dict.fromkeys(["t5", "mt5"], _T5),
}


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def role_targets(model: nn.Module, role: str, method: str = "this method") -> Pattern:
    """Module-name suffixes that play ``role`` in ``model``; a clear error if unknown."""
    kind = model_type(model)
    family = FAMILIES.get(kind or "")
    if family is None or role not in family or not family[role]:
        raise ValueError(
            f"{method} has no default for role {role!r} in model type {kind!r}; "
            f"set `targets=` to the module names to adapt (known families: {', '.join(sorted(FAMILIES))})"
        )
    entry = family[role]
    return entry if isinstance(entry, str) else list(entry)


def expand_roles(model: nn.Module, pattern: Pattern, method: str = "this method") -> Pattern:
    """``pattern`` (a ``targets`` value) with its ``@role`` entries resolved for ``model``.

    The result is a suffix list, or one full-match regex once any role is a regex.
    """
    if isinstance(pattern, str) and not pattern.startswith("@"):
        return pattern
    entries = [pattern] if isinstance(pattern, str) else pattern
    parts = [role_targets(model, t[1:], method) if t.startswith("@") else [t] for t in entries]
    if all(isinstance(p, list) for p in parts):
        return list(dict.fromkeys(s for p in parts for s in p))
    regexes = [p if isinstance(p, str) else "|".join(rf"(?:.*\.)?{re.escape(s)}" for s in p) for p in parts]
    return "|".join(f"(?:{r})" for r in regexes if r)


_BLOCK = re.compile(r"((?:.*?\.)?(?:layers|layer|h|block|blocks)\.\d+)(?:\.|$)")


def block_of(path: str) -> str | None:
    """Path of the repeated transformer block holding ``path`` (``model.layers.3``), or None outside blocks."""
    found = _BLOCK.match(path)
    return found.group(1) if found else None
