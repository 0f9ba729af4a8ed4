"""LoRA-XS adapters as files: R only (r² numbers per layer), with a fingerprint of the base.

A directory holds two files:

adapter_config.json
    format "loraxs-kernels-adapter", format_version 2, and in the same object a PEFT adapter config
    (peft_type "LORAXS", task_type, base_model_name_or_path, r, scaling, target_modules (the adapted
    layers' dotted paths), modules_to_save, init, r_dtype: the fields of
    loraxs_kernels.peft.LoraXSConfig), so one file serves both entry points: load_adapter here, and
    peft.PeftModel.from_pretrained / AutoPeftModelFor... after `import loraxs_kernels.peft`.
    Ours: dtype (R's); the SVD convention; saved_module_keys (module path -> its state-dict keys);
    and per layer in "layers": in/out features, rank, scaling, bias, fan_in_fan_out (Conv1D base),
    the pivots that fix the singular vectors' signs, the smallest relative gap of its top singular
    values, "basis" ("svd": recomputed from the base on load; "stored": in the file) with the
    reason, and the base fingerprint (fingerprint.py).
adapter_model.safetensors
    keys in PEFT's spelling: `base_model.model.<path>.lora_R` for every layer;
    `base_model.model.<path>.lora_A`, `....lora_B` for layers whose basis is stored;
    `base_model.model.<path>.<name>` for every state-dict entry of every module in modules_to_save.
Version 1 (no PEFT fields, keys without the `base_model.model.` prefix) is still read.

Banks (MultiLoRAXSLinear): save_adapter(model, path, slot=i) writes adapter i of every bank as such a
file, and load_adapter(model, path, slot=i) reads one into slot i of every bank, in place
(load_adapter_slot: the bank's A, B and scaling are shared by every slot, so the file must agree with them).

When the basis is stored. Recomputing A and B from a base loaded in another dtype or on another
device moves them by (rounding of W) / (gap between singular values). A layer's basis is stored when
`include_basis=True`, when it is not the SVD of its weight (random or imported A and B), or when
min over i ≤ r of (σ_i − σ_{i+1}) / σ_i < GAP_THRESHOLD = 2e-3. Measured on all-MiniLM-L6-v2 at ranks
4, 8 and 16 (108 layer–rank pairs, random R, bases recomputed from W rounded to bf16 with the stored
pivots): A·R·B moved by at most 1.2 % in every layer whose gap is ≥ 2e-3, and by 1.2–2.0 % in the
four below it (gaps 4.1e-4 to 1.9e-3, among them encoder.layer.1.attention.self.query at rank 8,
gap 1.5e-3). The threshold keeps a recomputed basis within about 1 % of the saving run's even from a
bf16 copy of the base; between fp32 runs on different machines (SVD differences around 1e-6·‖W‖)
the same layers move by well under 1e-3. Without stored pivots that query layer moved by 79 %: a
sign flip, not the gap (svd_init.py).
"""

from __future__ import annotations

import json
import math
import os
import weakref
from pathlib import Path

import torch
from torch import nn

from ..modules.linear import FusedLoRAXSLinear, base_tensors
from ..modules.multi import MultiLoRAXSLinear
from ..modules.model import (
    MODULES_TO_SAVE_ATTR,
    Transaction,
    is_adaptable,
    mark_trainable,
    named_slots,
)
from ..modules.linear import remember_basis, remembered_basis
from ..modules.svd_init import SVDBasis, min_relative_gap, svd_basis
from .fingerprint import ATOL, N_SAMPLES, RTOL, fingerprint, fingerprint_mismatch, fingerprint_problem
from .atomic import write_adapter_dir  # noqa: F401  (crash-safe writer; interop/peft_lora.py imports it from here)
from .integrity import ChecksumMismatch, load_verified

