"""Drop-in modules: each wraps one op call in forward."""

from .adapter import BottleneckAdapter, HadamardLinear, IA3Linear, ParallelAdapter, SequentialAdapter
from .compacter import PHMLinear
from .diff_pruning import DiffPruningLinear
from .hybrid import AdapterFusion, FusedAdapters, MaskedLinear
from .krona import KronALinear
from .lora import LoRALinear, enable_delta_lora
from .nf4 import NF4Linear, QLoRALinear, requantize

__all__ = ["AdapterFusion", "BottleneckAdapter", "DiffPruningLinear", "FusedAdapters", "HadamardLinear", "IA3Linear",
           "KronALinear", "LoRALinear", "MaskedLinear", "NF4Linear", "PHMLinear", "ParallelAdapter", "QLoRALinear",
           "SequentialAdapter", "enable_delta_lora", "requantize"]
