"""Drop-in modules: each wraps one op call in forward."""

from .compacter import PHMLinear
from .krona import KronALinear
from .lora import LoRALinear, enable_delta_lora

__all__ = ["KronALinear", "LoRALinear", "PHMLinear", "enable_delta_lora"]
