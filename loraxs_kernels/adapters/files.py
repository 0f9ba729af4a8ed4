"""LoRA-XS adapters as files: save_adapter / load_adapter, R only (r² numbers per layer), with a
fingerprint of the base. The format (the two files, when the basis is stored) is format.py; banks' slots
are slots.py.

Banks (MultiLoRAXSLinear): save_adapter(model, path, slot=i) writes adapter i of every bank as such a
file, and load_adapter(model, path, slot=i) reads one into slot i of every bank, in place
(load_adapter_slot: the bank's A, B and scaling are shared by every slot, so the file must agree with them).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import torch
from torch import nn

from ..modules.linear import FusedLoRAXSLinear, base_tensors, remember_basis, remembered_basis
from ..modules.model import MODULES_TO_SAVE_ATTR, Transaction, is_adaptable, mark_trainable, named_slots
from ..modules.multi import MultiLoRAXSLinear
from ..modules.svd_init import SVDBasis, min_relative_gap, svd_basis
from .atomic import write_adapter_dir  # noqa: F401  (crash-safe writer; interop/peft_lora.py imports it from here)
from .fingerprint import fingerprint_mismatch
from .format import (  # noqa: F401  (the format's names, re-exported: loraxs_kernels.peft reads them from here)
    CONFIG_NAME,
    FINGERPRINT_FACTS,
    FORMAT_NAME,
    FORMAT_VERSION,
    GAP_THRESHOLD,
    PEFT_KEY_PREFIX,
    PEFT_TYPE_NAME,
    READABLE_VERSIONS,
    SVD_FACTS,
    WEIGHTS_NAME,
    AdapterError,
    _module_at,
    common_dtype,
    layer_entry,
    read_adapter,
    task_type_of,
)
from .slots import _DERIVABLE_TOL, _check_slot, _multi_layers, _rel, load_adapter_slot


def _layers(model: nn.Module) -> list[tuple[str, FusedLoRAXSLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, FusedLoRAXSLinear)]


def _compute_basis_facts(layer: nn.Module):
    """(the SVD basis with the layer's own signs, its min relative gap, the relative difference between
    it and the layer's A and B): what save_adapter records about a layer's basis.

    A layer whose A and B are still the SVD basis it was built with (apply_loraxs, load_adapter,
    from_linear: modules.linear.remembered_basis) answers from the facts it kept, with no SVD; any
    other layer (A or B edited, W changed, the model moved) gets one SVD, whose facts it then keeps
    when A and B are that SVD's."""
    kept = remembered_basis(layer)
    if kept is not None:
        pivots, singular_values = kept
        basis = SVDBasis(layer.lora_A, layer.lora_B, singular_values, pivots)
        return basis, min_relative_gap(singular_values, layer.rank), 0.0
    pivots = layer.lora_A.detach().abs().argmax(dim=0)
    basis = svd_basis(layer.weight, layer.rank, pivots=pivots)
    gap = min_relative_gap(basis.singular_values, layer.rank)
    diff = max(_rel(basis.A, layer.lora_A), _rel(basis.B, layer.lora_B))
    if diff <= _DERIVABLE_TOL.get(layer.weight.dtype, 1e-4):
        remember_basis(layer, basis)
    return basis, gap, diff


# Every slot of a bank shares W, A and B, so saving n slots needs the SVD once per bank (each SVD of a
# 384×1536 MiniLM layer took 0.03-0.4 s here): kept per bank while W, A and B are unchanged (the key
# holds their storage and in-place version counters).
_BANK_FACTS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _basis_facts(layer: MultiLoRAXSLinear):
    key = tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype) for t in (layer.weight, layer.lora_A, layer.lora_B))
    hit = _BANK_FACTS.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    facts = _compute_basis_facts(layer)
    _BANK_FACTS[layer] = (key, facts)
    return facts


