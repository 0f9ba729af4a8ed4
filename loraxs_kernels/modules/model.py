"""Put LoRA-XS adapters into a model, and take them out again."""

from __future__ import annotations

from typing import Iterable

from torch import nn

from .linear import FusedLoRAXSLinear


def _find(model: nn.Module, pick) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, child) for every child with pick(name, child)."""
    return [
        (parent, name, child)
        for _, parent in model.named_modules()
        for name, child in parent.named_children()
        if pick(name, child)
    ]


def _swap(found, make) -> None:
    # A module shared by two parents becomes one shared replacement, as it was one shared layer.
    made: dict[int, nn.Module] = {}
    for parent, name, child in found:
        if id(child) not in made:
            made[id(child)] = make(child)
        setattr(parent, name, made[id(child)])


def apply_loraxs(model: nn.Module, rank: int, target_modules: Iterable[str], scaling: float = 1.0, **layer_kwargs) -> nn.Module:
    """Replace each nn.Linear whose attribute name is in target_modules by a FusedLoRAXSLinear around
    it, freeze every other parameter, and return the model (changed in place).

    Only exact nn.Linear layers are matched: subclasses such as nn.MultiheadAttention's out_proj are
    read by their owner without calling their forward, so replacing them would change nothing.
    Everything is checked before the model is touched: on an error it is left as it was.
    layer_kwargs go to FusedLoRAXSLinear (r_dtype, r_init, backend).
    """
    targets = {target_modules} if isinstance(target_modules, str) else set(target_modules)
    if not targets:
        raise ValueError("target_modules is empty: name the nn.Linear attributes to adapt, e.g. ['q_proj', 'v_proj']")
    found = _find(model, lambda name, child: name in targets and type(child) is nn.Linear)
    if not found:
        raise ValueError(f"no nn.Linear named any of {sorted(targets)} was found in the model")
    for parent, name, child in found:
        if not 1 <= rank <= min(child.in_features, child.out_features):
            raise ValueError(
                f"rank {rank} does not fit {name} = Linear(in_features={child.in_features}, "
                f"out_features={child.out_features}): it must be between 1 and {min(child.in_features, child.out_features)}"
            )
    new_layers = {id(child): FusedLoRAXSLinear.from_linear(child, rank, scaling, **layer_kwargs) for _, _, child in found}
    for p in model.parameters():
        p.requires_grad_(False)
    _swap(found, lambda child: new_layers[id(child)])
    return model


def merge_loraxs(model: nn.Module) -> nn.Module:
    """Replace each FusedLoRAXSLinear by the plain nn.Linear it computes; return the model."""
    _swap(_find(model, lambda name, child: isinstance(child, FusedLoRAXSLinear)), lambda child: child.merge())
    return model
