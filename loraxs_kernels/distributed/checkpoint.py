"""The adapter of a model trained across processes: R only, sharded or gathered.

- adapter_state_dict / load_adapter_state_dict: the trainable tensors (every R, plus any other
  trainable parameter) as a state dict of DTensor shards under FSDP2, for torch.distributed.checkpoint
  (dcp.save / dcp.load): each rank writes and reads only its own shard.
- gather_adapter: the same tensors whole, on rank 0 (CPU), None on the other ranks.
- save_adapter_sharded: save_adapter's file, written by rank 0 from a model whose tensors are sharded
  (FSDP2, tensor parallelism) or replicated (DDP). The file's fingerprint and A/B decision need the
  whole base weight, so the full state dict (W included) is gathered to rank 0's CPU for the call.
Every function is collective: all ranks call it, and they fail together. What a rank does on its own
(writing the file, checking a state dict) runs under `_all_or_none`: every rank, the failing one
included, then posts its outcome to the process group's store and reads every rank's, and if any rank
failed every rank raises (the failed rank its own exception, the others CollectiveFailure naming the
ranks and their errors). Before, rank 0 raising in save_adapter left the other ranks in dist.barrier()
until the process-group timeout (10-30 min by default); now they raise as soon as the outcomes are in.
A rank that dies (rather than raises) is still only noticed by the store's timeout.

Why the store and not all_gather_object: a gloo collective on tensors made in Python ends with a gloo
worker thread dropping them, which takes the GIL. When that was the program's last collective, the
main thread could reach ~ProcessGroupGloo (freeing a DDP model after destroy_process_group) first and
join that worker while holding the GIL: a deadlock at exit, seen in 4 of 10 runs of
`torchrun --nproc_per_node=2 -m loraxs_kernels.examples.train_distributed --strategy ddp --out DIR`
(gdb: main thread in ProcessGroupGloo::~ProcessGroupGloo -> thread::join, worker in
~AsyncAllgatherWork -> decref_pyobject -> take_gil). Store operations run no gloo work.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

from ..adapters import save_adapter
from ..modules.linear import FusedLoRAXSLinear


class CollectiveFailure(RuntimeError):
    """A collective adapter call failed on another rank; this rank's part succeeded and was undone or
    discarded with it (nothing was returned)."""


def _outcomes(mine: str | None) -> dict[int, str]:
    """Every rank's outcome of the same collective call ("" = success), through the default store.

    The nth call on each rank uses keys under a prefix numbered n (each rank counts its own calls in the
    store, so the numbering restarts with a new process group); the last rank to read deletes them."""
    store = dist.distributed_c10d._get_default_store()
    rank, world = dist.get_rank(), dist.get_world_size()
    n = store.add(f"loraxs/agree/calls/{rank}", 1)
    prefix = f"loraxs/agree/{n}/"
    store.set(prefix + str(rank), mine or "")
    keys = [prefix + str(r) for r in range(world)]
    store.wait(keys)  # the store's timeout (the process group's) bounds a rank that died
    got = {r: store.get(k).decode() for r, k in enumerate(keys)}
    if store.add(prefix + "read", 1) == world:
        for k in (*keys, prefix + "read"):
            store.delete_key(k)
    return {r: m for r, m in got.items() if m}


@contextlib.contextmanager
def _all_or_none(what: str):
    """Run the block on every rank, then agree on the outcome: any rank's exception reaches every rank.

    Every rank posts its outcome whether its block raised or not, so no rank waits for one that gave
    up: the failing rank posts on its way out."""
    error = None
    try:
        yield
    except Exception as e:  # noqa: BLE001  re-raised below, after the other ranks have heard of it
        error = e
    failed = _outcomes(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if failed:
        detail = "; ".join(f"rank {r}: {m}" for r, m in sorted(failed.items()))
        raise CollectiveFailure(f"{what} failed on rank(s) {sorted(failed)} (this is rank {dist.get_rank()}): {detail}")


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
    own = adapter_state_dict(model)
    with _all_or_none("load_adapter_state_dict: checking the state dict"):
        missing = [k for k in own if k not in state_dict]
        if missing:
            raise KeyError(f"the adapter state dict lacks {len(missing)} trainable tensors, first {missing[0]!r}")
    with _all_or_none("load_adapter_state_dict"):
        set_model_state_dict(model, state_dict, options=StateDictOptions(strict=False))


def gather_adapter(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Every trainable parameter whole, on rank 0's CPU in its stored dtype (an fp32 R stays fp32
    under a bf16 MixedPrecisionPolicy); None on the other ranks. Collective."""
    sd = get_model_state_dict(
        model, options=StateDictOptions(ignore_frozen_params=True, full_state_dict=True, cpu_offload=True)
    )
    out = None
    with _all_or_none("gather_adapter"):
        if dist.get_rank() == 0:
            out = _trainable(model, sd)
    return out


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
    with _all_or_none("save_adapter_sharded"):  # also the barrier: no rank returns before the file exists
        if dist.get_rank() == 0:
            with _swapped(inner, full):
                out = save_adapter(inner, path, **kwargs)
    return out
