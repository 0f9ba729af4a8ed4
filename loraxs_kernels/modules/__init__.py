"""The modules users swap in."""

from .linear import FusedLoRAXSLinear
from .model import apply_loraxs, merge_loraxs
from .svd_init import svd_factors

__all__ = ["FusedLoRAXSLinear", "apply_loraxs", "merge_loraxs", "svd_factors"]
