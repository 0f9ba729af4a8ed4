"""Put LoRA-XS adapters into a model, and take them out again."""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn

from .linear import FusedLoRAXSLinear, base_tensors, conv1d_type
from .multi import MultiLoRAXSLinear
from .svd_init import svd_basis

# The attribute apply_loraxs / load_adapter leave on a model: the dotted paths of its modules_to_save,
# which save_adapter reads.
MODULES_TO_SAVE_ATTR = "loraxs_modules_to_save"


def _entries(spec, what: str) -> list[str]:
    entries = [spec] if isinstance(spec, str) else list(spec)
    for e in entries:
        if not isinstance(e, str):
            raise TypeError(f"{what} entries must be strings (names, dotted paths or regular expressions), got {e!r}")
    return entries


def path_matcher(spec, what: str = "target_modules") -> Callable[[str], bool]:
    """A predicate on dotted module paths: an entry matches a module when it equals the attribute
    name, equals the full dotted path, or `re.fullmatch(entry, path)` holds (PEFT's forms, minus its
    suffix matching, so 'dense' never matches 'attention.output.dense' by accident of a regex)."""
    compiled = []
    for e in _entries(spec, what):
        try:
            rx = re.compile(e)
        except re.error:
            rx = None  # not a regular expression: a name or path only
        compiled.append((e, rx))

    def match(path: str) -> bool:
        name = path.rpartition(".")[2]
        return any(e == name or e == path or (rx is not None and rx.fullmatch(path)) for e, rx in compiled)

    return match


def is_adaptable(module: nn.Module) -> bool:
    """Exact nn.Linear, or transformers' Conv1D. Subclasses of nn.Linear such as
    nn.MultiheadAttention's out_proj are read by their owner without calling their forward, so
    replacing them would change nothing."""
    conv1d = conv1d_type()
    return type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d)


