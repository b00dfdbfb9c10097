"""peft_kernels: fused C++/CUDA kernels for parameter-efficient fine-tuning, with drop-in modules."""

import torch  # noqa: F401  (the compiled library has no RUNPATH: torch's libraries must be loaded first)

from . import nn
from ._ops import build_info
from .krona import KronAConfig
from .lora import LoRAConfig, load_adapter, save_adapter
from .nf4 import NF4Weight, dynamic_map
from .ops import kron_linear, lora_linear, nf4_dequantize, nf4_quantize
from .targeting import apply, trainable_parameters

__all__ = [
    "KronAConfig",
    "LoRAConfig",
    "NF4Weight",
    "apply",
    "build_info",
    "dynamic_map",
    "kron_linear",
    "load_adapter",
    "lora_linear",
    "nf4_dequantize",
    "nf4_quantize",
    "nn",
    "save_adapter",
    "trainable_parameters",
]
__version__ = "0.1.0"
