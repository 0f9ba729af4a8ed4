"""LoRA-XS adapters as files: save_adapter / load_adapter (R only, with a base fingerprint)."""

from .files import load_adapter, save_adapter
from .format import FORMAT_NAME, FORMAT_VERSION, GAP_THRESHOLD, AdapterError, read_adapter
from .fingerprint import fingerprint, fingerprint_mismatch

__all__ = [
    "save_adapter",
    "load_adapter",
    "read_adapter",
    "fingerprint",
    "fingerprint_mismatch",
    "AdapterError",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "GAP_THRESHOLD",
]
