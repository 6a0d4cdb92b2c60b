"""Every method: importing this package registers them."""

from .adapters import Compacter, Houlsby, ParallelAdapter, Pfeiffer, SparseAdapter
from .adaptive_rank import AdaLoRA, IncreLoRA
from .compose import Compose
from .dept import DePT
from .dsee import DSEE
from .hft import HFT
from .ist import IST, ISTSchedule
from .lopt import LoPT
from .lora import LoRA
from .lora_variants import DoRA, DyLoRA, LoRAFA, RsLoRA, set_dylora_rank
from .lst import LST
from .lt_sft import LTSFT, LTSFTPhases
from .mam import MAM
from .mask_tuning import MaskTuning
from .paca import PaCA
from .prefix_tuning import PrefixTuning, PTuningV2
from .prompt_tuning import PromptTuning
from .qlora import LQLoRA, QLoRA
from .residual_prompt import ResidualPromptTuning
from .said import SAID
from .sara import SaRA, sara_penalty
from .scaling import IA3, SSF, BitFit, LNTuning
from .shared_bases import MoS, NoLA, VeRA
from .spiel import SpIEL, SpIELSchedule
from .svd_init import CorDA, PiSSA, SVFit
from .unipelt import UniPELT

__all__ = [
    "BitFit", "Compacter", "HFT", "Houlsby", "IA3", "IST", "ISTSchedule", "LNTuning", "ParallelAdapter", "Pfeiffer",
    "SparseAdapter", "SSF",
    "Compose", "LoRA", "PrefixTuning", "PTuningV2", "PromptTuning",
    "DePT", "LoPT", "LST", "MAM", "ResidualPromptTuning", "UniPELT",
    "DSEE", "LTSFT", "LTSFTPhases", "MaskTuning", "PaCA", "SAID", "SaRA", "SpIEL", "SpIELSchedule",
    "sara_penalty", "LQLoRA", "QLoRA",
    "AdaLoRA", "CorDA", "DoRA", "DyLoRA", "IncreLoRA", "LoRAFA", "MoS", "NoLA", "PiSSA", "RsLoRA", "SVFit",
    "VeRA", "set_dylora_rank"]
