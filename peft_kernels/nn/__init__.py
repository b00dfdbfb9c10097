"""Drop-in modules: each wraps one op call in forward."""

from .adapter import BottleneckAdapter, HadamardLinear, IA3Linear, ParallelAdapter, SequentialAdapter
from .compacter import PHMLinear
from .composite import AdapterFusion, FusedAdapters, MaskedLinear
from .diff_pruning import DiffPruningLinear
from .krona import KronALinear
from .lora import LoRALinear, enable_delta_lora
from .lora_variants import AdaLoRALinear, DyLoRALinear
from .nf4 import NF4Linear, QLoRALinear, requantize
from .prompt import PrefixEncoder, PromptEmbedding, PromptEncoder
from .unipelt import GatedLoRALinear, GatedSequentialAdapter, PrefixGate

__all__ = ["AdaLoRALinear", "AdapterFusion", "BottleneckAdapter", "DiffPruningLinear", "DyLoRALinear",
           "FusedAdapters", "GatedLoRALinear", "GatedSequentialAdapter", "HadamardLinear", "IA3Linear",
           "KronALinear", "LoRALinear", "MaskedLinear", "NF4Linear", "PHMLinear", "ParallelAdapter", "PrefixEncoder",
           "PrefixGate", "PromptEmbedding", "PromptEncoder", "QLoRALinear", "SequentialAdapter", "enable_delta_lora",
           "requantize"]
