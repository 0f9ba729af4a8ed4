"""load_official_loraxs: a checkpoint of the official LoRA-XS code into FusedLoRAXSLinear layers.

The official code (a patch of PEFT 0.10) saves a PEFT LoRA directory: adapter_config.json
(peft_type "LORA", r, lora_alpha; nothing marks LoRA-XS) and adapter_model.safetensors (or
adapter_model.bin) with, per adapted layer at dotted path P,

    base_model.model.P.lora_A.weight                 (r, in)   = (U_r Σ_r)ᵀ   from the SVD Wᵀ = U Σ Vᵀ
    base_model.model.P.lora_B.weight                 (out, r)  = V_r
    base_model.model.P_lora_latent_mapping.weight    (r, r)    = Rᵀ  (PEFT 0.10 strips ".default" from
                                                                      "P.default_lora_latent_mapping")

Current PEFT versions strip only ".default." and save the latent mapping as
base_model.model.P.default_lora_latent_mapping.weight; both spellings are read.

and forward base(x) + lora_B(R(lora_A(x)))·scaling, scaling = lora_alpha / r (lora_alpha / √r with
use_rslora). In this package's terms: A = lora_A.weightᵀ, B = lora_B.weightᵀ, R = latent.weightᵀ.
Other keys under base_model.model. are modules_to_save (e.g. a classifier), saved under their own
paths.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import torch
from torch import nn

from ..adapters.format import AdapterError
from ..modules.linear import FusedLoRAXSLinear, base_tensors
from ..modules.model import MODULES_TO_SAVE_ATTR, Transaction, is_adaptable, mark_trainable, named_slots

PREFIX = "base_model.model."
LATENT = "_lora_latent_mapping.weight"


def _read_weights(root: Path) -> dict[str, torch.Tensor]:
    st, bin_ = root / "adapter_model.safetensors", root / "adapter_model.bin"
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(st), device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise AdapterError(f"{st} is not a readable safetensors file: {e}") from None
    if bin_.is_file():
        try:
            obj = torch.load(str(bin_), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise AdapterError(
                f"{bin_} was refused by torch.load(weights_only=True) (it holds more than tensors, so loading "
                f"it could run code): {str(e).splitlines()[0]}"
            ) from None
        except (RuntimeError, EOFError, OSError) as e:
            raise AdapterError(f"{bin_} is not a readable torch checkpoint: {str(e).splitlines()[0]}") from None
        if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            raise AdapterError(f"{bin_} does not hold a dict of tensors (got {type(obj).__name__})")
        return obj
    present = sorted(p.name for p in root.iterdir())
    raise AdapterError(f"{str(root)!r} holds neither adapter_model.safetensors nor adapter_model.bin (it holds {present})")


# Current PEFT strips ".default." but not ".default" before "_lora_latent_mapping" when it saves, so
# the official code's latent mapping of layer P is saved as P.default_lora_latent_mapping.weight;
# PEFT 0.10 (the official code's) wrote P_lora_latent_mapping.weight.
LATENT_NOW = ".default_lora_latent_mapping.weight"


def _one_latent_spelling(keys: dict, root) -> dict:
    """keys with every latent mapping under the P_lora_latent_mapping.weight spelling."""
    out = {}
    for k, v in keys.items():
        if k.endswith(LATENT_NOW):
            old = k[: -len(LATENT_NOW)] + LATENT
            if old in keys:
                raise AdapterError(f"{root}: layer {k[: -len(LATENT_NOW)]} has its latent mapping twice, as {PREFIX}{k} "
                                   f"and {PREFIX}{old}: keep one")
            k = old
        out[k] = v
    return out


def _pattern_value(pattern: dict, path: str, default):
    # PEFT's rank_pattern / alpha_pattern keys match a module path exactly or as a suffix after a dot.
    for key, value in (pattern or {}).items():
        if path == key or path.endswith("." + key):
            return value
    return default


def load_official_loraxs(model: nn.Module, path, **layer_kwargs) -> nn.Module:
    """Load an official LoRA-XS checkpoint directory into `model` (a plain base model, or one whose
    layers at those paths are already FusedLoRAXSLinear), keeping the checkpoint's A and B (its own
    randomized SVD, signs and all) and its R; return the model, changed in place.

    The result computes base(x) + scaling·lora_B(R(lora_A(x))), the official forward (dropout aside:
    it is an inference-time equivalence). A fp32 R beside half-precision weights stays fp32 (the
    official code keeps R in fp32). Refuses (AdapterError, a ValueError) a plain LoRA adapter with no
    latent mappings, a LoRA bias, wrong shapes, NaN/Inf, or a .bin that torch.load(weights_only=True)
    rejects; FileNotFoundError for a missing path. The model is unchanged on any error.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"no checkpoint at {str(root)!r}: the path does not exist")
    if not root.is_dir():
        raise AdapterError(f"{str(root)!r} is a file; an official LoRA-XS checkpoint is a directory with adapter_config.json")
    cfg_path = root / "adapter_config.json"
    if not cfg_path.is_file():
        raise AdapterError(f"{str(root)!r} holds no adapter_config.json: not a PEFT / official LoRA-XS checkpoint")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object, got {type(cfg).__name__}")
    if cfg.get("format") is not None:
        raise AdapterError(f"{cfg_path} is a {cfg['format']!r} adapter, not an official LoRA-XS one: use loraxs_kernels.load_adapter")
    for key in ("peft_type", "r", "lora_alpha"):
        if key not in cfg:
            raise AdapterError(f"{cfg_path}: missing key {key!r}")
    if cfg["peft_type"] != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {cfg['peft_type']!r}; official LoRA-XS checkpoints are 'LORA'")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r}; LoRA-XS trains no bias, only 'none' is supported")
    tensors = _read_weights(root)

    bad = [k for k in tensors if not k.startswith(PREFIX)]
    if bad:
        raise AdapterError(f"{root}: keys {bad[:3]} lack the '{PREFIX}' prefix of a PEFT checkpoint")
    keys = _one_latent_spelling({k[len(PREFIX):]: v for k, v in tensors.items()}, root)
    paths = sorted(k[: -len(LATENT)] for k in keys if k.endswith(LATENT))
    lora_paths = sorted(k[: -len(".lora_A.weight")] for k in keys if k.endswith(".lora_A.weight"))
    if not paths:
        raise AdapterError(
            f"{root} has no '*{LATENT}' tensors: it is a plain LoRA adapter ({len(lora_paths)} LoRA layers), "
            "not LoRA-XS; load it with peft.PeftModel.from_pretrained"
        )
    plans = []
    used = set()
    for p in paths:
        names = {"A": f"{p}.lora_A.weight", "B": f"{p}.lora_B.weight", "R": f"{p}{LATENT}"}
        for n in names.values():
            if n not in keys:
                raise AdapterError(f"layer {p}: missing tensor {PREFIX}{n}")
        used.update(names.values())
        a, b, l = keys[names["A"]], keys[names["B"]], keys[names["R"]]
        try:
            module = model.get_submodule(p)
        except AttributeError:
            raise AdapterError(f"layer {p}: the model has no module at this path") from None
        if isinstance(module, FusedLoRAXSLinear):
            weight = module.weight
        elif is_adaptable(module):
            weight = base_tensors(module)[0]
        else:
            raise AdapterError(f"layer {p}: the model's module is a {type(module).__name__}, not an nn.Linear or Conv1D")
        out_f, in_f = weight.shape
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r) or tuple(l.shape) != (r, r):
            raise AdapterError(
                f"layer {p}: lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)}, latent mapping {tuple(l.shape)} do not "
                f"fit the base (out, in) = ({out_f}, {in_f}); expected (r, {in_f}), ({out_f}, r), (r, r)"
            )
        if isinstance(module, FusedLoRAXSLinear) and module.rank != r:
            raise AdapterError(f"layer {p}: the model's LoRA-XS layer has rank {module.rank}, the checkpoint rank {r}")
        for n, t in (("lora_A", a), ("lora_B", b), ("latent mapping", l)):
            if not t.is_floating_point():
                raise AdapterError(f"layer {p}: {n} has dtype {t.dtype}, expected a float dtype")
            if not torch.isfinite(t).all():
                raise AdapterError(f"layer {p}: {n} has NaN/Inf entries")
        alpha = _pattern_value(cfg.get("alpha_pattern"), p, cfg["lora_alpha"])
        scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
        A = a.t().to(device=weight.device, dtype=weight.dtype)
        B = b.t().to(device=weight.device, dtype=weight.dtype)
        R = l.t().to(device=weight.device)
        plans.append((p, module, weight, r, float(scaling), A, B, R))

    # The rest are modules_to_save (e.g. the classifier), under the module's own path.
    rest = {k: v for k, v in keys.items() if k not in used}
    stray = sorted(k for k in rest if ".lora_" in k or k.endswith(LATENT))
    if stray:
        raise AdapterError(f"{root}: incomplete LoRA-XS layer tensors {stray[:3]}")
    state = model.state_dict()
    mts_updates = []
    for k, v in rest.items():
        if k not in state:
            raise AdapterError(f"{root}: tensor {PREFIX}{k} matches no parameter or buffer of the model")
        if tuple(v.shape) != tuple(state[k].shape):
            raise AdapterError(f"{PREFIX}{k}: shape {tuple(v.shape)} in the checkpoint, {tuple(state[k].shape)} in the model")
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise AdapterError(f"{PREFIX}{k}: NaN/Inf entries")
        mts_updates.append((k, v))
    module_paths = sorted({k.rpartition(".")[0] for k, _ in mts_updates})

    slots = named_slots(model)
    previous = list(getattr(model, MODULES_TO_SAVE_ATTR, None) or [])
    with Transaction(model) as tx:
        for p, module, weight, r, scaling, A, B, R in plans:
            if isinstance(module, FusedLoRAXSLinear):
                with torch.no_grad():
                    module.lora_A.copy_(A)
                    module.lora_B.copy_(B)
                    module.lora_R.copy_(R)
                module.scaling = scaling
                continue
            kwargs = dict(layer_kwargs)
            kwargs.pop("r_init", None)
            r_dtype = R.dtype if R.dtype in (weight.dtype, torch.float32) else weight.dtype
            kwargs.setdefault("r_dtype", r_dtype)
            layer = FusedLoRAXSLinear.from_linear(module, r, scaling, share_weight=True, basis=(A, B), r_init="zeros", **kwargs)
            with torch.no_grad():
                layer.lora_R.copy_(R)
            for _, parent, name, child in slots:
                if child is module:
                    tx.setattr(parent, name, layer)
        with torch.no_grad():
            params = dict(model.named_parameters())
            buffers = dict(model.named_buffers())
            for k, v in mts_updates:
                (params.get(k) if k in params else buffers[k]).copy_(v)
        saved = [m for m in module_paths if m]
        top = sorted({m for m in saved if not any(m.startswith(o + ".") for o in saved if o != m)})
        mark_trainable(model, previous + [m for m in top if m not in previous])
    return model
