"""The PEFT tuner layer for LoRA-XS: one FusedLoRAXSLinear per adapter name around the shared base layer.

Why this shape (one layer class for both entry points): apply_loraxs puts a FusedLoRAXSLinear in
place of an nn.Linear; PEFT needs a BaseTunerLayer that keeps the original module as `base_layer`
(unload() hands it back) and can hold several named adapters of possibly different ranks. So this
layer holds `base_layer` and a ModuleDict `loraxs_layer` of FusedLoRAXSLinear modules built by
FusedLoRAXSLinear.from_linear(base_layer, share_weight=True): each shares the base weight and bias
(the same Parameter objects, no copy) and owns its frozen A, B and trainable R. The forward of the
active adapter IS FusedLoRAXSLinear.forward (the fused op with the base GEMM inside it), so both
entry points run the same module and kernels, and merge uses the same fp32 formula as merge_loraxs.

PEFT's generic helpers toggle requires_grad and cast dtypes on whole adapter modules
(`adapter_layer_names`); on a FusedLoRAXSLinear that would unfreeze or upcast the shared base weight
(the op refuses a trainable W). The ModuleDict is therefore listed in `other_param_names` (so
PEFT's add/delete/list logic sees the adapter names) and the grad toggles are done here on R alone.
"""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from ..modules.linear import FusedLoRAXSLinear, base_tensors

LAYER_ATTR = "loraxs_layer"


class LoraXSLayer(nn.Module, BaseTunerLayer):
    adapter_layer_names: tuple[str, ...] = ()
    other_param_names: tuple[str, ...] = (LAYER_ATTR,)

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer  # first, so named_parameters() names the shared W after base_layer
        self.loraxs_layer = nn.ModuleDict()
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        weight, _, _ = base_tensors(base_layer)
        self.out_features, self.in_features = weight.shape

    def update_layer(self, adapter_name: str, r: int, scaling: float, basis, r_dtype, r_init: str,
                     trainable: bool = True) -> None:
        """Add adapter `adapter_name`: a FusedLoRAXSLinear on the shared base with basis (A, B)."""
        fused = FusedLoRAXSLinear.from_linear(self.base_layer, r, scaling, share_weight=True, basis=basis,
                                              r_dtype=r_dtype, r_init=r_init)
        self.loraxs_layer[adapter_name] = fused
        fused.lora_R.requires_grad_(trainable)
        self.set_adapter(self.active_adapters)

    # --- requires_grad on R only (see the module docstring)
    def _set_R_grad(self, names, flag: bool) -> None:
        for name, fused in self.loraxs_layer.items():
            if name in names:
                fused.lora_R.requires_grad_(flag)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names]
        for name, fused in self.loraxs_layer.items():
            fused.lora_R.requires_grad_(name in adapter_names and not inference_mode)
        self._active_adapter = list(adapter_names)

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self.active_adapters)
            self._disable_adapters = False
        else:
            self._set_R_grad(set(self.loraxs_layer), False)
            self._disable_adapters = True

    def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        self._set_R_grad(names, requires_grad)

    def _freeze_non_trainable_peft_weights(self, adapter_names=None) -> None:
        return None  # everything but R is frozen from the start

    # --- merge: W += s·(A R B)ᵀ in fp32 (fp64 for fp64 weights), rounded once, as merge_loraxs does
    @torch.no_grad()
    def _delta(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        fused = self.loraxs_layer[name]
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        return fused.scaling * (fused.lora_A.to(work) @ fused.lora_R.to(work) @ fused.lora_B.to(work)).t()

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = base_tensors(self.base_layer)[0]  # (out, in); a view into a Conv1D's (in, out) weight
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        for name in adapter_names:
            if name not in self.loraxs_layer:
                continue
            merged = weight.to(work) + self._delta(name, weight)
            if safe_merge and not torch.isfinite(merged).all():
                raise ValueError(f"merging adapter {name!r} into a {tuple(weight.shape)} layer gives NaN/Inf entries; "
                                 "the base weight was left unchanged")
            weight.copy_(merged.to(weight.dtype))
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        weight = base_tensors(self.base_layer)[0]
        work = torch.float64 if weight.dtype == torch.float64 else torch.float32
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.loraxs_layer:
                weight.copy_((weight.to(work) - self._delta(name, weight)).to(weight.dtype))

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        weight = base_tensors(self.base_layer)[0]
        return self._delta(adapter_name, weight).to(weight.dtype)

    # --- forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.loraxs_layer]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        # The first active adapter runs the fused op (base GEMM + its rank-r term); further active adapters
        # (PEFT allows several at once) add their rank-r terms, which share nothing with the first.
        y = self.loraxs_layer[active[0]](x)
        for name in active[1:]:
            fused = self.loraxs_layer[name]
            xa = x.to(fused.lora_A.dtype) @ fused.lora_A
            y = y + fused.scaling * ((xa @ fused.lora_R.to(xa.dtype)) @ fused.lora_B).to(y.dtype)
        return y

    def __repr__(self) -> str:
        return "loraxs." + super().__repr__()
