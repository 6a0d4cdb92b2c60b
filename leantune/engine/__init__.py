"""Fast and lean execution shared by every method: fused low-rank linear, ``lt.compile``,
chunked causal-LM loss, lean (recompute-more) mode, zeroth-order (MeZO) optimizer."""

from .compiling import compile
from .lean import configure
from .loss import causal_lm_loss, chunked_causal_lm_loss
from .lowrank_linear import LowRankLinear, fused_forward, lowrank_linear
from .mezo import MeZO

__all__ = [
    "LowRankLinear", "MeZO", "causal_lm_loss", "chunked_causal_lm_loss", "compile", "configure", "fused_forward", "lowrank_linear",
]