def named_slots(model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(path, parent, attribute name, child) for every module under model, a shared module under
    every path it has."""
    out = []
    for ppath, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent.named_children():
            out.append((f"{ppath}.{name}" if ppath else name, parent, name, child))
    return out


def _find(model: nn.Module, pick) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, attribute name, child) for every child with pick(path, child)."""
    return [(parent, name, child) for path, parent, name, child in named_slots(model) if pick(path, child)]


def _swap(found, make) -> None:
    # A module shared by two parents becomes one shared replacement, as it was one shared layer.
    made: dict[int, nn.Module] = {}
    for parent, name, child in found:
        if id(child) not in made:
            made[id(child)] = make(child)
        setattr(parent, name, made[id(child)])


class Transaction:
    """Undo for in-place model edits: records requires_grad flags, swapped children and the attribute
    apply_loraxs leaves, and puts them all back if the with-block raises."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags = [(p, p.requires_grad) for p in model.parameters()]
        self.swaps: list[tuple[nn.Module, str, nn.Module]] = []
        self.attr = getattr(model, MODULES_TO_SAVE_ATTR, None)
        self.has_attr = hasattr(model, MODULES_TO_SAVE_ATTR)

    def setattr(self, parent: nn.Module, name: str, new: nn.Module) -> None:
        self.swaps.append((parent, name, getattr(parent, name)))
        setattr(parent, name, new)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            return False
        for parent, name, old in reversed(self.swaps):
            setattr(parent, name, old)
        for p, flag in self.flags:
            p.requires_grad_(flag)
        if self.has_attr:
            object.__setattr__(self.model, MODULES_TO_SAVE_ATTR, self.attr)
        elif hasattr(self.model, MODULES_TO_SAVE_ATTR):
            object.__delattr__(self.model, MODULES_TO_SAVE_ATTR)
        return False


def resolve_modules_to_save(model: nn.Module, modules_to_save, adapted_ids: set[int]) -> list[str]:
    """The dotted paths that modules_to_save names (outermost matches only), checked to hold no layer
    that LoRA-XS adapts: one module cannot be both an adapter layer and a fully saved one."""
    match = path_matcher(modules_to_save, "modules_to_save")
    paths = [path for path, _ in model.named_modules() if path and match(path)]
    if not paths:
        raise ValueError(f"modules_to_save: no module matches any of {sorted(_entries(modules_to_save, 'modules_to_save'))}")
    outer = [p for p in paths if not any(p.startswith(q + ".") for q in paths if q != p)]
    for p in outer:
        mod = model.get_submodule(p)
        for sub_path, sub in mod.named_modules():
            if id(sub) in adapted_ids or isinstance(sub, (FusedLoRAXSLinear, MultiLoRAXSLinear)):
                where = f"{p}.{sub_path}" if sub_path else p
                raise ValueError(
                    f"modules_to_save entry {p!r} holds {where}, a layer LoRA-XS adapts; "
                    "a module is either adapted (R only) or saved whole, not both"
                )
    return outer


def mark_trainable(model: nn.Module, modules_to_save: list[str]) -> None:
    """Freeze everything except each FusedLoRAXSLinear's R and the modules_to_save, and record them."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, (FusedLoRAXSLinear, MultiLoRAXSLinear)):
            m.lora_R.requires_grad_(True)
    for path in modules_to_save:
        for p in model.get_submodule(path).parameters():
            p.requires_grad_(True)
    object.__setattr__(model, MODULES_TO_SAVE_ATTR, list(modules_to_save))


def apply_loraxs(
    model: nn.Module,
    rank: int,
    target_modules: Iterable[str] | str,
    scaling: float = 1.0,
    modules_to_save: Iterable[str] | str | None = None,
    num_adapters: int | None = None,
    **layer_kwargs,
) -> nn.Module:
    """Replace each targeted nn.Linear (or transformers Conv1D) by a FusedLoRAXSLinear around it,
    freeze every other parameter except those of `modules_to_save`, and return the model (changed
    in place).

    target_modules: an entry matches a module when it equals its attribute name ("query"), equals
    its full dotted path ("encoder.layer.0.attention.self.query"), or re.fullmatch(entry, path)
    holds (r"encoder\\.layer\\.[0-2]\\..*\\.(query|value)"). Only exact nn.Linear and Conv1D layers
    are adapted; other matched modules are skipped (see `is_adaptable`).
    modules_to_save: modules matched the same way that stay fully trainable, e.g. a new task head
    ("classifier"); save_adapter stores their parameters and load_adapter restores them. Their
    paths are kept on the model as `model.loraxs_modules_to_save`.

    The new layers hold the targeted layers' own weight and bias tensors (no copy, so a model's
    memory never holds a weight twice). Everything that can fail (matching, ranks, the SVDs) runs
    before the model is touched: on an error it is left as it was.
    layer_kwargs go to FusedLoRAXSLinear (r_dtype, r_init, backend).
    num_adapters: an int makes MultiLoRAXSLinear layers instead, each with a bank of that many
    adapters (rows pick one with use_adapters); layer_kwargs then go to it (r_dtype, r_init, backend).
    """
    targets = _entries(target_modules, "target_modules")
    if not targets:
        raise ValueError("target_modules is empty: name the nn.Linear attributes to adapt, e.g. ['q_proj', 'v_proj']")
    match = path_matcher(targets)
    found = _find(model, lambda path, child: match(path) and is_adaptable(child))
    if not found:
        raise ValueError(
            f"no nn.Linear named any of {sorted(set(targets))} was found in the model (an entry matches an "
            "attribute name, a full dotted path, or re.fullmatch on the path; transformers Conv1D counts too)"
        )
    bases: dict[int, object] = {}
    for parent, name, child in found:
        weight, _, _ = base_tensors(child)
        out_f, in_f = weight.shape
        if not 1 <= rank <= min(in_f, out_f):
            raise ValueError(
                f"rank {rank} does not fit {name} = {type(child).__name__}(in_features={in_f}, "
                f"out_features={out_f}): it must be between 1 and {min(in_f, out_f)}"
            )
    for _, name, child in found:
        if id(child) not in bases:
            bases[id(child)] = svd_basis(base_tensors(child)[0], rank)
    save_paths = [] if modules_to_save is None else resolve_modules_to_save(model, modules_to_save, set(bases))
    previous = list(getattr(model, MODULES_TO_SAVE_ATTR, []) or [])
    with Transaction(model) as tx:
        new_layers = {
            id(child): FusedLoRAXSLinear.from_linear(
                child, rank, scaling, share_weight=True, basis=bases[id(child)][:2], **layer_kwargs
            ) if num_adapters is None else MultiLoRAXSLinear.from_linear(
                child, rank, num_adapters, scaling, share_weight=True, basis=bases[id(child)][:2], **layer_kwargs
            )
            for _, _, child in found
        }
        made: dict[int, nn.Module] = {}
        for parent, name, child in found:
            made.setdefault(id(child), new_layers[id(child)])
            tx.setattr(parent, name, made[id(child)])
        mark_trainable(model, previous + [p for p in save_paths if p not in previous])
    return model


def _unmerge_conv1d(merged: nn.Linear) -> nn.Module:
    conv1d = conv1d_type()
    out = conv1d(merged.out_features, merged.in_features).to(device=merged.weight.device, dtype=merged.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(merged.weight.t())
        out.bias.copy_(merged.bias)
    return out


def merge_loraxs(model: nn.Module, adapter: int | None = None) -> nn.Module:
    """Replace each FusedLoRAXSLinear by the plain layer it computes (nn.Linear, or Conv1D where the
    base was one); return the model.

    adapter: for a model with MultiLoRAXSLinear layers, the adapter to merge (an int; -1: the base
    layer): each bank becomes the plain layer W + s·(A R[adapter] B)ᵀ, so the merged model computes
    what rows with that id compute. Required when the model has banks; refused when it has none."""
    banks = _find(model, lambda path, child: isinstance(child, MultiLoRAXSLinear))
    if banks and adapter is None:
        raise ValueError(
            f"the model has MultiLoRAXSLinear banks of {banks[0][2].num_adapters} adapters: merge_loraxs(model, "
            "adapter=i) names the one to merge (-1: the base layer alone)")
    if adapter is not None:
        if not banks:
            raise ValueError(f"merge_loraxs(model, adapter={adapter!r}): the model has no MultiLoRAXSLinear layers; "
                             "leave adapter=None to merge FusedLoRAXSLinear layers")
        if isinstance(adapter, bool) or not isinstance(adapter, int):
            raise TypeError(f"adapter must be an int (a slot of the banks, or -1), got {adapter!r}")
        for parent, name, bank in banks:  # all checked before any layer is swapped
            if not -1 <= adapter < bank.num_adapters:
                raise IndexError(f"adapter {adapter} is out of range: a bank ({name}) holds {bank.num_adapters} "
                                 f"adapters (0 to {bank.num_adapters - 1}, or -1 for the base layer)")

    def merge(child: nn.Module) -> nn.Module:
        merged = child.merge() if isinstance(child, FusedLoRAXSLinear) else child.merge(adapter)
        return _unmerge_conv1d(merged) if getattr(child, "fan_in_fan_out", False) else merged

    _swap(_find(model, lambda path, child: isinstance(child, (FusedLoRAXSLinear, MultiLoRAXSLinear))), merge)
    return model
