"""One adapter file into one slot of a model's MultiLoRAXSLinear banks (load_adapter(..., slot=i)):
the banks share A, B and the scaling across slots, so the file must agree with them."""

from __future__ import annotations

import math

import torch
from torch import nn

from ..modules.multi import MultiLoRAXSLinear
from .fingerprint import fingerprint_mismatch
from .format import AdapterError, _module_at, read_adapter

# Relative difference between a layer's A, B and the SVD recomputed from its weight below which the
# basis counts as the SVD's: the recomputation is the same call on the same W, so it repeats to
# rounding (the fp32 SVD to ~1e-6 across thread counts); a random or imported basis differs by O(1).
_DERIVABLE_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}

def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-300))


def _multi_layers(model: nn.Module) -> list[tuple[str, MultiLoRAXSLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, MultiLoRAXSLinear)]


def _check_slot(slot, layers: list[tuple[str, MultiLoRAXSLinear]]) -> int:
    if isinstance(slot, bool) or not isinstance(slot, int):
        raise TypeError(f"slot must be an int, the index of one adapter in the MultiLoRAXSLinear banks, got {slot!r}")
    for lpath, layer in layers:
        if not 0 <= slot < layer.num_adapters:
            raise IndexError(f"slot {slot} is out of range: {lpath} holds {layer.num_adapters} adapters "
                             f"(slots 0 to {layer.num_adapters - 1})")
    return slot


def _svd_residual(weight: torch.Tensor, A: torch.Tensor, B: torch.Tensor) -> float:
    """How far (A, B) is from r singular pairs of W (Wᵀ = U Σ Vᵀ, A = U_r Σ_r, B = V_rᵀ): the largest of
    ‖Wᵀ b_i − a_i‖ / σ_i and ‖W a_i − σ_i² b_i‖ / σ_i² over the columns a_i of A and rows b_i of B, with
    σ_i = ‖a_i‖. Zero for the SVD (with any signs), no SVD needed: two GEMMs of r columns.
    Measured on all-MiniLM-L6-v2 (12 layers, r = 16): at most 1.6e-6 for the SVD basis in fp32, 4.0e-4
    in fp16, 2.2e-3 in bf16 (A and B rounded to the weight's dtype); at least 1.13 for random
    orthonormal subspaces, with Σ_r on A or with A = Wᵀ Bᵀ."""
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W, A, B = weight.detach().to(work), A.detach().to(work), B.detach().to(work)
    s2 = (A * A).sum(dim=0).clamp_min(torch.finfo(work).tiny)
    r1 = torch.linalg.vector_norm(W.t() @ B.t() - A, dim=0) / s2.sqrt()
    r2 = torch.linalg.vector_norm(W @ A - B.t() * s2, dim=0) / s2
    return float(torch.maximum(r1, r2).max())


