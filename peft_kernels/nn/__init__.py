"""Drop-in modules: each wraps one op call in forward."""

from .lora import LoRALinear, enable_delta_lora
from .nf4 import NF4Linear, QLoRALinear, requantize

__all__ = ["LoRALinear", "NF4Linear", "QLoRALinear", "enable_delta_lora", "requantize"]
