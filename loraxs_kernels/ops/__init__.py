"""The op layer: importing it registers torch.ops.loraxs.linear (and its internal fwd/bwd ops)."""

from .checks import check_frozen, check_inputs
from .linear import loraxs_linear

__all__ = ["loraxs_linear", "check_inputs", "check_frozen"]