def load_adapter_slot(model: nn.Module, path, slot: int) -> nn.Module:
    """Load a single-adapter file (save_adapter's, from any model: plain, FusedLoRAXSLinear, or one
    slot of a bank) into adapter `slot` of the model's MultiLoRAXSLinear banks, in place; return the
    model. Only that slot changes (the banks are not reallocated); banks the file does not name get
    zeros in that slot, so rows with id `slot` compute what the file's adapter computes.

    The checks of load_adapter (base fingerprint, shapes, bias, rank), and three for the bank:
    - every layer of the file is a MultiLoRAXSLinear whose scaling equals the file's (one float per
      layer, shared by every slot);
    - the file's basis is the bank's, which every slot shares. A file whose basis is the SVD of W is
      checked against the bank without an SVD (_svd_residual, and the bank's singular values against
      the fingerprint's); a stored basis is compared with the bank's. A singular pair whose sign
      differs (the file's pivots, or a stored basis) is taken care of exactly: flipping pair i
      negates column i of A and row i of B, so R's row and column i are negated on the way in;
    - modules_to_save are shared by every slot: the file's must equal the model's.
    Raises AdapterError (a ValueError) naming the layer, IndexError for a slot out of range,
    ValueError for a model without banks; on any error the model is unchanged.
    """
    cfg, tensors = read_adapter(path)
    multi = _multi_layers(model)
    if not multi:
        raise ValueError(
            f"load_adapter(..., slot={slot!r}): the model has no MultiLoRAXSLinear layers "
            "(apply_loraxs(model, rank, target_modules, num_adapters=n) makes them); leave slot=None to load the "
            "file into plain or FusedLoRAXSLinear layers")
    _check_slot(slot, multi)
    plans = []
    for lpath, lc in cfg["layers"].items():
        module = _module_at(model, lpath)
        if not isinstance(module, MultiLoRAXSLinear):
            raise AdapterError(
                f"layer {lpath}: the model's module is a {type(module).__name__}, not a MultiLoRAXSLinear; a file "
                "loaded into a slot must name bank layers only (apply_loraxs(..., num_adapters=n) with these layers "
                "among target_modules)")
        rank, weight = lc["rank"], module.weight
        if module.rank != rank:
            raise AdapterError(f"layer {lpath}: the model's bank has rank {module.rank}, the adapter rank {rank}")
        shape = (lc["out_features"], lc["in_features"])
        if tuple(weight.shape) != shape:
            raise AdapterError(
                f"layer {lpath}: the base weight is (out, in) = {tuple(weight.shape)}, the adapter was made for {shape}")
        if lc.get("bias") is not None and (module.bias is not None) != bool(lc["bias"]):
            raise AdapterError(f"layer {lpath}: the adapter's base {'has' if lc['bias'] else 'has no'} bias, this one differs")
        if weight.is_meta:
            raise AdapterError(f"layer {lpath}: the base weight is on the meta device (not loaded yet)")
        if not math.isclose(float(lc["scaling"]), module.scaling, rel_tol=1e-12, abs_tol=0.0):
            s_f, s_b = float(lc["scaling"]), module.scaling
            raise AdapterError(
                f"layer {lpath}: the adapter's scaling is {s_f:g}, the bank's {s_b:g}, and every slot of a bank shares "
                f"one scaling. Build the banks with apply_loraxs(..., scaling={s_f:g}), or fold the ratio into R: "
                f"save the adapter from a model whose R is multiplied by {s_f:g}/{s_b:g} = {s_f / s_b:g} and whose "
                f"scaling is {s_b:g} (the same layer)")
        A_bank, B_bank = module.lora_A, module.lora_B
        tol = _DERIVABLE_TOL.get(weight.dtype, 1e-4)
        if lc["basis"] == "stored":
            A_f, B_f = tensors[f"{lpath}.lora_A"], tensors[f"{lpath}.lora_B"]
            work = torch.float64
            A_f, B_f = A_f.to(device=A_bank.device, dtype=work), B_f.to(device=B_bank.device, dtype=work)
            signs = torch.sign((A_f * A_bank.to(work)).sum(dim=0))
            signs[signs == 0] = 1
            diff = max(_rel(A_f * signs, A_bank), _rel(B_f * signs[:, None], B_bank))
            tol = max(tol, _DERIVABLE_TOL.get(tensors[f"{lpath}.lora_A"].dtype, 1e-4))
            if diff > tol:
                raise AdapterError(
                    f"layer {lpath}: the adapter's stored basis (A, B) differs from the bank's by {diff:.3g} (relative, "
                    f"after sign flips; at most {tol:g} allowed): every slot of a bank shares its A and B, so this "
                    "adapter cannot go into a slot; load it with slot=None into a plain or FusedLoRAXSLinear model")
            singular_values = None
        else:
            residual = _svd_residual(weight, A_bank, B_bank)
            if not residual <= tol:
                raise AdapterError(
                    f"layer {lpath}: the adapter's basis is the SVD of W, the bank's A and B are not (residual "
                    f"{residual:.3g} > {tol:g}, see _svd_residual): every slot of a bank shares its A and B, so this "
                    "adapter cannot go into a slot; load it with slot=None into a plain or FusedLoRAXSLinear model")
            cols = torch.arange(rank, device=A_bank.device)
            pivots = torch.as_tensor(lc["pivots"], dtype=torch.int64, device=A_bank.device)
            signs = torch.sign(A_bank.detach()[pivots, cols].double())  # the file's A has A[pivot_i, i] > 0
            signs[signs == 0] = 1
            singular_values = torch.linalg.vector_norm(A_bank.detach().double(), dim=0)
        why = fingerprint_mismatch(lc["fingerprint"], weight, singular_values=singular_values)
        if why is not None:
            raise AdapterError(f"layer {lpath}: this adapter was made for another base model: {why}")
        R = tensors[f"{lpath}.lora_R"].to(torch.float64)
        signs = signs.to(device="cpu", dtype=torch.float64)
        plans.append((module, (R * signs[:, None] * signs[None, :])))

    for mpath in cfg["modules_to_save"]:
        try:
            mod = model.get_submodule(mpath)
        except AttributeError:
            raise AdapterError(f"modules_to_save {mpath}: the model has no module at this path") from None
        own = mod.state_dict()
        keys = cfg["saved_module_keys"][mpath]
        same = sorted(own) == sorted(keys) and all(
            tuple(tensors[f"{mpath}.{k}"].shape) == tuple(own[k].shape)
            and torch.equal(tensors[f"{mpath}.{k}"].to(device=own[k].device, dtype=own[k].dtype), own[k]) for k in keys)
        if not same:
            raise AdapterError(
                f"modules_to_save {mpath}: the adapter holds its own copy of this module, which differs from the model's; "
                "modules_to_save are shared by every slot of the banks, so loading them into one slot would change every "
                "adapter: load the file with slot=None into a separate model, or save the adapter without them "
                "(save_adapter(..., modules_to_save=[]))")

    # Everything is checked: only in-place copies of one slot from here on.
    named = {id(m) for m, _ in plans}
    with torch.no_grad():
        for module, R in plans:
            module.lora_R[slot].copy_(R.to(device=module.lora_R.device))
        for _, layer in multi:
            if id(layer) not in named:
                layer.lora_R[slot].zero_()
    return model
