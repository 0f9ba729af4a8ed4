"""accelerate_peft: PEFT's own LoRA-XS-like layers run this package's fused op, in place.

Each served layer keeps its class, parameters, buffers and state dict (save_pretrained,
from_pretrained, merge_and_unload and Trainer see PEFT's model unchanged); only the instance's
forward is rebound (Liger-Kernel's `_apply_liger_kernel_to_instance` pattern). Read from PEFT 0.21.2:

- TinyLoRA Linear (peft.tuners.tinylora.layer.Linear, PEFT >= 0.19): frozen buffers
  tinylora_A (r, in) = √Σ_r V_rᵀ, tinylora_B (out, r) = U_r √Σ_r, fixed P (u, r, r), trainable v (u,),
  R_t = Σᵢ vᵢ Pᵢ, and

      base(x) + F.linear(F.linear(F.linear(x, tinylora_A), R_t), tinylora_B)
    = x Wᵀ + b + ((x tinylora_Aᵀ) R_tᵀ) tinylora_Bᵀ,

  so A = tinylora_Aᵀ, R = R_tᵀ = Σᵢ vᵢ Pᵢᵀ, B = tinylora_Bᵀ, s = 1. The √Σ split between A and B needs
  no care: the buffers are used as they are. R is one (u)×(r²) matmul per forward, and autograd
  carries grad_R back to v (and to the group's shared v under weight tying).
- Official LoRA-XS (github MohammadrezaBanaei/LoRA-XS): a PEFT LoRA Linear with an added
  `<adapter>_lora_latent_mapping` nn.Linear(r, r, bias=False) and a forward bound on the instance,
  base(x) + lora_B(latent(lora_A(dropout(x)))) · scaling, so A = lora_A.weightᵀ, R = latent.weightᵀ,
  B = lora_B.weightᵀ, s = scaling. Recognised by that attribute plus an instance-level forward (the
  official patch): a latent mapping beside PEFT's class forward is never used by PEFT, so such a
  layer is plain LoRA and is left alone.

Layers that cannot be served (dropout > 0, fan_in_fan_out, a trainable base bias or weight, a base
layer that is not a plain nn.Linear, rank above the op's limit, TinyLoRA Embedding layers) are left
alone and named in one warning. At call time a served layer hands the call back to PEFT's forward
whenever PEFT's own state makes the fused formula inapplicable: adapters disabled or merged, not
exactly one active adapter, extra forward arguments, tensors of mixed dtypes outside autocast.
"""

from __future__ import annotations

import dataclasses
import types
import warnings

import torch
from torch import nn

from ..ops.checks import MAX_RANK, SUPPORTED_DTYPES
from ..ops.linear import loraxs_linear

# The attribute a served layer keeps PEFT's forward under; its presence marks the layer as served.
UNFUSED_FORWARD = "_loraxs_unfused_forward"
_BACKEND = "_loraxs_backend"
_WARNED = "_loraxs_fallback_warned"
_CAST_CACHE = "_loraxs_cast_cache"


@dataclasses.dataclass(frozen=True)
class Acceleration:
    """What accelerate_peft did: the dotted paths it now serves (newly or from an earlier call), and
    the PEFT layers it left alone with the reason for each."""

    served: tuple[str, ...]
    left_alone: dict[str, str]


def _peft_classes():
    try:
        import peft
    except ImportError as e:
        raise ImportError("accelerate_peft needs the peft package (pip install peft)") from e
    from peft.tuners.lora.layer import Linear as LoraLinear

    try:
        from peft.tuners.tinylora.layer import Linear as TinyLinear
        from peft.tuners.tinylora.layer import TinyLoraLayer
    except ImportError:  # PEFT < 0.19: no TinyLoRA; official LoRA-XS layers can still be served
        TinyLinear = TinyLoraLayer = None
    return peft, LoraLinear, TinyLinear, TinyLoraLayer