FORMAT_NAME = "loraxs-kernels-adapter"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PEFT_TYPE_NAME = "LORAXS"  # the PeftType member loraxs_kernels.peft registers
PEFT_KEY_PREFIX = "base_model.model."  # where PEFT's PeftModel puts the base model's modules
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
GAP_THRESHOLD = 2e-3
SVD_CONVENTION = (
    "W (out x in; a Conv1D's transpose) -> the top r singular triplets of W^T = U S V^T in float32 (float64 "
    "for float64 weights): a truncated subspace iteration refined by Rayleigh-Ritz to a residual of 1e-6 sigma_1, "
    "the full torch.linalg.svd for small layers or when it does not converge; A = U_r S_r (in x r), "
    "B = V_r^T (r x out); each pair (u_i, v_i) signed so that U[pivots[i], i] > 0; y = x W^T + b + scaling * ((x A) R) B"
)
SVD_FACTS = {"convention": SVD_CONVENTION, "basis_gap_threshold": GAP_THRESHOLD}
FINGERPRINT_FACTS = {"rtol": RTOL, "atol_rms": ATOL, "n_samples": N_SAMPLES}
# Relative difference between a layer's A, B and the SVD recomputed from its weight below which the
# basis counts as the SVD's: the recomputation is the same call on the same W, so it repeats to
# rounding (the fp32 SVD to ~1e-6 across thread counts); a random or imported basis differs by O(1).
_DERIVABLE_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}

# Task types by the class-name suffix of a transformers model: what AutoPeftModelFor... needs to rebuild it.
_TASK_BY_CLASS_SUFFIX = (
    ("ForSequenceClassification", "SEQ_CLS"), ("ForCausalLM", "CAUSAL_LM"), ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"), ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class AdapterError(ValueError):
    """An adapter file that cannot be used with this model; the model was left unchanged."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def common_dtype(dtypes) -> str | None:
    """The one dtype name of R over every layer, or None when they differ."""
    names = {_dtype_name(d) for d in dtypes}
    return names.pop() if len(names) == 1 else None


def task_type_of(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model, from its class name (None when it says nothing)."""
    name = type(model).__name__
    return next((task for suffix, task in _TASK_BY_CLASS_SUFFIX if name.endswith(suffix)), None)


def layer_entry(weight: torch.Tensor, rank: int, scaling: float, bias: bool, fan_in_fan_out: bool, pivots,
                singular_values, gap, reason) -> dict:
    """One entry of the config's "layers": what loading needs to rebuild the layer's basis and to refuse
    another base. weight is (out, in); singular_values None: computed by the fingerprint."""
    return {
        "in_features": int(weight.shape[1]),
        "out_features": int(weight.shape[0]),
        "rank": int(rank),
        "scaling": float(scaling),
        "bias": bool(bias),
        "fan_in_fan_out": bool(fan_in_fan_out),
        "weight_dtype": _dtype_name(weight.dtype),
        "pivots": [int(i) for i in torch.as_tensor(pivots).tolist()],
        "min_relative_gap": gap,
        "basis": "svd" if reason is None else "stored",
        "basis_reason": reason,
        "fingerprint": fingerprint(weight, n_sigma=rank + 1, singular_values=singular_values),
    }


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-300))


def _layers(model: nn.Module) -> list[tuple[str, FusedLoRAXSLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, FusedLoRAXSLinear)]


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


# ------------------------------------------------------------------------------------------ read
def _module_at(model: nn.Module, lpath: str) -> nn.Module:
    try:
        return model.get_submodule(lpath)
    except AttributeError:
        raise AdapterError(f"layer {lpath}: the model has no module at this path") from None


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise AdapterError(msg)


