"""The ways a user fine-tunes a whole model today, each built on the same base, rank and targets.

Every provider but full_ft shares the base model's frozen parameter tensors (a deepcopy whose memo
maps each base parameter to itself), so eight providers of a 100 M model hold its weights once.

- frozen_base: no adapter, every parameter frozen, the input embeddings' output made to require grad
  (transformers' enable_input_require_grads): the backward still runs through every block, computing
  only activation gradients. The floor any adapter's step is measured against.
- ours: apply_loraxs (FusedLoRAXSLinear, the fused op). ours_peft: the PEFT method
  loraxs_kernels.peft.LoraXSConfig, when that module exists.
- peft_lora: PEFT LoRA, r, lora_alpha = r (scaling 1), no dropout.
- peft_tinylora: PEFT TinyLoRA, r, u = r² (as many trainable numbers per layer as LoRA-XS), no tying.
- official_loraxs: the official LoRA-XS construction: PEFT LoRA, lora_A / lora_B set from the SVD of Wᵀ
  (A = U_rΣ_r, B = V_rᵀ) and frozen, an r×r `default_lora_latent_mapping` nn.Linear between them
  (N(0, 1e-5), trainable) and the instance forward base(x) + lora_B(latent(lora_A(dropout(x))))·s.
- peft_tinylora+ours: peft_tinylora, then loraxs_kernels.interop.accelerate_peft.
- full_ft: every parameter trains (its own copy of the weights).
"""

from __future__ import annotations

import copy
import dataclasses
import time
import types
from pathlib import Path
from typing import Callable

import torch
from torch import nn

RANK = 8
PROVIDERS = ("frozen_base", "ours", "ours_peft", "peft_lora", "peft_tinylora", "official_loraxs",
             "peft_tinylora+ours", "full_ft")


@dataclasses.dataclass
class Trainee:
    """One provider's model, ready to step."""

    name: str
    model: nn.Module  # what is called with the batch (a PeftModel for PEFT providers)
    inner: nn.Module  # the transformers model the target paths are relative to
    params: list[nn.Parameter]  # what trains
    init_s: float  # building the adapters (SVDs included), the base copy excluded
    save: Callable[[Path], None] | None  # writes the adapter files (None: nothing to save)

    def adapted_layers(self, targets: list[str]) -> dict[str, nn.Module]:
        return {p: self.inner.get_submodule(p) for p in targets}


def share_base(base: nn.Module) -> nn.Module:
    """A copy of base whose parameters are base's own tensors (modules, hooks and buffers are new)."""
    return copy.deepcopy(base, {id(p): p for p in base.parameters()})


def unavailable_reason(name: str, device: torch.device) -> str | None:
    if name == "full_ft" and device.type != "cpu":
        return "full fine-tuning is measured on the CPU model only (the issue's scope)"
    if name == "ours_peft":
        try:
            from loraxs_kernels.peft import LoraXSConfig  # noqa: F401
        except Exception as e:  # not there yet, or broken: the others still run
            return f"from loraxs_kernels.peft import LoraXSConfig failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    if name in ("peft_tinylora", "peft_tinylora+ours"):
        try:
            from peft import TinyLoraConfig  # noqa: F401
        except ImportError:
            import peft

            return f"PEFT {peft.__version__} has no TinyLoraConfig (PEFT >= 0.19 does)"
    return None


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _freeze(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


# ------------------------------------------------------------------------------------- builders
def _frozen_base(base, targets, rank):
    model = share_base(base)
    _freeze(model)
    model.enable_input_require_grads()
    return model, model, None


def _ours(base, targets, rank):
    from loraxs_kernels import apply_loraxs, save_adapter

    model = share_base(base)
    _freeze(model)
    r_dtype = torch.float32 if base.dtype in (torch.bfloat16, torch.float16) else None
    apply_loraxs(model, rank, targets, scaling=1.0, r_dtype=r_dtype)
    return model, model, lambda d: save_adapter(model, d)


def _ours_peft(base, targets, rank):
    import peft
    from loraxs_kernels.peft import LoraXSConfig

    model = peft.get_peft_model(share_base(base), LoraXSConfig(r=rank, target_modules=list(targets)))
    return model, model.get_base_model(), model.save_pretrained


def _peft_lora(base, targets, rank):
    import peft

    config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=list(targets))
    model = peft.get_peft_model(share_base(base), config)
    return model, model.get_base_model(), model.save_pretrained


