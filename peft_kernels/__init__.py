"""peft_kernels: fused C++/CUDA kernels for parameter-efficient fine-tuning, with drop-in modules."""

import torch  # noqa: F401  (the compiled library has no RUNPATH: torch's libraries must be loaded first)

from . import nn, optim, sparse
from ._ops import build_info
from .adapters import AdapterConfig, BitFitConfig, CompacterConfig, HadamardAdapterConfig, IA3Config
from .hybrid import AdapterFusionConfig, CompositeConfig, S4Config, SparseAdapterConfig
from .krona import KronAConfig
from .lora import LoRAConfig, load_adapter, save_adapter
from .nf4 import NF4Weight, dynamic_map
from .qlora import QLoRAConfig, bnb_nf4_state_dict, load_bnb_nf4, weight_bytes
from .ops import (kron_linear, lora_linear, masked_adamw_step_, masked_sgd_step_, nf4_dequantize, nf4_linear,
                  nf4_quantize, qlora_linear)
from .sparse import SparseFTConfig, load_sparse_diff, save_sparse_diff
from .targeting import apply, trainable_parameters

__all__ = [
    "AdapterConfig",
    "AdapterFusionConfig",
    "BitFitConfig",
    "CompacterConfig",
    "CompositeConfig",
    "HadamardAdapterConfig",
    "IA3Config",
    "KronAConfig",
    "LoRAConfig",
    "NF4Weight",
    "QLoRAConfig",
    "S4Config",
    "SparseAdapterConfig",
    "SparseFTConfig",
    "apply",
    "bnb_nf4_state_dict",
    "build_info",
    "dynamic_map",
    "kron_linear",
    "load_adapter",
    "load_bnb_nf4",
    "load_sparse_diff",
    "lora_linear",
    "masked_adamw_step_",
    "masked_sgd_step_",
    "nf4_dequantize",
    "nf4_linear",
    "nf4_quantize",
    "nn",
    "qlora_linear",
    "optim",
    "save_adapter",
    "save_sparse_diff",
    "sparse",
    "trainable_parameters",
    "weight_bytes",
]
__version__ = "0.1.0"