def _adapter_layers(model: nn.Module, slot) -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(path, layer, R) for every layer an adapter file covers: every FusedLoRAXSLinear with its R
    (slot None), or adapter `slot` of every MultiLoRAXSLinear bank."""
    fused, multi = _layers(model), _multi_layers(model)
    if fused and multi:
        raise ValueError(
            f"the model mixes {len(fused)} FusedLoRAXSLinear and {len(multi)} MultiLoRAXSLinear layers (e.g. "
            f"{fused[0][0]} and {multi[0][0]}); an adapter file holds the layers of one kind")
    if slot is None:
        if multi:
            raise ValueError(
                f"the model's LoRA-XS layers are MultiLoRAXSLinear banks of {multi[0][1].num_adapters} adapters: "
                "name the one to save with slot=i")
        if not fused:
            raise ValueError("the model has no FusedLoRAXSLinear layers: apply_loraxs or load_adapter first")
        return [(p, m, m.lora_R) for p, m in fused]
    if not multi:
        raise ValueError(
            f"slot={slot!r} picks an adapter of MultiLoRAXSLinear banks, but the model has none "
            "(apply_loraxs(..., num_adapters=n) makes them); for FusedLoRAXSLinear layers leave slot=None")
    _check_slot(slot, multi)
    return [(p, m, m.lora_R[slot]) for p, m in multi]


# ------------------------------------------------------------------------------------------ save
def save_adapter(model: nn.Module, path, *, include_basis: bool = False, modules_to_save=None, slot=None,
                 task_type=None) -> Path:
    """Write the model's LoRA-XS adapter (every FusedLoRAXSLinear's R, plus its modules_to_save) to the
    directory `path` (created if needed) as adapter_config.json + adapter_model.safetensors; return it.

    include_basis: store every layer's A and B too (see the module docstring for when a layer's
    basis is stored anyway). modules_to_save: dotted paths whose modules are saved whole; default
    the ones apply_loraxs / load_adapter recorded on the model.
    slot: for a model with MultiLoRAXSLinear layers, the adapter to save (an int): its R in every
    bank, written as an ordinary single-adapter file (load_adapter reads it into a plain or
    FusedLoRAXSLinear model, or with slot= into a bank).
    task_type: PEFT's task type written into the config (AutoPeftModelFor... needs it); default from
    the model's class name ("...ForSequenceClassification" -> "SEQ_CLS", ...), else None.
    """
    if task_type is not None and not isinstance(task_type, str):
        raise TypeError(f"task_type must be a PEFT task type name such as 'SEQ_CLS' or None, got {task_type!r}")
    layers = _adapter_layers(model, slot)
    if modules_to_save is None:
        modules_to_save = list(getattr(model, MODULES_TO_SAVE_ATTR, None) or [])
    elif isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    tensors: dict[str, torch.Tensor] = {}
    layer_cfg: dict[str, dict] = {}
    for lpath, layer, R in layers:
        if not torch.isfinite(R).all():
            where = f"{lpath}.lora_R" if slot is None else f"{lpath}.lora_R[{slot}]"
            raise ValueError(f"{where} has NaN or Inf entries; refusing to save a broken adapter")
        if not torch.isfinite(layer.weight).all():
            bad = int((~torch.isfinite(layer.weight)).sum())
            raise ValueError(f"{lpath}.weight has {bad} NaN/Inf entries: the base is broken, and an adapter's "
                             "fingerprint of it could not tell it from another base; refusing to save")
        rank = layer.rank
        basis, gap, diff = _basis_facts(layer) if slot is not None else _compute_basis_facts(layer)
        derivable = diff <= _DERIVABLE_TOL.get(layer.weight.dtype, 1e-4)
        reason = (
            "include_basis=True" if include_basis
            else f"A and B are not the SVD of W (relative difference {diff:.3g})" if not derivable
            else f"min relative singular-value gap {gap:.3g} < {GAP_THRESHOLD:g}" if gap < GAP_THRESHOLD
            else None
        )
        key = PEFT_KEY_PREFIX + lpath
        tensors[f"{key}.lora_R"] = R.detach().cpu().contiguous().clone()
        if reason is not None:
            tensors[f"{key}.lora_A"] = layer.lora_A.detach().cpu().contiguous().clone()
            tensors[f"{key}.lora_B"] = layer.lora_B.detach().cpu().contiguous().clone()
        layer_cfg[lpath] = layer_entry(
            layer.weight, rank, layer.scaling, layer.bias is not None, bool(getattr(layer, "fan_in_fan_out", False)),
            basis.pivots, basis.singular_values, gap, reason)
    saved_keys: dict[str, list[str]] = {}
    for mpath in modules_to_save:
        try:
            mod = model.get_submodule(mpath)
        except AttributeError:
            raise ValueError(f"modules_to_save names {mpath!r}, which is not a module of the model") from None
        sd = mod.state_dict()
        saved_keys[mpath] = sorted(sd)
        for k, v in sd.items():
            # clone: tied weights share memory
            tensors[f"{PEFT_KEY_PREFIX}{mpath}.{k}"] = v.detach().cpu().contiguous().clone()
    ranks = {c["rank"] for c in layer_cfg.values()}
    scalings = {c["scaling"] for c in layer_cfg.values()}
    first = next(iter(layer_cfg.values()))
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library": "loraxs_kernels",
        # PEFT's fields (loraxs_kernels.peft.LoraXSConfig). r and scaling: the layers' common values; where
        # layers differ, each layer's own entry in "layers" is what both loaders use.
        "peft_type": PEFT_TYPE_NAME,
        "task_type": task_type if task_type is not None else task_type_of(model),
        "base_model_name_or_path": getattr(model, "name_or_path", None) or None,
        "inference_mode": True,
        "rank": next(iter(ranks)) if len(ranks) == 1 else None,  # version 1's field, kept for its readers
        "r": ranks.pop() if len(ranks) == 1 else max(c["rank"] for c in layer_cfg.values()),
        "scaling": scalings.pop() if len(scalings) == 1 else first["scaling"],
        "init": "svd",
        "r_dtype": common_dtype(R.dtype for _, _, R in layers),
        "dtype": common_dtype(R.dtype for _, _, R in layers),
        "svd": dict(SVD_FACTS),
        "fingerprint_tolerance": dict(FINGERPRINT_FACTS),
        "target_modules": [p for p, _, _ in layers],
        "modules_to_save": list(modules_to_save),
        "saved_module_keys": saved_keys,
        "layers": layer_cfg,
    }
    return write_adapter_dir(path, tensors, config, {"format": "pt", "loraxs_format": FORMAT_NAME})


# ------------------------------------------------------------------------------------------ load
def _r_dtype(file_dtype: torch.dtype, weight_dtype: torch.dtype) -> torch.dtype:
    # The op takes R in the layer's dtype or as an fp32 master copy: keep the file's fp32 R beside half weights.
    return file_dtype if file_dtype in (weight_dtype, torch.float32) else weight_dtype


def load_adapter(model: nn.Module, path, *, slot=None, **layer_kwargs) -> nn.Module:
    """Load an adapter saved by save_adapter into `model`, in place; return the model.

    On a plain base model, each listed module (nn.Linear or Conv1D) becomes a FusedLoRAXSLinear
    around its own weight (no copy), with A and B recomputed by the same SVD (signs from the stored
    pivots) or taken from the file where it stores them, and R from the file. On a model that
    already has FusedLoRAXSLinear layers at those paths, their A and B are recomputed the same way
    and R and the scaling are loaded into them. modules_to_save are restored. Afterwards, as after
    apply_loraxs, only the R's and the modules_to_save train. layer_kwargs go to new layers
    (backend, r_dtype).

    Refuses with AdapterError (a ValueError) naming the first mismatching layer an adapter made for
    another base (fingerprint), rank or shape, and any malformed file; FileNotFoundError for a
    missing path. Everything is checked before the model is touched: on any error it is unchanged.

    slot: an int loads the file into adapter `slot` of the model's MultiLoRAXSLinear banks instead,
    in place (see load_adapter_slot); None (default) is the behaviour above.
    """
    if slot is not None:
        return load_adapter_slot(model, path, slot)
    cfg, tensors = read_adapter(path)
    plans = []
    svd_of = {}
    for lpath, lc in cfg["layers"].items():
        module = _module_at(model, lpath)
        rank = lc["rank"]
        if isinstance(module, FusedLoRAXSLinear):
            if module.rank != rank:
                raise AdapterError(f"layer {lpath}: the model's LoRA-XS layer has rank {module.rank}, the adapter rank {rank}")
            weight = module.weight
        elif is_adaptable(module):
            weight = base_tensors(module)[0]
        elif isinstance(module, MultiLoRAXSLinear):
            raise AdapterError(f"layer {lpath}: the model's module is a MultiLoRAXSLinear bank of {module.num_adapters} "
                               "adapters: load the file into one of its slots with load_adapter(model, path, slot=i)")
        else:
            raise AdapterError(
                f"layer {lpath}: the model's module is a {type(module).__name__}, not an nn.Linear, Conv1D or FusedLoRAXSLinear"
            )
        shape = (lc["out_features"], lc["in_features"])
        if tuple(weight.shape) != shape:
            raise AdapterError(
                f"layer {lpath}: the base weight is (out, in) = {tuple(weight.shape)}, the adapter was made for {shape}"
            )
        if lc.get("bias") is not None and (getattr(module, "bias", None) is not None) != bool(lc["bias"]):
            raise AdapterError(f"layer {lpath}: the adapter's base {'has' if lc['bias'] else 'has no'} bias, this one differs")
        if weight.is_meta:
            raise AdapterError(f"layer {lpath}: the base weight is on the meta device (not loaded yet)")
        if lc["basis"] == "stored":
            A = tensors[f"{lpath}.lora_A"].to(device=weight.device, dtype=weight.dtype)
            B = tensors[f"{lpath}.lora_B"].to(device=weight.device, dtype=weight.dtype)
            S = None
        else:
            basis = svd_basis(weight, rank, pivots=lc["pivots"])
            A, B, S = basis.A, basis.B, basis.singular_values
            svd_of[lpath] = basis  # kept on the layer: save_adapter then needs no SVD
        why = fingerprint_mismatch(lc["fingerprint"], weight, singular_values=S)
        if why is not None:
            raise AdapterError(f"layer {lpath}: this adapter was made for another base model: {why}")
        R = tensors[f"{lpath}.lora_R"]
        plans.append((lpath, module, lc, A, B, R, weight))

    mts = list(cfg["modules_to_save"])
    adapted = {id(p[1]) for p in plans}
    mts_plans = []
    for mpath in mts:
        try:
            mod = model.get_submodule(mpath)
        except AttributeError:
            raise AdapterError(f"modules_to_save {mpath}: the model has no module at this path") from None
        if any(id(sub) in adapted or isinstance(sub, FusedLoRAXSLinear) for sub in mod.modules()):
            raise AdapterError(f"modules_to_save {mpath}: holds a layer the adapter adapts")
        own = mod.state_dict()
        keys = cfg["saved_module_keys"][mpath]
        if sorted(own) != sorted(keys):
            raise AdapterError(
                f"modules_to_save {mpath}: the model's module has entries {sorted(own)[:6]}, the adapter {sorted(keys)[:6]}"
            )
        sub = {}
        for k in keys:
            t = tensors[f"{mpath}.{k}"]
            if tuple(t.shape) != tuple(own[k].shape):
                raise AdapterError(
                    f"modules_to_save {mpath}.{k}: shape {tuple(t.shape)} in the adapter, {tuple(own[k].shape)} in the model"
                )
            sub[k] = t.to(device=own[k].device, dtype=own[k].dtype)
        mts_plans.append((mod, sub))

    # Everything is checked; from here on only copies and swaps, undone together if anything raises.
    slots = named_slots(model)
    previous = list(getattr(model, MODULES_TO_SAVE_ATTR, None) or [])
    with Transaction(model) as tx:
        for lpath, module, lc, A, B, R, weight in plans:
            if isinstance(module, FusedLoRAXSLinear):
                with torch.no_grad():
                    module.lora_A.copy_(A)
                    module.lora_B.copy_(B)
                    module.lora_R.copy_(R)
                remember_basis(module, svd_of.get(lpath))
                module.scaling = float(lc["scaling"])
                continue
            kwargs = dict(layer_kwargs)
            kwargs.pop("r_init", None)  # R comes from the file
            kwargs.setdefault("r_dtype", _r_dtype(R.dtype, weight.dtype))
            layer = FusedLoRAXSLinear.from_linear(
                module, lc["rank"], lc["scaling"], share_weight=True, basis=svd_of.get(lpath, (A, B)), r_init="zeros",
                **kwargs
            )
            with torch.no_grad():
                layer.lora_R.copy_(R)
            for _, parent, name, child in slots:
                if child is module:
                    tx.setattr(parent, name, layer)
        for mod, sub in mts_plans:
            mod.load_state_dict(sub, strict=True)
        mark_trainable(model, previous + [p for p in mts if p not in previous])
    return model