def _peft_tinylora(base, targets, rank):
    import peft

    config = peft.TinyLoraConfig(r=rank, u=rank * rank, target_modules=list(targets), save_projection=True)
    model = peft.get_peft_model(share_base(base), config)
    return model, model.get_base_model(), model.save_pretrained


def _tinylora_ours(base, targets, rank):
    from loraxs_kernels import accelerate_peft

    model, inner, save = _peft_tinylora(base, targets, rank)
    done = accelerate_peft(model)
    if done.left_alone or len(done.served) != len(targets):
        raise RuntimeError(f"accelerate_peft served {len(done.served)} of {len(targets)} layers: {done.left_alone}")
    return model, inner, save


def official_forward(self, x, *args, **kwargs):
    """The official LoRA-XS forward (its utils patch PEFT LoRA Linear layers with this shape):
    base(x) + lora_B(latent(lora_A(dropout(x)))) · scaling for the one active adapter."""
    previous_dtype = x.dtype
    result = self.base_layer(x, *args, **kwargs)
    adapter = self.active_adapters[0]
    if self.disable_adapters or self.merged or adapter not in self.lora_A:
        return result
    latent = getattr(self, f"{adapter}_lora_latent_mapping")
    h = x.to(self.lora_A[adapter].weight.dtype)
    result = result + self.lora_B[adapter](latent(self.lora_A[adapter](self.lora_dropout[adapter](h)))) \
        * self.scaling[adapter]
    return result.to(previous_dtype)


def make_official_loraxs(model: nn.Module, rank: int, targets: list[str], lora_alpha: float | None = None,
                         r_dtype: torch.dtype | None = None, seed: int = 0):
    """PEFT LoRA on `model`, turned into the official LoRA-XS layout (see the module docstring).
    Returns the PeftModel; only the latent mappings train."""
    import peft
    from peft.tuners.lora.layer import Linear as LoraLinear

    from loraxs_kernels.modules.svd_init import svd_factors

    config = peft.LoraConfig(r=rank, lora_alpha=rank if lora_alpha is None else lora_alpha, lora_dropout=0.0,
                             target_modules=list(targets))
    pm = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(seed)
    for layer in pm.modules():
        if not isinstance(layer, LoraLinear):
            continue
        base = layer.get_base_layer()
        A, B = svd_factors(base.weight, rank)  # A = U_rΣ_r (in, r), B = V_rᵀ (r, out)
        lat_dtype = r_dtype or layer.lora_A["default"].weight.dtype
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(A.t())
            layer.lora_B["default"].weight.copy_(B.t())
        layer.lora_A["default"].weight.requires_grad_(False)
        layer.lora_B["default"].weight.requires_grad_(False)
        latent = nn.Linear(rank, rank, bias=False, device=base.weight.device, dtype=lat_dtype)
        with torch.no_grad():
            latent.weight.copy_(torch.randn(rank, rank, generator=g) * 1e-5)
        layer.default_lora_latent_mapping = latent
        layer.forward = types.MethodType(official_forward, layer)
    return pm


def _official(base, targets, rank):
    model = make_official_loraxs(share_base(base), rank, targets)
    return model, model.get_base_model(), model.save_pretrained


def _full_ft(base, targets, rank):
    model = copy.deepcopy(base)
    for p in model.parameters():
        p.requires_grad_(True)

    def save(d: Path):
        d.mkdir(parents=True, exist_ok=True)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(d / "model.safetensors"))

    return model, model, save


BUILDERS = {
    "frozen_base": _frozen_base, "ours": _ours, "ours_peft": _ours_peft, "peft_lora": _peft_lora,
    "peft_tinylora": _peft_tinylora, "official_loraxs": _official, "peft_tinylora+ours": _tinylora_ours,
    "full_ft": _full_ft,
}


def build(name: str, base: nn.Module, targets: list[str], rank: int = RANK) -> Trainee:
    t0 = time.perf_counter()
    model, inner, save = BUILDERS[name](base, targets, rank)
    init_s = time.perf_counter() - t0
    return Trainee(name, model, inner, _trainable(model), init_s, save)
