"""Put LoRA-XS adapters into a model, and take them out again."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .linear import FusedLoRAXSLinear


def _replace(model: nn.Module, pick, make) -> list[str]:
    """Swap every child for which pick(name, child) holds with make(child); return the dotted paths."""
    replaced = []
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if pick(name, child):
                setattr(parent, name, make(child))
                replaced.append(f"{parent_name}.{name}" if parent_name else name)
    return replaced


def apply_loraxs(model: nn.Module, rank: int, target_modules: Iterable[str], scaling: float = 1.0, **layer_kwargs) -> nn.Module:
    """Replace each nn.Linear whose attribute name is in target_modules by a FusedLoRAXSLinear around
    it, freeze every other parameter, and return the model (changed in place).

    layer_kwargs go to FusedLoRAXSLinear (r_dtype, r_init, backend).
    """
    targets = {target_modules} if isinstance(target_modules, str) else set(target_modules)
    if not targets:
        raise ValueError("target_modules is empty: name the nn.Linear attributes to adapt, e.g. ['q_proj', 'v_proj']")
    for p in model.parameters():
        p.requires_grad_(False)
    replaced = _replace(
        model,
        lambda name, child: name in targets and type(child) is nn.Linear,
        lambda child: FusedLoRAXSLinear.from_linear(child, rank, scaling, **layer_kwargs),
    )
    if not replaced:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} was found in the model")
    return model


def merge_loraxs(model: nn.Module) -> nn.Module:
    """Replace each FusedLoRAXSLinear by the plain nn.Linear it computes; return the model."""
    _replace(model, lambda name, child: isinstance(child, FusedLoRAXSLinear), lambda child: child.merge())
    return model
