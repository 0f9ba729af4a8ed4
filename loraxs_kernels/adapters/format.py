"""The adapter file format: what the two files of an adapter directory hold, and the reader that checks
them (read_adapter). Writing is files.py (save_adapter) over atomic.py; loading into a model, files.py
and slots.py.

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
from pathlib import Path

import torch
from torch import nn

from .atomic import CONFIG_NAME, WEIGHTS_NAME
from .fingerprint import ATOL, N_SAMPLES, RTOL, fingerprint, fingerprint_problem
from .integrity import ChecksumMismatch, load_verified

FORMAT_NAME = "loraxs-kernels-adapter"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PEFT_TYPE_NAME = "LORAXS"  # the PeftType member loraxs_kernels.peft registers
PEFT_KEY_PREFIX = "base_model.model."  # where PEFT's PeftModel puts the base model's modules
GAP_THRESHOLD = 2e-3
SVD_CONVENTION = (
    "W (out x in; a Conv1D's transpose) -> the top r singular triplets of W^T = U S V^T in float32 (float64 "
    "for float64 weights): a truncated subspace iteration refined by Rayleigh-Ritz to a residual of 1e-6 sigma_1, "
    "the full torch.linalg.svd for small layers or when it does not converge; A = U_r S_r (in x r), "
    "B = V_r^T (r x out); each pair (u_i, v_i) signed so that U[pivots[i], i] > 0; y = x W^T + b + scaling * ((x A) R) B"
)
SVD_FACTS = {"convention": SVD_CONVENTION, "basis_gap_threshold": GAP_THRESHOLD}
FINGERPRINT_FACTS = {"rtol": RTOL, "atol_rms": ATOL, "n_samples": N_SAMPLES}
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
