"""LoraXSModel: the PEFT tuner that puts LoraXSLayer in place of the targeted linear layers.

Matching is PEFT's own (BaseTuner.inject_adapter with check_target_module_exists and its
"all-linear" expansion), so target_modules / exclude_modules mean exactly what they mean for LoRA.

Two ways in:
- a fresh config (no `layers`): each targeted layer gets its basis (init "svd": svd_basis; "random"),
  and the config records per layer what an adapter file needs (pivots, basis kind, fingerprint of the
  base weight: adapters/format.py's layer_entry), so save_pretrained never runs an SVD;
- a config read from a file (`layers` filled): every listed layer is checked against the model first
  (shape, bias, fingerprint: an adapter made for another base is refused with AdapterError) and its
  basis is recomputed with the stored pivots, or taken from the file where it is stored. Nothing is
  replaced before all checks pass, and a failure while replacing puts every replaced module back.

State-dict keys: the model holds `<path>.loraxs_layer.<adapter>.lora_R`; the file holds
`<path>.lora_R` (and `.lora_A` / `.lora_B` where the basis is stored) under PEFT's
`base_model.model.` prefix: the key spelling save_adapter writes too (format_version 2).
"""

from __future__ import annotations

import re

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..adapters import files as _files
from ..adapters.fingerprint import fingerprint_mismatch
from ..modules.linear import base_tensors
from ..modules.model import is_adaptable
from ..modules.svd_init import min_relative_gap, svd_basis
from .layer import LAYER_ATTR, LoraXSLayer

PEFT_PREFIX = "base_model.model."
_MODEL_KEY = re.compile(rf"^(?P<path>.*)\.{LAYER_ATTR}\.(?P<adapter>[^.]+)\.(?P<tensor>lora_R|lora_A|lora_B)$")


def _r_dtype(config, weight: torch.Tensor) -> torch.dtype:
    if config.r_dtype is not None:
        return getattr(torch, config.r_dtype)
    # An AdamW step at lr 1e-4 changes only a quarter of a bf16 R's entries (issue 18): keep R in fp32 beside
    # half-precision weights, as PEFT's autocast_adapter_dtype does for its own adapters.
    return torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype


def _random_basis(weight: torch.Tensor, r: int):
    # Unit-variance rows of x·A for unit-variance x, and B's rows of unit norm: the rank-r term starts at
    # the scale of R, as the SVD basis's does relative to W.
    out_f, in_f = weight.shape
    A = torch.randn(in_f, r, device=weight.device, dtype=torch.float32) / in_f ** 0.5
    B = torch.randn(r, out_f, device=weight.device, dtype=torch.float32) / out_f ** 0.5
    return A.to(weight.dtype), B.to(weight.dtype)


