"""Put LoRA-XS adapters into a model, and take them out again."""

from __future__ import annotations

import re
import warnings
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
    """A predicate on dotted module paths for modules_to_save: an entry matches a module when it
    equals the attribute name, equals the full dotted path, or `re.fullmatch(entry, path)` holds.
    (target_modules and exclude_modules follow PEFT's rules instead: target_matcher.)"""
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


ALL_LINEAR = "all-linear"
# Names of a model's output head, after PEFT's SEQ_CLS_HEAD_NAMES and transformers' lm_head.
HEAD_NAMES = ("lm_head", "score", "classifier")


def output_head_paths(model: nn.Module) -> set[str]:
    """The paths of the model's output head, which "all-linear" leaves alone (PEFT's rule: a new head
    is trained whole or not at all, never squeezed through a rank-r adapter): the module that
    `model.get_output_embeddings()` returns when it returns one, else a top-level attribute named
    lm_head, score or classifier. Only the head itself, not linears inside a head module (as PEFT)."""
    head = None
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        try:
            head = get()
        except (NotImplementedError, AttributeError):
            head = None
    if not isinstance(head, nn.Module):
        head = next((getattr(model, n) for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)), None)
    if head is None:
        return set()
    return {path for path, m in model.named_modules(remove_duplicate=False) if m is head}


def target_matcher(spec, what: str = "target_modules"):
    """(entries, match(path) -> the entries that match it) with PEFT's rules: a single string is
    re.fullmatch on the dotted path ("all-linear" aside, handled by the caller); a list entry matches
    a path equal to it or ending in "." + entry (so "query" and "attention.output.dense" both reach
    every layer's module). List entries are never regular expressions, as in PEFT."""
    if isinstance(spec, str):
        try:
            rx = re.compile(spec)
        except re.error as e:
            raise ValueError(f"{what} {spec!r} is a single string, so a regular expression (re.fullmatch on the "
                             f"dotted path), but it does not compile: {e}") from None
        return [spec], lambda path: [spec] if rx.fullmatch(path) else []
    entries = _entries(spec, what)
    return entries, lambda path: [e for e in entries if path == e or path.endswith("." + e)]


def _check_rank_type(rank) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise TypeError(f"rank must be an int (the r of the r×r matrix R), got {rank!r} of type {type(rank).__name__}")
    if rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank}")


def select_targets(model: nn.Module, target_modules, exclude_modules=None, modules_to_save=None):
    """(found, dead) for apply_loraxs: found lists (path, parent, name, child) for every adaptable
    layer the spec selects; dead maps each target entry that selects nothing to why (a sentence).
    Raises ValueError when nothing is selected, naming every entry and why."""
    adapted_types = (FusedLoRAXSLinear, MultiLoRAXSLinear)
    slots = named_slots(model)
    excl_entries, excluded = ([], lambda path: [])
    if exclude_modules is not None:
        excl_entries, excluded = target_matcher(exclude_modules, "exclude_modules")
    saved = [] if modules_to_save is None else resolve_modules_to_save(model, modules_to_save, set())
    in_saved = lambda path: any(path == q or path.startswith(q + ".") for q in saved)
    all_linear = isinstance(target_modules, str) and target_modules.lower() == ALL_LINEAR
    if all_linear:
        heads = output_head_paths(model)
        entries = [target_modules]
        matches = lambda path: [target_modules] if path not in heads else []
    else:
        entries, matches = target_matcher(target_modules)
        if not isinstance(target_modules, str):
            matches = _with_legacy_regex_entries(entries, matches, [path for path, *_ in slots])
    if not entries:
        raise ValueError("target_modules is empty: name the layers to adapt, e.g. ['query', 'value'], or 'all-linear'")
    hits: dict[str, dict[str, list[str]]] = {e: {"ok": [], "adapted": [], "excluded": [], "saved": [], "other": []}
                                              for e in entries}
    found = []
    for path, parent, name, child in slots:
        es = matches(path)
        if not es:
            continue
        if all_linear and not is_adaptable(child) and not isinstance(child, adapted_types):
            continue  # "all-linear" reaches linear layers only; other modules are not misses
        kind = ("adapted" if isinstance(child, adapted_types) else "excluded" if excluded(path)
                else "saved" if in_saved(path) else "ok" if is_adaptable(child) else "other")
        for e in es:
            hits[e][kind].append(path if kind != "other" else f"{path} ({type(child).__name__})")
        if kind == "ok":
            found.append((path, parent, name, child))
    dead = {}
    for e, h in hits.items():
        if h["ok"]:
            continue
        why = []
        if h["adapted"]:
            why.append(f"already adapted: {_few(h['adapted'])} (a LoRA-XS layer; merge_loraxs or a fresh model first)")
        if h["excluded"]:
            why.append(f"only excluded layers ({_few(h['excluded'])}, by exclude_modules)")
        if h["saved"]:
            why.append(f"only layers inside modules_to_save ({_few(h['saved'])}), which train whole")
        if h["other"]:
            why.append(f"only modules that are not an nn.Linear or transformers Conv1D: {_few(h['other'])}")
        dead[e] = "; ".join(why) or (
            f"no module (a single string is a regular expression that must match the whole dotted path: "
            f"[{e!r}] matches it as a path suffix, {'.*' + re.escape(e)!r} as a regular expression)"
            if isinstance(target_modules, str) and not all_linear else
            "no module (a list entry matches a dotted path equal to it or ending in '.' + entry)")
    if not found:
        raise ValueError("apply_loraxs found no layer to adapt: " + "; ".join(f"{e!r} matches {w}" for e, w in dead.items()))
    return found, dead


