"""LoRA-XS adapters as files: R only (r² numbers per layer), with a fingerprint of the base.

A directory holds two files:

adapter_config.json
    format "loraxs-kernels-adapter", format_version 1; rank and scaling (null when the layers
    differ); dtype (R's); the SVD convention; target_modules (the adapted layers' dotted paths);
    modules_to_save; and per layer in "layers": in/out features, rank, scaling, bias, fan_in_fan_out
    (Conv1D base), the pivots that fix the singular vectors' signs, the smallest relative gap of its
    top singular values, "basis" ("svd": recomputed from the base on load; "stored": in the file)
    with the reason, and the base fingerprint (fingerprint.py).
adapter_model.safetensors
    `<path>.lora_R` for every layer; `<path>.lora_A`, `<path>.lora_B` for layers whose basis is
    stored; `<path>.<name>` for every state-dict entry of every module in modules_to_save.

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
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..modules.linear import FusedLoRAXSLinear, base_tensors
from ..modules.model import (
    MODULES_TO_SAVE_ATTR,
    Transaction,
    is_adaptable,
    mark_trainable,
    named_slots,
)
from ..modules.svd_init import min_relative_gap, svd_basis
from .fingerprint import ATOL, N_SAMPLES, RTOL, fingerprint, fingerprint_mismatch

FORMAT_NAME = "loraxs-kernels-adapter"
FORMAT_VERSION = 1
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
GAP_THRESHOLD = 2e-3
SVD_CONVENTION = (
    "W (out x in; a Conv1D's transpose) -> W^T = U S V^T computed by torch.linalg.svd in float32 "
    "(float64 for float64 weights); A = U_r S_r (in x r), B = V_r^T (r x out); each pair (u_i, v_i) "
    "signed so that U[pivots[i], i] > 0; y = x W^T + b + scaling * ((x A) R) B"
)
# Relative difference between a layer's A, B and the SVD recomputed from its weight below which the
# basis counts as the SVD's: the recomputation is the same call on the same W, so it repeats to
# rounding (the fp32 SVD to ~1e-6 across thread counts); a random or imported basis differs by O(1).
_DERIVABLE_TOL = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 2e-2}

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class AdapterError(ValueError):
    """An adapter file that cannot be used with this model; the model was left unchanged."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.detach().double(), b.detach().double()
    return float(torch.linalg.vector_norm(a64 - b64) / torch.linalg.vector_norm(b64).clamp_min(1e-300))


def _layers(model: nn.Module) -> list[tuple[str, FusedLoRAXSLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, FusedLoRAXSLinear)]


# ------------------------------------------------------------------------------------------ save
def save_adapter(model: nn.Module, path, *, include_basis: bool = False, modules_to_save=None) -> Path:
    """Write the model's LoRA-XS adapter (every FusedLoRAXSLinear's R, plus its modules_to_save) to the
    directory `path` (created if needed) as adapter_config.json + adapter_model.safetensors; return it.

    include_basis: store every layer's A and B too (see the module docstring for when a layer's
    basis is stored anyway). modules_to_save: dotted paths whose modules are saved whole; default
    the ones apply_loraxs / load_adapter recorded on the model.
    """
    layers = _layers(model)
    if not layers:
        raise ValueError("the model has no FusedLoRAXSLinear layers: apply_loraxs or load_adapter first")
    if modules_to_save is None:
        modules_to_save = list(getattr(model, MODULES_TO_SAVE_ATTR, None) or [])
    elif isinstance(modules_to_save, str):
        modules_to_save = [modules_to_save]
    tensors: dict[str, torch.Tensor] = {}
    layer_cfg: dict[str, dict] = {}
    for lpath, layer in layers:
        if not torch.isfinite(layer.lora_R).all():
            raise ValueError(f"{lpath}.lora_R has NaN or Inf entries; refusing to save a broken adapter")
        rank = layer.rank
        pivots = layer.lora_A.detach().abs().argmax(dim=0)
        basis = svd_basis(layer.weight, rank, pivots=pivots)
        gap = min_relative_gap(basis.singular_values, rank)
        diff = max(_rel(basis.A, layer.lora_A), _rel(basis.B, layer.lora_B))
        derivable = diff <= _DERIVABLE_TOL.get(layer.weight.dtype, 1e-4)
        reason = (
            "include_basis=True" if include_basis
            else f"A and B are not the SVD of W (relative difference {diff:.3g})" if not derivable
            else f"min relative singular-value gap {gap:.3g} < {GAP_THRESHOLD:g}" if gap < GAP_THRESHOLD
            else None
        )
        tensors[f"{lpath}.lora_R"] = layer.lora_R.detach().cpu().contiguous().clone()
        if reason is not None:
            tensors[f"{lpath}.lora_A"] = layer.lora_A.detach().cpu().contiguous().clone()
            tensors[f"{lpath}.lora_B"] = layer.lora_B.detach().cpu().contiguous().clone()
        layer_cfg[lpath] = {
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "rank": rank,
            "scaling": layer.scaling,
            "bias": layer.bias is not None,
            "fan_in_fan_out": bool(getattr(layer, "fan_in_fan_out", False)),
            "weight_dtype": _dtype_name(layer.weight.dtype),
            "pivots": [int(i) for i in basis.pivots.tolist()],
            "min_relative_gap": gap,
            "basis": "svd" if reason is None else "stored",
            "basis_reason": reason,
            "fingerprint": fingerprint(layer.weight, n_sigma=rank + 1, singular_values=basis.singular_values),
        }
    saved_keys: dict[str, list[str]] = {}
    for mpath in modules_to_save:
        try:
            mod = model.get_submodule(mpath)
        except AttributeError:
            raise ValueError(f"modules_to_save names {mpath!r}, which is not a module of the model") from None
        sd = mod.state_dict()
        saved_keys[mpath] = sorted(sd)
        for k, v in sd.items():
            tensors[f"{mpath}.{k}"] = v.detach().cpu().contiguous().clone()  # clone: tied weights share memory
    ranks = {c["rank"] for c in layer_cfg.values()}
    scalings = {c["scaling"] for c in layer_cfg.values()}
    r_dtypes = {_dtype_name(m.lora_R.dtype) for _, m in layers}
    config = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "library": "loraxs_kernels",
        "rank": ranks.pop() if len(ranks) == 1 else None,
        "scaling": scalings.pop() if len(scalings) == 1 else None,
        "dtype": r_dtypes.pop() if len(r_dtypes) == 1 else None,
        "svd": {"convention": SVD_CONVENTION, "basis_gap_threshold": GAP_THRESHOLD},
        "fingerprint_tolerance": {"rtol": RTOL, "atol_rms": ATOL, "n_samples": N_SAMPLES},
        "target_modules": [p for p, _ in layers],
        "modules_to_save": list(modules_to_save),
        "saved_module_keys": saved_keys,
        "layers": layer_cfg,
    }
    return write_adapter_dir(path, tensors, config, {"format": "pt", "loraxs_format": FORMAT_NAME})


