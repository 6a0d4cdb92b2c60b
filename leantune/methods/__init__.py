"""Every method: importing this package registers them."""

from .compose import Compose
from .lora import LoRA

__all__ = ["Compose", "LoRA"]
