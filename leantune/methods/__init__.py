"""Every method: importing this package registers them."""

from .lora import LoRA

__all__ = ["LoRA"]