def write_adapter_dir(path, tensors: dict, config: dict, metadata: dict) -> Path:
    """A directory with adapter_model.safetensors and adapter_config.json (our format and PEFT's
    share the names). Both are written beside the target and then renamed: a crash never leaves a
    half-written adapter under the name."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, suffix=".tmp", delete=False) as f:
        tmp_w = f.name
    save_file(tensors, tmp_w, metadata=metadata)
    tmp_c = tmp_w + ".json"
    with open(tmp_c, "w") as f:
        json.dump(config, f, indent=1)
    os.replace(tmp_w, out / WEIGHTS_NAME)
    os.replace(tmp_c, out / CONFIG_NAME)
    return out


# ------------------------------------------------------------------------------------------ read
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
        cfg["format_version"] == FORMAT_VERSION,
        f"{where}: format_version {cfg['format_version']!r} is not supported (this library reads {FORMAT_VERSION})",
    )
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
    from safetensors.torch import load_file

    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no adapter at {str(root)!r}: the path does not exist")
    if not root.is_dir():
        raise AdapterError(f"{str(root)!r} is a file; an adapter is a directory holding {CONFIG_NAME} and {WEIGHTS_NAME}")
    cfg_path, w_path = root / CONFIG_NAME, root / WEIGHTS_NAME
    if not cfg_path.is_file():
        present = sorted(p.name for p in root.iterdir())
        raise AdapterError(f"{str(root)!r} holds no {CONFIG_NAME} (it holds {present}): not a loraxs-kernels adapter")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path} is not valid JSON: {e}") from None
    cfg = _check_config(cfg, str(cfg_path))
    if not w_path.is_file():
        present = sorted(p.name for p in root.iterdir())
        raise AdapterError(f"{str(root)!r} holds no {WEIGHTS_NAME} (it holds {present})")
    try:
        tensors = load_file(str(w_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{w_path} is not a readable safetensors file: {e}") from None

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


def load_adapter(model: nn.Module, path, **layer_kwargs) -> nn.Module:
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
    """
    cfg, tensors = read_adapter(path)
    plans = []
    for lpath, lc in cfg["layers"].items():
        try:
            module = model.get_submodule(lpath)
        except AttributeError:
            raise AdapterError(f"layer {lpath}: the model has no module at this path") from None
        rank = lc["rank"]
        if isinstance(module, FusedLoRAXSLinear):
            if module.rank != rank:
                raise AdapterError(f"layer {lpath}: the model's LoRA-XS layer has rank {module.rank}, the adapter rank {rank}")
            weight = module.weight
        elif is_adaptable(module):
            weight = base_tensors(module)[0]
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
                module.scaling = float(lc["scaling"])
                continue
            kwargs = dict(layer_kwargs)
            kwargs.pop("r_init", None)  # R comes from the file
            kwargs.setdefault("r_dtype", _r_dtype(R.dtype, weight.dtype))
            layer = FusedLoRAXSLinear.from_linear(
                module, lc["rank"], lc["scaling"], share_weight=True, basis=(A, B), r_init="zeros", **kwargs
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
