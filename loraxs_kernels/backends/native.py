"""The C++ extension (csrc/): the op itself, backend "cpp" on CPU tensors, backend "cuda" on CUDA tensors.

The extension defines torch.ops.loraxs.linear / linear_fwd / linear_bwd with one kernel per dispatch
key (csrc/cpu for CPU, csrc/cuda for CUDA when it was built with CUDA). This module only loads it.

It is loaded from the package (`loraxs_kernels/_C*.so`, built by setup.py), or from the file named by
LORAXS_NATIVE_LIB (a CMake build; CI uses this to test that build too).
"""

from __future__ import annotations

import functools
import glob
import os

import torch

NAME = "native"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@functools.lru_cache(maxsize=None)
def load() -> str | None:
    """Load the extension once; return None on success, else why it could not be loaded."""
    path = os.environ.get("LORAXS_NATIVE_LIB")
    if not path:
        found = sorted(glob.glob(os.path.join(_PACKAGE_DIR, "_C*.so")) + glob.glob(os.path.join(_PACKAGE_DIR, "_C*.pyd")))
        if not found:
            return (
                "the C++ extension is not built (no loraxs_kernels/_C*.so); run `make build` "
                "or `pip install --no-build-isolation -e .`"
            )
        path = found[0]
    try:
        torch.ops.load_library(path)
    except (OSError, RuntimeError) as e:
        return f"the C++ extension at {path} failed to load: {e}"
    return None


def library_path() -> str | None:
    """The file the extension was loaded from (None if not loaded)."""
    return next((p for p in torch.ops.loaded_libraries if os.path.basename(p).startswith(("_C", "libloraxs"))), None)


def unavailable_reason(device: torch.device) -> str | None:
    reason = load()
    if reason is not None:
        return reason
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if key is None or not torch._C._dispatch_has_kernel_for_dispatch_key("loraxs::linear_fwd", key):
        return f"the C++ extension was built without a kernel for {device.type} (see setup.py: CUDA needs a CUDA torch and nvcc)"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None

