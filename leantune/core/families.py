"""Where things are in common transformers families, so methods need no module names.

Each role maps to module-name suffixes (the ``targets`` form). A method's default
targets name a role; :func:`role_targets` resolves it for the model at hand and
says what to set when the family is unknown.
"""

from __future__ import annotations

from torch import nn

_LLAMA = {
    "attn_q": ["q_proj"], "attn_k": ["k_proj"], "attn_v": ["v_proj"], "attn_out": ["o_proj"],
    "attn_block": ["self_attn"], "ffn_block": ["mlp"], "ffn_in": ["gate_proj", "up_proj"],
    "ffn_act": ["up_proj"], "ffn_out": ["down_proj"], "norm": ["input_layernorm", "post_attention_layernorm", "norm"],
}
_GPT2 = {
    "attn_q": ["attn.c_attn"], "attn_k": ["attn.c_attn"], "attn_v": ["attn.c_attn"], "attn_out": ["attn.c_proj"],
    "attn_block": ["attn"], "ffn_block": ["mlp"], "ffn_in": ["mlp.c_fc"], "ffn_act": ["mlp.c_fc"],
    "ffn_out": ["mlp.c_proj"], "norm": ["ln_1", "ln_2", "ln_f"],
}
_BERT = {
    "attn_q": ["query"], "attn_k": ["key"], "attn_v": ["value"], "attn_out": ["attention.output.dense"],
    "attn_block": ["attention"], "ffn_block": [], "ffn_in": ["intermediate.dense"], "ffn_act": ["intermediate.dense"],
    "ffn_out": ["output.dense"], "norm": ["LayerNorm"],
}
_T5 = {
    "attn_q": ["SelfAttention.q", "EncDecAttention.q"], "attn_k": ["SelfAttention.k", "EncDecAttention.k"],
    "attn_v": ["SelfAttention.v", "EncDecAttention.v"], "attn_out": ["SelfAttention.o", "EncDecAttention.o"],
    "attn_block": ["SelfAttention", "EncDecAttention"], "ffn_block": ["DenseReluDense"],
    "ffn_in": ["wi", "wi_0", "wi_1"], "ffn_act": ["wi", "wi_1"], "ffn_out": ["wo"],
    "norm": ["layer_norm", "final_layer_norm"],
}

FAMILIES: dict[str, dict[str, list[str]]] = {
    **dict.fromkeys(["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo", "olmo2"], _LLAMA),
    "gpt2": _GPT2,
    **dict.fromkeys(["bert", "roberta", "xlm-roberta", "distilbert_like", "electra"], _BERT),
    **dict.fromkeys(["t5", "mt5"], _T5),
}


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def role_targets(model: nn.Module, role: str, method: str = "this method") -> list[str]:
    """Module-name suffixes that play ``role`` in ``model``; a clear error if unknown."""
    kind = model_type(model)
    family = FAMILIES.get(kind or "")
    if family is None or role not in family or not family[role]:
        raise ValueError(
            f"{method} has no default for role {role!r} in model type {kind!r}; "
            f"set `targets=` to the module names to adapt (known families: {', '.join(sorted(FAMILIES))})"
        )
    return list(family[role])