def _strip(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


class LoraXSModel(BaseTuner):
    # The string PEFT looks for in state-dict keys to find this method's tensors (its "missing adapter keys"
    # check on load among them). Only R's key holds it: W and b are shared with the base layer and A, B are
    # recomputed from W, so a file legitimately lacks them and PEFT must not report them missing.
    prefix: str = "lora_R"
    tuner_layer_cls = LoraXSLayer
    target_module_mapping: dict = {}

    # ------------------------------------------------------------------------------ injection
    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        self._planned = self._plan_from_file(model, config) if config.layers else None
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        flags = [(p, p.requires_grad) for p in model.parameters()]  # building a layer freezes its base in place
        try:
            super().inject_adapter(model, adapter_name, *args, **kwargs)
            if self._planned is not None:
                done = set(self.targeted_module_names)
                missing = sorted(set(self._planned) - done)
                if missing:
                    raise _files.AdapterError(
                        f"the adapter lists layers that its target_modules {config.target_modules!r} did not match in "
                        f"this model: {missing[:5]}")
        except BaseException:
            for parent, name, old in reversed(self._replaced):
                setattr(parent, name, old)
            for p, flag in flags:
                p.requires_grad_(flag)
            for m in model.modules():  # layers that already held other adapters got this one added
                if isinstance(m, LoraXSLayer) and adapter_name in m.loraxs_layer:
                    del m.loraxs_layer[adapter_name]
            if self._planned is None:  # a fresh config records only layers that exist
                config.layers.clear()
            raise
        finally:
            self._planned = None

    def _plan_from_file(self, model: nn.Module, config) -> dict:
        """Check every layer a loaded config lists against `model`, before anything is replaced; return
        {path: (A, B)} (None where the file stores the basis: loaded with the weights)."""
        plans = {}
        for path, lc in config.layers.items():
            try:
                module = model.get_submodule(path)
            except AttributeError:
                raise _files.AdapterError(f"layer {path}: the model has no module at this path") from None
            base = module.base_layer if isinstance(module, LoraXSLayer) else module
            if not is_adaptable(base):
                raise _files.AdapterError(f"layer {path}: the model's module is a {type(base).__name__}, "
                                          "not an nn.Linear or Conv1D")
            weight, bias, _ = base_tensors(base)
            shape = (lc["out_features"], lc["in_features"])
            if tuple(weight.shape) != shape:
                raise _files.AdapterError(f"layer {path}: the base weight is (out, in) = {tuple(weight.shape)}, "
                                          f"the adapter was made for {shape}")
            if lc.get("bias") is not None and (bias is not None) != bool(lc["bias"]):
                raise _files.AdapterError(
                    f"layer {path}: the adapter's base {'has' if lc['bias'] else 'has no'} bias, this one differs")
            if lc["basis"] == "stored":
                basis, S = None, None
            else:
                found = svd_basis(weight, lc["rank"], pivots=lc["pivots"])
                basis, S = (found.A, found.B), found.singular_values
            why = fingerprint_mismatch(lc["fingerprint"], weight, singular_values=S)
            if why is not None:
                raise _files.AdapterError(f"layer {path}: this adapter was made for another base model: {why}")
            plans[path] = basis
        return plans

    def _create_and_replace(self, peft_config, adapter_name, target, target_name, parent, current_key, **kwargs):
        base = target.base_layer if isinstance(target, LoraXSLayer) else target
        if not is_adaptable(base):
            raise TypeError(
                f"LoRA-XS adapts nn.Linear and transformers Conv1D layers; target_modules {peft_config.target_modules!r} "
                f"matched {current_key}, a {type(base).__name__}: narrow target_modules or add it to exclude_modules")
        weight, bias, fan_in_fan_out = base_tensors(base)
        planned = getattr(self, "_planned", None)
        # A file's layers may differ in rank (save_adapter of a model loaded from several files): each layer's
        # own entry decides; r is the rank of a fresh adapter.
        r = peft_config.layers[current_key]["rank"] if planned and current_key in planned else peft_config.r
        if not r <= min(weight.shape):
            raise ValueError(f"LoraXSConfig: r={r} does not fit {current_key} (out, in) = {tuple(weight.shape)}: "
                             f"r must be ≤ {min(weight.shape)}")
        if planned is not None:
            if current_key not in planned:
                raise _files.AdapterError(
                    f"layer {current_key}: matched by the adapter's target_modules but not described in its 'layers'")
            lc = peft_config.layers[current_key]
            basis = planned[current_key]
            if basis is None:  # stored in the file: placeholders until the weights are loaded
                basis = (torch.zeros(weight.shape[1], r, dtype=weight.dtype, device=weight.device),
                         torch.zeros(r, weight.shape[0], dtype=weight.dtype, device=weight.device))
            scaling = float(lc["scaling"])
        else:
            if peft_config.init == "svd":
                found = svd_basis(weight, r)
                basis, S, pivots = (found.A, found.B), found.singular_values, found.pivots
                gap = min_relative_gap(S, r)
                reason = (f"min relative singular-value gap {gap:.3g} < {_files.GAP_THRESHOLD:g}"
                          if gap < _files.GAP_THRESHOLD else None)
            else:
                basis, S = _random_basis(weight, r), None
                pivots = basis[0].abs().argmax(dim=0)
                gap, reason = None, "init='random': A and B are not the SVD of W"
            scaling = peft_config.scaling
            peft_config.layers[current_key] = _files.layer_entry(
                weight, r, scaling, bias is not None, fan_in_fan_out, pivots, S, gap, reason)
        r_dtype = _r_dtype(peft_config, weight)
        if isinstance(target, LoraXSLayer):
            target.update_layer(adapter_name, r, scaling, basis, r_dtype, peft_config.r_init)
            target.set_adapter(self.active_adapters)  # a new, inactive adapter does not train
            return
        new = LoraXSLayer(target)
        new.update_layer(adapter_name, r, scaling, basis, r_dtype, peft_config.r_init)
        new.set_adapter(self.active_adapters)  # the tuner's active adapters, whatever their names
        getattr(self, "_replaced", []).append((parent, target_name, target))
        setattr(parent, target_name, new)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        from peft.utils.other import AuxiliaryTrainingWrapper

        aux = [m for m in model.modules() if isinstance(m, AuxiliaryTrainingWrapper)]
        keep = {id(p) for m in aux for p in m.parameters()}  # they manage their own flags
        for p in model.parameters():
            if id(p) not in keep:
                p.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, LoraXSLayer):
                m.set_adapter(m.active_adapters)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        # PEFT's cast walks whole adapter modules and would upcast the shared base weight too; R's dtype is
        # chosen when the layer is built (config.r_dtype, fp32 beside half weights by default).
        return None

    # ------------------------------------------------------------------------------ state dict
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        """R of every layer of this adapter; A and B where config.layers says the basis is stored. Also records
        the modules_to_save entries about to be written (saved_module_keys), so load_adapter can read the file."""
        out = {}
        for key, value in state_dict.items():
            m = _MODEL_KEY.match(key)
            if m is None or m["adapter"] != adapter_name:
                continue
            path = _strip(m["path"])
            lc = config.layers.get(path)
            if lc is None:
                raise _files.AdapterError(f"layer {path} holds adapter {adapter_name!r} but the config has no entry for it")
            if m["tensor"] == "lora_R" or lc["basis"] == "stored":
                out[key] = value
        if not any(k.endswith(".lora_R") for k in out):
            raise _files.AdapterError(f"adapter {adapter_name!r}: the model holds no LoRA-XS layer for it")
        config.saved_module_keys = _saved_module_keys(model, adapter_name)
        config.dtype = _files.common_dtype([v.dtype for k, v in out.items() if k.endswith(".lora_R")])
        return out

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        m = _MODEL_KEY.match(key)
        if m is None or m["adapter"] != adapter_name:
            return key
        return f"{m['path']}.{m['tensor']}"

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """File keys -> model keys, after checking the file holds exactly the tensors config.layers describes."""
        prefixed = any(k.startswith(PEFT_PREFIX) for k in model.state_dict())
        to_model = {}
        for key in model.state_dict():
            m = _MODEL_KEY.match(key)
            if m is not None and m["adapter"] == adapter_name:
                to_model[PEFT_PREFIX + _strip(m["path"]) + "." + m["tensor"]] = key
        needed = []
        for path, lc in config.layers.items():
            needed.append(f"{PEFT_PREFIX}{path}.lora_R")
            if lc["basis"] == "stored":
                needed += [f"{PEFT_PREFIX}{path}.lora_A", f"{PEFT_PREFIX}{path}.lora_B"]
        have = {k if k.startswith(PEFT_PREFIX) else PEFT_PREFIX + k for k in state_dict}
        missing = [k for k in needed if k not in have]
        if missing:
            raise _files.AdapterError(f"adapter {adapter_name!r}: the weights file lacks {missing[:5]} that "
                                      "adapter_config.json's 'layers' lists")
        out = {}
        for key, value in state_dict.items():
            full = key if key.startswith(PEFT_PREFIX) else PEFT_PREFIX + key
            if full in to_model:
                out[to_model[full]] = value
            else:
                out[key if prefixed or not key.startswith(PEFT_PREFIX) else _strip(key)] = value
        return out


def _saved_module_keys(model: nn.Module, adapter_name: str) -> dict:
    from peft.utils.other import ModulesToSaveWrapper

    keys = {}
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save:
            path = _strip(name.removeprefix("_fsdp_wrapped_module."))
            keys[path] = sorted(module.modules_to_save[adapter_name].state_dict())
    return keys
