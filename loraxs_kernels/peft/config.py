"""LoraXSConfig: what a user writes to get LoRA-XS through PEFT, and what adapter_config.json holds.

The JSON file is the same one `save_adapter` writes (format "loraxs-kernels-adapter", version 2,
adapters/format.py): PEFT's fields (peft_type "LORAXS", task_type, r, target_modules, ...) and ours
(`layers`: per adapted layer its shape, pivots, basis kind and base fingerprint; `saved_module_keys`).
Those must be dataclass fields here, or PEFT's config loader drops them; tests/test_peft_method.py
checks that every key save_adapter writes is one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from peft.config import PeftConfig

from ..adapters import files as _files

R_DTYPES = ("float16", "bfloat16", "float32", "float64")
INITS = ("svd", "random")
R_INITS = ("normal", "zeros")


def dtype_name(value, what: str) -> Optional[str]:
    """None, or one of R_DTYPES from a torch.dtype or its name; TypeError/ValueError naming `what` otherwise."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        value = str(value).removeprefix("torch.")
    if not isinstance(value, str):
        raise TypeError(f"{what} must be None, a torch.dtype or one of {R_DTYPES}, got {value!r}")
    value = value.removeprefix("torch.")
    if value not in R_DTYPES:
        raise ValueError(f"{what} must be None or one of {R_DTYPES}, got {value!r}")
    return value


@dataclass
class LoraXSConfig(PeftConfig):
    """LoRA-XS as a PEFT method: y = x Wᵀ + b + scaling·((x A) R) B on every targeted linear layer,
    A, B frozen, R (r×r) the only trainable tensor.

    r: the rank (positive int ≤ min(in, out) of every targeted layer).
    target_modules: PEFT's own matching (peft.tuners.tuners_utils.check_target_module_exists): a list
        entry matches a module whose dotted path equals it or ends with "." + entry; a single string is
        a regular expression that must match the whole path; "all-linear" is every nn.Linear / Conv1D
        but the output head.
    exclude_modules: the same forms, for modules never to adapt.
    modules_to_save: modules trained and saved whole (PEFT's ModulesToSaveWrapper; a SEQ_CLS task adds
        the classifier itself).
    scaling: the float s.
    init: "svd" (A = U_rΣ_r, B = V_rᵀ of Wᵀ: loraxs_kernels.modules.svd_init.svd_basis) or "random"
        (A, B Gaussian, stored in the adapter file since nothing can recompute them).
    r_dtype: R's dtype ("float32", ...); None: float32 beside fp16/bf16 weights (an optimizer step on a
        bf16 R loses most updates), else the weight's dtype.
    r_init: R's start, "normal" (N(0, 1e-5), the official code's) or "zeros".
    layers_to_transform / layers_pattern: PEFT's layer-index filter.

    The remaining fields describe the adapter once it exists (filled when the layers are built, read
    back from adapter_config.json): do not set them by hand. `layers` is filled on the config object
    get_peft_model receives; passing that same object to get_peft_model again treats it as a loaded
    adapter (the model must be the same base: its fingerprint is checked, the basis reproduced).
    """

    r: int = field(default=8, metadata={"help": "LoRA-XS rank: R is r×r per layer"})
    target_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "PEFT matching"})
    exclude_modules: Optional[Union[list[str], str]] = field(default=None, metadata={"help": "never adapted"})
    modules_to_save: Optional[list[str]] = field(default=None, metadata={"help": "trained and saved whole"})
    scaling: float = field(default=1.0, metadata={"help": "s in y = x Wᵀ + b + s·((x A) R) B"})
    init: str = field(default="svd", metadata={"help": "'svd' (A = U_rΣ_r, B = V_rᵀ) or 'random'"})
    r_dtype: Optional[str] = field(default=None, metadata={"help": "R's dtype; None: fp32 beside half weights"})
    r_init: str = field(default="normal", metadata={"help": "'normal' (N(0, 1e-5)) or 'zeros'"})
    layers_to_transform: Optional[Union[list[int], int]] = field(default=None)
    layers_pattern: Optional[Union[list[str], str]] = field(default=None)
    # --- the file format's own fields (adapters/format.py, format_version 2)
    format: str = field(default=_files.FORMAT_NAME)
    format_version: int = field(default=_files.FORMAT_VERSION)
    library: str = field(default="loraxs_kernels")
    dtype: Optional[str] = field(default=None)
    rank: Optional[int] = field(default=None)  # format_version 1's name for r (null when layers differ)
    svd: dict = field(default_factory=lambda: dict(_files.SVD_FACTS))
    fingerprint_tolerance: dict = field(default_factory=lambda: dict(_files.FINGERPRINT_FACTS))
    layers: dict = field(default_factory=dict)
    saved_module_keys: dict = field(default_factory=dict)

    def __post_init__(self):
        super().__post_init__()
        from .registration import PEFT_TYPE

        self.peft_type = PEFT_TYPE
        if isinstance(self.r, bool) or not isinstance(self.r, int):
            hint = int(self.r) if isinstance(self.r, float) and self.r.is_integer() else 8
            raise TypeError(f"LoraXSConfig: r must be a positive int (R is r×r), got {self.r!r} "
                            f"({type(self.r).__name__}); e.g. r={hint}")
        if self.r < 1:
            raise ValueError(f"LoraXSConfig: r must be ≥ 1, got r={self.r}")
        if isinstance(self.scaling, bool) or not isinstance(self.scaling, (int, float)):
            raise TypeError(f"LoraXSConfig: scaling must be a float, got {self.scaling!r} ({type(self.scaling).__name__})")
        if not math.isfinite(self.scaling):
            raise ValueError(f"LoraXSConfig: scaling must be finite, got {self.scaling!r}")
        self.scaling = float(self.scaling)
        if self.init not in INITS:
            raise ValueError(f"LoraXSConfig: init must be one of {INITS}, got {self.init!r}")
        if self.r_init not in R_INITS:
            raise ValueError(f"LoraXSConfig: r_init must be one of {R_INITS}, got {self.r_init!r}")
        self.r_dtype = dtype_name(self.r_dtype, "LoraXSConfig: r_dtype")
        if self.target_modules is None:
            raise ValueError("LoraXSConfig: target_modules is required (LoRA-XS has no per-architecture default): "
                             "e.g. target_modules=['query', 'value'] or 'all-linear'")
        for what in ("target_modules", "exclude_modules", "modules_to_save"):
            value = getattr(self, what)
            if value is None or isinstance(value, str):
                continue
            if isinstance(value, set):
                value = sorted(value)
                setattr(self, what, value)
            if not isinstance(value, (list, tuple)) or not all(isinstance(e, str) for e in value):
                raise TypeError(f"LoraXSConfig: {what} must be a string or a list of strings, got {value!r}")
            setattr(self, what, list(value))
        if self.format != _files.FORMAT_NAME or self.format_version not in _files.READABLE_VERSIONS:
            raise ValueError(f"LoraXSConfig: format {self.format!r} version {self.format_version!r} is not one this "
                             f"library reads ({_files.FORMAT_NAME!r} versions {_files.READABLE_VERSIONS})")
        self.format_version = _files.FORMAT_VERSION
