"""loraxs-kernels: fused LoRA-XS layers for PyTorch.

    y = x Wᵀ + b + s · ((x A) R) B        (only the r×r matrix R trains)

Where to look: reference.py (the math), ops/ (the op and its autograd), backends/ (torch, C++,
Triton, CUDA), modules/ (FusedLoRAXSLinear, apply_loraxs), tools/.
"""

from . import reference
from .backends import BackendUnavailable
from .backends import available as available_backends
from .modules import FusedLoRAXSLinear, apply_loraxs, merge_loraxs
from .ops import loraxs_linear
from .ops.multi import loraxs_linear_multi
from .modules import (MultiLoRAXSLinear, read_adapter_slot, reset_adapter_slot, use_adapters,
                      write_adapter_slot)
from . import interop
from .adapters import fingerprint, load_adapter, save_adapter
from .interop import Acceleration, accelerate_peft, export_peft_lora
from .store import AdapterStore

__all__ = [
    "loraxs_linear",
    "loraxs_linear_multi",
    "MultiLoRAXSLinear",
    "use_adapters",
    "read_adapter_slot",
    "write_adapter_slot",
    "reset_adapter_slot",
    "FusedLoRAXSLinear",
    "apply_loraxs",
    "merge_loraxs",
    "reference",
    "available_backends",
    "BackendUnavailable",
    "save_adapter",
    "load_adapter",
    "fingerprint",
    "export_peft_lora",
    "accelerate_peft",
    "Acceleration",
    "AdapterStore",
    "interop",
]
__version__ = "0.1.0"
