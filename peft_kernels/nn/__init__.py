"""Drop-in modules: each wraps one op call in forward."""

from .compacter import PHMLinear
from .krona import KronALinear
from .lora import LoRALinear, enable_delta_lora
from .lora_variants import AdaLoRALinear, DyLoRALinear
from .nf4 import NF4Linear, QLoRALinear, requantize

__all__ = ["AdaLoRALinear", "DyLoRALinear", "KronALinear", "LoRALinear", "NF4Linear", "PHMLinear", "QLoRALinear",
           "enable_delta_lora", "requantize"]
