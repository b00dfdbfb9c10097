"""peft_kernels: fused C++/CUDA kernels for parameter-efficient fine-tuning, with drop-in modules."""

import torch  # noqa: F401  (the compiled library has no RUNPATH: torch's libraries must be loaded first)

from . import composite, compose, hybrids, lora_variants, nn, optim, prompts, sparse, unified
from ._ops import build_info
from .adapters import AdapterConfig, BitFitConfig, CompacterConfig, HadamardAdapterConfig, IA3Config
from .composite import AdapterFusionConfig, CompositeConfig, S4Config, SparseAdapterConfig
from .hybrids import MAMConfig, UniPELTConfig
from .checkpoint import checkpoint_in_micro_batches
from .krona import KronAConfig
from .lora import LoRAConfig, load_adapter, save_adapter
from .loss import fuse_causal_lm_loss
from .lora_variants import AdaLoRAConfig, DeltaLoRAConfig, DyLoRAConfig, LoRAFAConfig, loftq_init
from .nf4 import NF4Weight, dynamic_map
from .qlora import QLoRAConfig, bnb_nf4_state_dict, load_bnb_nf4, weight_bytes
from .ops import (adamw8bit_step_, kron_linear, lora_linear, masked_adamw_step_, masked_sgd_step_, nf4_dequantize, nf4_linear,
                  nf4_quantize, qlora_linear)
from .prompts import PrefixTuningConfig, PromptTuningConfig, PTuningConfig
from .sparse import SparseFTConfig, load_sparse_diff, save_sparse_diff
from .targeting import apply, trainable_parameters
from .unified import AdaMixConfig, ProPETLConfig, consistency_loss, merge_experts

__all__ = [
    "adamw8bit_step_",
    "AdaLoRAConfig",
    "AdaMixConfig",
    "AdapterConfig",
    "AdapterFusionConfig",
    "BitFitConfig",
    "CompacterConfig",
    "CompositeConfig",
    "DeltaLoRAConfig",
    "DyLoRAConfig",
    "HadamardAdapterConfig",
    "IA3Config",
    "KronAConfig",
    "LoRAConfig",
    "LoRAFAConfig",
    "MAMConfig",
    "NF4Weight",
    "PTuningConfig",
    "PrefixTuningConfig",
    "ProPETLConfig",
    "PromptTuningConfig",
    "QLoRAConfig",
    "S4Config",
    "SparseAdapterConfig",
    "SparseFTConfig",
    "UniPELTConfig",
    "apply",
    "bnb_nf4_state_dict",
    "build_info",
    "checkpoint_in_micro_batches",
    "compose",
    "composite",
    "consistency_loss",
    "dynamic_map",
    "fuse_causal_lm_loss",
    "hybrids",
    "kron_linear",
    "load_adapter",
    "load_bnb_nf4",
    "load_sparse_diff",
    "loftq_init",
    "lora_linear",
    "lora_variants",
    "masked_adamw_step_",
    "masked_sgd_step_",
    "merge_experts",
    "nf4_dequantize",
    "nf4_linear",
    "nf4_quantize",
    "nn",
    "optim",
    "prompts",
    "qlora_linear",
    "save_adapter",
    "save_sparse_diff",
    "sparse",
    "trainable_parameters",
    "unified",
    "weight_bytes",
]
__version__ = "0.1.0"
