"""Drop-in modules: each wraps one op call in forward."""

from .compacter import PHMLinear
from .diff_pruning import DiffPruningLinear
from .krona import KronALinear
from .lora import LoRALinear, enable_delta_lora
from .nf4 import NF4Linear, QLoRALinear, requantize

__all__ = ["DiffPruningLinear", "KronALinear", "LoRALinear", "NF4Linear", "PHMLinear", "QLoRALinear", "enable_delta_lora", "requantize"]
