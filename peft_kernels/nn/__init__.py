"""Drop-in modules: each wraps one op call in forward."""

from .lora import LoRALinear, enable_delta_lora

__all__ = ["LoRALinear", "enable_delta_lora"]
