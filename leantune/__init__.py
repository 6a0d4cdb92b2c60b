"""leantune: parameter- and memory-efficient fine-tuning, every method a point in one design space."""

__version__ = "0.1.0"

from . import engine  # noqa: E402  (lt.engine.configure(model, lean=True), chunked causal-LM loss)
from .api import (  # noqa: E402
    adapt,
    adapters,
    delete_adapter,
    disabled,
    fold,
    merge,
    param_groups,
    schedules,
    set_active,
    trainable_parameters,
    unload,
    unmerge,
)
from .core.rank_budget import rank_budget  # noqa: E402
from .engine import MeZO, compile  # noqa: E402  (zeroth-order optimizer; torch.compile keeping less for backward)
from .interop.lora_export import export_lora  # noqa: E402
from .methods import *  # noqa: E402,F403  (every method's config class: lt.LoRA, ...)
from .methods import __all__ as _method_classes  # noqa: E402
from .registry import get_method, methods, register  # noqa: E402
from .storage import load_adapter, save_adapter  # noqa: E402
from .train.loop import Callback  # noqa: E402
from .train.runner import evaluate  # noqa: E402
from .train.runner import train as finetune  # noqa: E402  (``lt.train`` is the subpackage)

__all__ = [
    *_method_classes,
    "Callback",
    "MeZO",
    "adapt",
    "adapters",
    "compile",
    "delete_adapter",
    "disabled",
    "engine",
    "evaluate",
    "export_lora",
    "finetune",
    "fold",
    "get_method",
    "load_adapter",
    "merge",
    "methods",
    "param_groups",
    "rank_budget",
    "register",
    "save_adapter",
    "schedules",
    "set_active",
    "trainable_parameters",
    "unload",
    "unmerge",
]