def _with_legacy_regex_entries(entries: list[str], matches, paths: list[str]):
    """Before PEFT's rules, a list entry could be a regular expression (re.fullmatch on the path). An
    entry that matches no path by PEFT's rule but is a regular expression that does still works that
    way, with a FutureWarning: PEFT reads it as a path and would adapt nothing."""
    legacy = {}
    for e in entries:
        if re.escape(e) == e or any(e in matches(p) for p in paths):
            continue
        try:
            rx = re.compile(e)
        except re.error:
            continue
        if any(rx.fullmatch(p) for p in paths):
            legacy[e] = rx
    if not legacy:
        return matches
    warnings.warn(f"target_modules entries {sorted(legacy)} are regular expressions inside a list; PEFT reads list "
                  "entries as paths (they would adapt nothing there). Pass one regular expression as a single "
                  "string instead; list entries as expressions will stop working.", FutureWarning, stacklevel=4)
    return lambda path: matches(path) + [e for e, rx in legacy.items() if rx.fullmatch(path)]


def _few(paths: list[str], n: int = 3) -> str:
    return ", ".join(paths[:n]) + (f" and {len(paths) - n} more" if len(paths) > n else "")


def apply_loraxs(
    model: nn.Module,
    rank: int,
    target_modules: Iterable[str] | str,
    scaling: float = 1.0,
    modules_to_save: Iterable[str] | str | None = None,
    num_adapters: int | None = None,
    exclude_modules: Iterable[str] | str | None = None,
    **layer_kwargs,
) -> nn.Module:
    r"""Replace each targeted nn.Linear (or transformers Conv1D) by a FusedLoRAXSLinear around it,
    freeze every other parameter except those of `modules_to_save`, and return the model (changed
    in place).

    target_modules, with PEFT's matching rules (apply_loraxs and the PEFT method adapt the same layers
    for the same spec):
    - a list: an entry matches a module whose dotted path equals it or ends with "." + entry
      ("query", "attention.output.dense", "bert.pooler.dense");
    - a single string: re.fullmatch on the dotted path (r".*\.layer\.[0-2]\..*\.(query|value)");
    - "all-linear": every nn.Linear / Conv1D except the output head (see output_head_paths).
    Only exact nn.Linear and Conv1D layers are adapted. A list entry that selects no layer is named in
    a warning (e.g. a typo beside valid entries); when no layer at all is selected, a ValueError names
    every entry and why (no match, already adapted, excluded, not a linear layer).
    exclude_modules: the same rules (list: path or suffix; string: fullmatch); matching layers are
    never adapted. Layers inside modules_to_save are never adapted either (they train whole).
    rank: a positive int ≤ min(in_features, out_features) of every selected layer.
    modules_to_save: modules that stay fully trainable, e.g. a new task head ("classifier"), matched by
    attribute name, dotted path or re.fullmatch; save_adapter stores their parameters and load_adapter
    restores them. Their paths are kept on the model as `model.loraxs_modules_to_save`.
    num_adapters: an int makes MultiLoRAXSLinear layers instead, each with a bank of that many
    adapters (rows pick one with use_adapters).
    layer_kwargs go to the layers (r_dtype, r_init, backend). r_dtype defaults to float32 for float16 /
    bfloat16 bases (as PEFT's autocast_adapter_dtype: a bf16 R loses most of an AdamW step at lr 1e-4 to
    rounding), else the weight's dtype.

    The new layers hold the targeted layers' own weight and bias tensors (no copy), and keep their SVD
    facts so save_adapter needs no SVD. Everything that can fail (matching, ranks, the SVDs) runs
    before the model is touched: on an error it is left as it was.
    """
    _check_rank_type(rank)
    if num_adapters is not None and (isinstance(num_adapters, bool) or not isinstance(num_adapters, int)
                                     or num_adapters < 1):
        raise ValueError(f"num_adapters must be None or an int >= 1, got {num_adapters!r}")
    found, dead = select_targets(model, target_modules, exclude_modules, modules_to_save)
    for path, _, _, child in found:
        weight, _, _ = base_tensors(child)
        out_f, in_f = weight.shape
        if rank > min(in_f, out_f):
            raise ValueError(
                f"rank {rank} does not fit {path} = {type(child).__name__}(in_features={in_f}, "
                f"out_features={out_f}): it must be at most {min(in_f, out_f)}; lower the rank or leave the "
                f"layer out with exclude_modules=[{path!r}]"
            )
        if weight.is_meta:
            raise ValueError(f"{path}: the weight is on the meta device (not loaded yet): no SVD can be taken")
    bases: dict[int, object] = {}
    for _, _, _, child in found:
        if id(child) not in bases:
            bases[id(child)] = svd_basis(base_tensors(child)[0], rank)
    save_paths = [] if modules_to_save is None else resolve_modules_to_save(model, modules_to_save, set(bases))
    previous = list(getattr(model, MODULES_TO_SAVE_ATTR, []) or [])
    if dead and not isinstance(target_modules, str):
        warnings.warn("apply_loraxs: target_modules entries that select no layer: "
                      + "; ".join(f"{e!r} matches {w}" for e, w in dead.items()), stacklevel=2)
    with Transaction(model) as tx:
        new_layers = {}
        for _, _, _, child in found:
            if id(child) in new_layers:
                continue
            kwargs = dict(layer_kwargs)
            if kwargs.get("r_dtype") is None:
                kwargs["r_dtype"] = default_r_dtype(base_tensors(child)[0].dtype)
            new_layers[id(child)] = (
                FusedLoRAXSLinear.from_linear(child, rank, scaling, share_weight=True, basis=bases[id(child)], **kwargs)
                if num_adapters is None else
                MultiLoRAXSLinear.from_linear(child, rank, num_adapters, scaling, share_weight=True,
                                              basis=bases[id(child)], **kwargs))
        for _, parent, name, child in found:
            tx.setattr(parent, name, new_layers[id(child)])
        mark_trainable(model, previous + [p for p in save_paths if p not in previous])
    return model


def default_r_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """fp32 for half-precision bases, else the weight's dtype. Measured (issue 18): with a bf16 R, one
    AdamW step at lr 1e-4 changes 24.7 % of R's entries (the rest round back), 100 % with fp32."""
    return torch.float32 if weight_dtype in (torch.float16, torch.bfloat16) else weight_dtype


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
        merged = _unmerge_conv1d(merged) if getattr(child, "fan_in_fan_out", False) else merged
        # The base was frozen under the adapter; merging must not hand the model 1.7 M new trainable
        # parameters (MiniLM, 12 layers) that the optimizer would then update.
        merged.requires_grad_(False)
        return merged

    _swap(_find(model, lambda path, child: isinstance(child, (FusedLoRAXSLinear, MultiLoRAXSLinear))), merge)
    return model
