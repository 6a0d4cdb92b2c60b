"""Prompt tuning: trainable virtual-token embeddings before the input."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from ..core.virtual_tokens import Prompt, PromptConfig
from ..registry import register

PEFT_INITS = {"random": "RANDOM", "vocab": "SAMPLE_VOCAB", "text": "TEXT"}


@register
@dataclass
class PromptTuning(PromptConfig):
    """Prompt tuning (Lester et al., 2021): ``num_virtual_tokens`` free vectors are
    prepended to the input embeddings; the model is frozen. Matches HF PEFT's
    PROMPT_TUNING (init, forward, adapter folder). See :class:`PromptConfig` for init.
    """

    name: ClassVar[str] = "prompt_tuning"
    peft_type: ClassVar[str | None] = "PROMPT_TUNING"

    def make_delta(self, path: str, module: nn.Module) -> Prompt:
        return Prompt(self.initial(module))

    @classmethod
    def like(cls, other: PromptConfig) -> PromptTuning:
        """The plain prompt tuning that ``other``'s reparameterised prompt folds to."""
        plain = cls(num_virtual_tokens=other.num_virtual_tokens, init=other.init, init_text=other.init_text,
                    tokenizer=other.tokenizer, init_ids=other.init_ids, **other.common())
        return other._carry(plain)

    # --- HF PEFT interop --------------------------------------------------------
    def peft_keys(self, delta: Prompt) -> dict[str, str]:
        return {"weight": "prompt_embeddings"}

    def peft_config(self, paths: list[str]) -> dict[str, Any]:
        # PEFT insists on a tokenizer name for TEXT; the init is not read when an adapter loads.
        init = "random" if self.init == "text" and not self.tokenizer else self.init
        return {
            **super().peft_config(paths),
            "num_virtual_tokens": self.num_virtual_tokens,
            "prompt_tuning_init": PEFT_INITS[init],
            "prompt_tuning_init_text": self.init_text if init == "text" else None,
            "tokenizer_name_or_path": self.tokenizer if init == "text" else None,
            "tokenizer_kwargs": None,
        }

    @classmethod
    def from_peft_config(cls, cfg: dict[str, Any], **common: Any) -> PromptTuning:
        cls.check_peft_config(cfg)
        return cls(num_virtual_tokens=int(cfg["num_virtual_tokens"]), **common)  # saved weights replace the init
