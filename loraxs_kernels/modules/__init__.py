"""The modules users swap in."""

from .linear import FusedLoRAXSLinear
from .model import apply_loraxs, merge_loraxs
from .multi import MultiLoRAXSLinear, read_adapter_slot, reset_adapter_slot, use_adapters, write_adapter_slot
from .svd_init import svd_factors

__all__ = [
    "FusedLoRAXSLinear", "apply_loraxs", "merge_loraxs", "svd_factors",
    "MultiLoRAXSLinear", "use_adapters", "read_adapter_slot", "write_adapter_slot", "reset_adapter_slot",
]