def _check_config(cfg, where: str) -> dict:
    _require(isinstance(cfg, dict), f"{where}: expected a JSON object, got {type(cfg).__name__}")
    if "peft_type" in cfg and "format" not in cfg:
        raise AdapterError(
            f"{where} is a PEFT adapter (peft_type={cfg['peft_type']!r}), not a loraxs-kernels adapter: "
            "load an official LoRA-XS checkpoint with loraxs_kernels.interop.load_official_loraxs, "
            "and a LoRA adapter with peft.PeftModel.from_pretrained"
        )
    _require("format" in cfg, f"{where}: missing key 'format' (expected {FORMAT_NAME!r})")
    _require(cfg["format"] == FORMAT_NAME, f"{where}: format is {cfg['format']!r}, expected {FORMAT_NAME!r}")
    _require("format_version" in cfg, f"{where}: missing key 'format_version'")
    _require(
        cfg["format_version"] in READABLE_VERSIONS,
        f"{where}: format_version {cfg['format_version']!r} is not supported (this library reads {READABLE_VERSIONS})",
    )
    if cfg["format_version"] >= 2:
        _require(cfg.get("peft_type") == PEFT_TYPE_NAME,
                 f"{where}: peft_type is {cfg.get('peft_type')!r}, expected {PEFT_TYPE_NAME!r} in format_version 2")
        _require(isinstance(cfg.get("saved_module_keys"), dict), f"{where}: 'saved_module_keys' must be an object")
        # PEFT's modules_to_save holds match names ("classifier", "score"); the saved modules' own paths are
        # the keys of saved_module_keys, which both writers fill.
        cfg = {**cfg, "modules_to_save_spec": cfg.get("modules_to_save"), "modules_to_save": list(cfg["saved_module_keys"])}
    for key, typ in (("layers", dict), ("modules_to_save", list), ("saved_module_keys", dict)):
        _require(key in cfg, f"{where}: missing key {key!r}")
        _require(isinstance(cfg[key], typ), f"{where}: {key!r} must be a {typ.__name__}, got {type(cfg[key]).__name__}")
    _require(len(cfg["layers"]) > 0, f"{where}: 'layers' is empty")
    need = {
        "in_features": int, "out_features": int, "rank": int, "scaling": (int, float), "pivots": list,
        "basis": str, "fingerprint": dict,
    }
    for lpath, lc in cfg["layers"].items():
        _require(isinstance(lc, dict), f"{where}: layers[{lpath!r}] must be an object")
        for key, typ in need.items():
            _require(key in lc, f"{where}: layers[{lpath!r}] is missing key {key!r}")
            _require(
                isinstance(lc[key], typ) and not isinstance(lc[key], bool),
                f"{where}: layers[{lpath!r}][{key!r}] has the wrong type ({type(lc[key]).__name__})",
            )
        r, i, o = lc["rank"], lc["in_features"], lc["out_features"]
        _require(1 <= r <= min(i, o), f"{where}: layers[{lpath!r}]: rank {r} does not fit in={i}, out={o}")
        _require(
            len(lc["pivots"]) == r and all(isinstance(p, int) and 0 <= p < i for p in lc["pivots"]),
            f"{where}: layers[{lpath!r}]['pivots'] must be {r} row indices in [0, {i})",
        )
        _require(lc["basis"] in ("svd", "stored"), f"{where}: layers[{lpath!r}]['basis'] must be 'svd' or 'stored'")
        _require(math.isfinite(lc["scaling"]), f"{where}: layers[{lpath!r}]['scaling'] is not finite")
        fp = lc["fingerprint"]
        why = fingerprint_problem(fp)
        _require(why is None, f"{where}: layers[{lpath!r}]['fingerprint']: {why}")
        for key in ("shape", "sigma", "fro", "samples"):
            _require(key in fp, f"{where}: layers[{lpath!r}]['fingerprint'] is missing key {key!r}")
        _require(list(fp["shape"]) == [o, i], f"{where}: layers[{lpath!r}]: fingerprint shape {fp['shape']} != [{o}, {i}]")
    for mpath in cfg["modules_to_save"]:
        _require(mpath in cfg["saved_module_keys"], f"{where}: modules_to_save entry {mpath!r} has no saved_module_keys")
    return cfg


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, tensors on the CPU) of an adapter directory, checked for consistency with each other;
    raises FileNotFoundError or AdapterError."""
    from safetensors import SafetensorError

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no adapter at {str(root)!r}: the path does not exist")
    if not root.is_dir():
        raise AdapterError(f"{str(root)!r} is a file; an adapter is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    # Both files from one resolved folder: a save switches the folder's version pointer atomically (atomic.py),
    # so a reader that resolved it once reads the config and the weights of one save even while another runs.
    # Only when both names are still the save's links: a file put there by hand (or by another writer) is read.
    # Messages name the files by the names the user knows (cfg_path, w_path).
    cfg_path, w_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    cfg_read, w_read = cfg_path, w_path
    if cfg_path.is_symlink() and w_path.is_symlink():
        version_dir = Path(os.path.realpath(cfg_path)).parent
        if Path(os.path.realpath(w_path)).parent == version_dir:
            cfg_read, w_read = version_dir / CONFIG_NAME, version_dir / WEIGHTS_NAME
    if not cfg_path.is_file():
        present = sorted(p.name for p in root.iterdir())
        raise AdapterError(f"{str(root)!r} holds no {CONFIG_NAME} (it holds {present}): not a loraxs-kernels adapter")
    try:
        cfg = json.loads(cfg_read.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path} is not valid JSON: {e}") from None
    cfg = _check_config(cfg, str(cfg_path))
    if not w_path.is_file():
        present = sorted(p.name for p in root.iterdir())
        raise AdapterError(f"{str(root)!r} holds no {WEIGHTS_NAME} (it holds {present})")
    try:
        tensors = load_verified(w_read)  # the sha256 of the tensor bytes, when the file has one
    except ChecksumMismatch as e:
        raise AdapterError(f"{w_path} is corrupted ({e})") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{w_path} is not a readable safetensors file: {e}") from None
    if cfg["format_version"] >= 2:
        # PEFT's key spelling on disk, the base model's own paths in memory; a key without the prefix stays as
        # it is and is refused below as a tensor the config does not describe.
        tensors = {k.removeprefix(PEFT_KEY_PREFIX): v for k, v in tensors.items()}

    expected: dict[str, tuple[int, ...]] = {}
    for lpath, lc in cfg["layers"].items():
        r, i, o = lc["rank"], lc["in_features"], lc["out_features"]
        expected[f"{lpath}.lora_R"] = (r, r)
        if lc["basis"] == "stored":
            expected[f"{lpath}.lora_A"] = (i, r)
            expected[f"{lpath}.lora_B"] = (r, o)
    module_keys = {f"{m}.{k}" for m, keys in cfg["saved_module_keys"].items() for k in keys}
    for key, shape in expected.items():
        _require(key in tensors, f"{w_path}: missing tensor {key!r} that {CONFIG_NAME} lists")
        t = tensors[key]
        _require(tuple(t.shape) == shape, f"{w_path}: {key} has shape {tuple(t.shape)}, expected {shape}")
        _require(t.dtype in _DTYPES.values(), f"{w_path}: {key} has dtype {t.dtype}; expected a float dtype")
        if not torch.isfinite(t).all():
            raise AdapterError(f"{w_path}: {key} has {(~torch.isfinite(t)).sum().item()} NaN/Inf entries (layer {key.rpartition('.')[0]})")
    for key in module_keys:
        _require(key in tensors, f"{w_path}: missing tensor {key!r} of a module in modules_to_save")
        t = tensors[key]
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterError(f"{w_path}: {key} (modules_to_save) has NaN/Inf entries")
    extra = sorted(set(tensors) - set(expected) - module_keys)
    _require(not extra, f"{w_path}: tensors {extra[:5]} are not described by {CONFIG_NAME}")
    return cfg, tensors


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


# ------------------------------------------------------------------------------------ bank slots
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
