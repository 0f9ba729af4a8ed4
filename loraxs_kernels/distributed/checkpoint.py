"""The adapter of a model trained across processes: R only, sharded or gathered.

- adapter_state_dict / load_adapter_state_dict: the trainable tensors (every R, plus any other
  trainable parameter) as a state dict of DTensor shards under FSDP2, for torch.distributed.checkpoint
  (dcp.save / dcp.load): each rank writes and reads only its own shard.
- gather_adapter: the same tensors whole, on rank 0 (CPU), None on the other ranks.
- save_adapter_sharded: save_adapter's file, written by rank 0 from a model whose tensors are sharded
  (FSDP2, tensor parallelism) or replicated (DDP). The file's fingerprint and A/B decision need the
  whole base weight, so the full state dict (W included) is gathered to rank 0's CPU for the call.
Every function is collective: all ranks call it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from ..adapters import save_adapter
from ..modules.linear import FusedLoRAXSLinear


def _inner(model: nn.Module) -> nn.Module:
    # DDP's state dict drops its "module." prefix (get_model_state_dict does); the paths must match.
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def _trainable(model: nn.Module, sd: dict) -> dict:
    # ignore_frozen_params drops frozen parameters but keeps buffers (A and B): keep only what trains.
    names = {n for n, p in _inner(model).named_parameters() if p.requires_grad}
    return {k: v for k, v in sd.items() if k in names}


def adapter_state_dict(model: nn.Module) -> dict:
    """The trainable parameters (R's), as this rank's shards (DTensors under FSDP2); collective."""
    return _trainable(model, get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))


def load_adapter_state_dict(model: nn.Module, state_dict: dict) -> None:
    """Load adapter_state_dict's tensors (e.g. after dcp.load) into a model of the same layout."""
    missing = [k for k in adapter_state_dict(model) if k not in state_dict]
    if missing:
        raise KeyError(f"the adapter state dict lacks {len(missing)} trainable tensors, first {missing[0]!r}")
    set_model_state_dict(model, state_dict, options=StateDictOptions(strict=False))


def gather_adapter(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every trainable parameter whole, on rank 0's CPU in its stored dtype (an fp32 R stays fp32
    under a bf16 MixedPrecisionPolicy); None on the other ranks. Collective."""
    sd = get_model_state_dict(
        model, options=StateDictOptions(ignore_frozen_params=True, full_state_dict=True, cpu_offload=True)
    )
    return _trainable(model, sd) if dist.get_rank() == 0 else None


@contextlib.contextmanager
def _swapped(model: nn.Module, full: dict):
    """The model's FusedLoRAXSLinear tensors replaced by `full`'s (rank 0 only), restored on exit."""
    saved = []
    try:
        for path, layer in model.named_modules():
            if not isinstance(layer, FusedLoRAXSLinear):
                continue
            for store in (layer._parameters, layer._buffers):
                for name in ("weight", "bias", "lora_A", "lora_R", "lora_B"):
                    key = f"{path}.{name}" if path else name
                    if store.get(name) is not None and key in full:
                        saved.append((store, name, store[name]))
                        value = full[key]
                        store[name] = nn.Parameter(value, requires_grad=store[name].requires_grad) \
                            if store is layer._parameters else value
        yield
    finally:
        for store, name, value in reversed(saved):
            store[name] = value


def save_adapter_sharded(model: nn.Module, path, **kwargs):
    """save_adapter(model, path, **kwargs) for a model sharded across processes: rank 0 writes the
    file from the whole tensors and returns its path; the other ranks return None. Collective."""
    inner = _inner(model)
    full = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    out = None
    if dist.get_rank() == 0:
        with _swapped(inner, full):
            out = save_adapter(inner, path, **kwargs)
    dist.barrier()
    return out
