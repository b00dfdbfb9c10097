"""peft_kernels: fused C++/CUDA kernels for parameter-efficient fine-tuning, with drop-in modules."""

import torch  # noqa: F401  (the compiled library has no RUNPATH: torch's libraries must be loaded first)

from . import nn
from ._ops import build_info
from .krona import KronAConfig
from .lora import LoRAConfig, load_adapter, save_adapter
from .nf4 import NF4Weight, dynamic_map
from .qlora import QLoRAConfig, bnb_nf4_state_dict, load_bnb_nf4, weight_bytes
from .ops import kron_linear, lora_linear, nf4_dequantize, nf4_linear, nf4_quantize, qlora_linear
from .targeting import apply, trainable_parameters

__all__ = [
    "KronAConfig",
    "LoRAConfig",
    "NF4Weight",
    "QLoRAConfig",
    "apply",
    "bnb_nf4_state_dict",
    "build_info",
    "dynamic_map",
    "kron_linear",
    "load_adapter",
    "load_bnb_nf4",
    "lora_linear",
    "nf4_dequantize",
    "nf4_linear",
    "nf4_quantize",
    "nn",
    "qlora_linear",
    "save_adapter",
    "trainable_parameters",
    "weight_bytes",
]
__version__ = "0.1.0"
