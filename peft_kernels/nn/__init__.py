"""Drop-in modules: each wraps one op call in forward."""

from .compacter import PHMLinear
from .krona import KronALinear
from .lora import LoRALinear, enable_delta_lora
from .nf4 import NF4Linear, QLoRALinear, requantize
from .prompt import PrefixEncoder, PromptEmbedding, PromptEncoder

__all__ = ["KronALinear", "LoRALinear", "NF4Linear", "PHMLinear", "PrefixEncoder", "PromptEmbedding", "PromptEncoder",
           "QLoRALinear", "enable_delta_lora", "requantize"]
