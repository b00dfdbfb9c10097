"""peft_kernels: fused C++/CUDA kernels for parameter-efficient fine-tuning, with drop-in modules."""

import torch  # noqa: F401  (the compiled library has no RUNPATH: torch's libraries must be loaded first)

from . import nn, optim, sparse
from ._ops import build_info
from .lora import LoRAConfig, load_adapter, save_adapter
from .nf4 import NF4Weight, dynamic_map
from .ops import lora_linear, masked_adamw_step_, masked_sgd_step_, nf4_dequantize, nf4_quantize
from .sparse import SparseFTConfig, load_sparse_diff, save_sparse_diff
from .targeting import apply, trainable_parameters

__all__ = [
    "LoRAConfig",
    "NF4Weight",
    "SparseFTConfig",
    "apply",
    "build_info",
    "dynamic_map",
    "load_adapter",
    "load_sparse_diff",
    "lora_linear",
    "masked_adamw_step_",
    "masked_sgd_step_",
    "nf4_dequantize",
    "nf4_quantize",
    "nn",
    "optim",
    "save_adapter",
    "save_sparse_diff",
    "sparse",
    "trainable_parameters",
]
__version__ = "0.1.0"