# ------------------------------------------------------------------------------------ the math
def tinylora_R(v: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """R = (Σᵢ vᵢ Pᵢ)ᵀ, the r×r matrix of this package's convention for a TinyLoRA layer, in v's
    dtype: one (1, u)×(u, r²) matmul, then a transposed view (the op takes strided R)."""
    u, r = P.shape[0], P.shape[1]
    return (v @ P.to(device=v.device, dtype=v.dtype).reshape(u, r * r)).reshape(r, r).t()


def official_R(latent: nn.Linear) -> torch.Tensor:
    """R = latent.weightᵀ: the official forward applies latent as F.linear(h, weight) = h weightᵀ."""
    return latent.weight.t()


def official_scaling(layer, adapter: str) -> float:
    """s = lora_alpha / r (or / √r with rslora), as PEFT's LoRA layer stores it per adapter."""
    return float(layer.scaling[adapter])


# ------------------------------------------------------------------------------ what is served
def _base_reason(base: nn.Module) -> str | None:
    if not isinstance(base, nn.Linear) or type(base).forward is not nn.Linear.forward:
        return f"base layer is a {type(base).__name__}, not a plain nn.Linear (e.g. a quantized layer)"
    if base.weight.dtype not in SUPPORTED_DTYPES:
        return f"base weight dtype {base.weight.dtype} is not one the op takes"
    for name, t in (("weight", base.weight), ("bias", base.bias)):
        if t is not None and t.requires_grad:
            return (f"base {name} requires grad (e.g. bias='all' or 'tinylora_only'): the op differentiates "
                    "x and R only")
    return None


def _dropout_reason(dropouts: nn.ModuleDict) -> str | None:
    for name, d in dropouts.items():
        if isinstance(d, nn.Dropout) and d.p > 0:
            return f"dropout p = {d.p} on adapter {name!r}: the fused op has no dropout"
        if not isinstance(d, (nn.Dropout, nn.Identity)):
            return f"adapter {name!r} has a {type(d).__name__} as dropout"
    return None


def _tinylora_reason(layer) -> str | None:
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out = True (a Conv1D base): the op takes nn.Linear's (out, in) weight"
    for adapter, A_t in layer.tinylora_A.items():
        if A_t.shape[0] > MAX_RANK:
            return f"rank {A_t.shape[0]} of adapter {adapter!r} is above the op's limit {MAX_RANK}"
    return _dropout_reason(layer.tinylora_dropout) or _base_reason(layer.get_base_layer())


def _official_reason(layer) -> str | None:
    if getattr(layer, "fan_in_fan_out", False):
        return "fan_in_fan_out = True (a Conv1D base): the op takes nn.Linear's (out, in) weight"
    for adapter in layer.lora_A:
        latent = getattr(layer, f"{adapter}_lora_latent_mapping", None)
        if latent is None:
            continue
        if type(latent) is not nn.Linear or latent.bias is not None:
            return f"{adapter}_lora_latent_mapping is not an nn.Linear(r, r, bias=False)"
        if layer.use_dora.get(adapter, False) or layer.lora_bias.get(adapter, False):
            return f"adapter {adapter!r} uses DoRA or lora_bias"
        if layer.r[adapter] > MAX_RANK:
            return f"rank {layer.r[adapter]} of adapter {adapter!r} is above the op's limit {MAX_RANK}"
        for side in ("lora_A", "lora_B"):
            if getattr(layer, side)[adapter].weight.requires_grad:
                return (f"{side}[{adapter!r}] is trainable (official LoRA-XS freezes it): the op "
                        "differentiates x and R only")
    return _dropout_reason(layer.lora_dropout) or _base_reason(layer.get_base_layer())


def _is_official(layer, LoraLinear) -> bool:
    return (isinstance(layer, LoraLinear) and "forward" in vars(layer)
            and any(hasattr(layer, f"{a}_lora_latent_mapping") for a in layer.lora_A))


# ------------------------------------------------------------------------------- the forwards
def _one_active(layer, table) -> str | None:
    if layer.disable_adapters or layer.merged:
        return None
    active = [a for a in layer.active_adapters if a in table]
    return active[0] if len(active) == 1 and len(layer.active_adapters) == 1 else None


def _fused_inputs_ok(layer, x: torch.Tensor, base: nn.Linear, A: torch.Tensor, B: torch.Tensor) -> bool:
    """PEFT's state at call time allows the fused formula: every frozen tensor frozen, and x in the
    base layer's dtype (or autocast, which the op handles like F.linear). A and B may differ: PEFT
    keeps adapter tensors in fp32 beside a bf16/fp16 base (autocast_adapter_dtype), see _like."""
    frozen = (base.weight, base.bias, A, B)
    if any(t is not None and t.requires_grad for t in frozen):
        if not getattr(layer, _WARNED, False):
            setattr(layer, _WARNED, True)
            warnings.warn(f"{type(layer).__name__}: a frozen tensor of this layer now requires grad; it runs "
                          "PEFT's unfused forward from now on while that lasts", RuntimeWarning, stacklevel=4)
        return False
    if torch.is_autocast_enabled(x.device.type):
        return True
    return x.dtype == base.weight.dtype and (base.bias is None or base.bias.dtype == x.dtype)


def _like(layer, key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in the base weight's dtype: PEFT keeps TinyLoRA's A and B (and LoRA's lora_A / lora_B) in
    fp32 beside a bf16 base, and the op takes one compute dtype. The cast copy (r × features) is
    cached per tensor version, outside the state dict."""
    if t.dtype == dtype:
        return t
    cache = layer.__dict__.setdefault(_CAST_CACHE, {})
    stamp = (t.data_ptr(), t._version, t.device, dtype)
    hit = cache.get(key)
    if hit is None or hit[0] != stamp:
        hit = cache[key] = (stamp, t.detach().to(dtype))
    return hit[1]


def _tinylora_forward(self, x, *args, **kwargs):
    adapter = None if args or kwargs else _one_active(self, self.tinylora_A)
    if adapter is None:
        return getattr(self, UNFUSED_FORWARD)(x, *args, **kwargs)
    base = self.get_base_layer()
    A_t, B_t = self.tinylora_A[adapter], self.tinylora_B[adapter]
    if not _fused_inputs_ok(self, x, base, A_t, B_t):
        return getattr(self, UNFUSED_FORWARD)(x, *args, **kwargs)
    R = tinylora_R(self.tinylora_v[adapter][self._tinylora_v_key[adapter]], self.tinylora_P[adapter])
    if R.dtype not in (x.dtype, torch.float32):
        R = R.to(x.dtype)
    w = base.weight.dtype
    A, B = _like(self, f"A.{adapter}", A_t, w).t(), _like(self, f"B.{adapter}", B_t, w).t()
    return loraxs_linear(x, base.weight, base.bias, A, R, B, 1.0, backend=getattr(self, _BACKEND))


def _official_forward(self, x, *args, **kwargs):
    adapter = None if args or kwargs else _one_active(self, self.lora_A)
    latent = getattr(self, f"{adapter}_lora_latent_mapping", None) if adapter is not None else None
    if latent is None:
        return getattr(self, UNFUSED_FORWARD)(x, *args, **kwargs)
    base = self.get_base_layer()
    A_w, B_w = self.lora_A[adapter].weight, self.lora_B[adapter].weight
    if not _fused_inputs_ok(self, x, base, A_w, B_w):
        return getattr(self, UNFUSED_FORWARD)(x, *args, **kwargs)
    R = official_R(latent)
    if R.dtype not in (x.dtype, torch.float32):
        R = R.to(x.dtype)
    w = base.weight.dtype
    A, B = _like(self, f"A.{adapter}", A_w, w).t(), _like(self, f"B.{adapter}", B_w, w).t()
    return loraxs_linear(x, base.weight, base.bias, A, R, B, official_scaling(self, adapter),
                         backend=getattr(self, _BACKEND))


# --------------------------------------------------------------------------------- the entry
def accelerate_peft(model: nn.Module, *, backend: str = "auto") -> Acceleration:
    """Make every PEFT TinyLoRA Linear layer (and every official LoRA-XS layer) of `model` (a
    PeftModel or any module holding such layers) run loraxs_linear, in place. Nothing else changes:
    parameters, buffers, state dict, saved files and PEFT's methods stay PEFT's. Calling it again
    serves layers added since and leaves served ones as they are.

    Returns an Acceleration (served paths, left-alone paths with reasons); the left-alone layers are
    also named in one UserWarning. Raises TypeError for a non-module, ValueError when the model holds
    no TinyLoRA or official LoRA-XS layer at all (nothing to accelerate is a mistake, not a no-op)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"accelerate_peft takes an nn.Module (a PeftModel), got {type(model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string such as 'auto', got {type(backend).__name__}")
    peft, LoraLinear, TinyLinear, TinyLoraLayer = _peft_classes()
    plans, left_alone, served = [], {}, []
    for path, layer in model.named_modules():
        if hasattr(layer, UNFUSED_FORWARD):
            served.append(path)
            continue
        if TinyLoraLayer is not None and isinstance(layer, TinyLoraLayer):
            if not isinstance(layer, TinyLinear):
                left_alone[path] = f"a TinyLoRA {type(layer).__name__} layer: only Linear layers are served"
                continue
            reason, forward = _tinylora_reason(layer), _tinylora_forward
        elif _is_official(layer, LoraLinear):
            reason, forward = _official_reason(layer), _official_forward
        else:
            continue
        if reason is None:
            plans.append((path, layer, forward))
        else:
            left_alone[path] = reason
    if not plans and not served:
        what = f"{type(model).__name__} (PEFT {peft.__version__})"
        if left_alone:
            raise ValueError(f"accelerate_peft: no layer of {what} can be served: " + _listing(left_alone))
        raise ValueError(f"accelerate_peft: {what} holds no PEFT TinyLoRA Linear layer and no official LoRA-XS "
                         "layer (a PEFT LoRA Linear with <adapter>_lora_latent_mapping and the official forward)")
    for path, layer, forward in plans:
        # vars(): the official patch's own instance forward, else PEFT's class forward, bound.
        setattr(layer, UNFUSED_FORWARD, vars(layer).get("forward", layer.forward))
        setattr(layer, _BACKEND, backend)
        layer.forward = types.MethodType(forward, layer)
        served.append(path)
    if left_alone:
        warnings.warn(f"accelerate_peft left {len(left_alone)} PEFT layer(s) on PEFT's own forward: "
                      + _listing(left_alone), UserWarning, stacklevel=2)
    return Acceleration(tuple(served), left_alone)


def _listing(left_alone: dict[str, str]) -> str:
    by_reason: dict[str, list[str]] = {}
    for path, reason in left_alone.items():
        by_reason.setdefault(reason, []).append(path or "(the model itself)")
    return "; ".join(f"{', '.join(paths)}: {reason}" for reason, paths in by_reason.items())
