"""Drop-in modules: each wraps one op call in forward."""

from .lora import LoRALinear

__all__ = ["LoRALinear"]
