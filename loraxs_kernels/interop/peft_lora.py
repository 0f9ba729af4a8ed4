"""export_peft_lora: a LoRA-XS model as a standard PEFT LoRA adapter, for any LoRA server.

LoRA computes base(x) + (alpha/r)·(x A_Lᵀ) B_Lᵀ with lora_A.weight = A_L (r×in) and lora_B.weight =
B_L (out×r). LoRA-XS's term s·((x A) R) B is that with

    lora_A.weight = (A R)ᵀ,   lora_B.weight = s·Bᵀ,   lora_alpha = r   (so alpha/r = 1)

at the same rank r: the file is as large as a LoRA adapter of rank r (A and B are in it), and PEFT,
vLLM or LoRAX serve it unchanged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..adapters.files import write_adapter_dir
from ..modules.linear import FusedLoRAXSLinear
from ..modules.model import MODULES_TO_SAVE_ATTR

PEFT_PREFIX = "base_model.model."


# PEFT's task types (peft.TaskType values) by the suffix of a transformers model class, the way
# AutoPeftModelFor<Task> picks the PeftModel class; a bare backbone (BertModel) extracts features.
TASK_TYPES = ("SEQ_CLS", "SEQ_2_SEQ_LM", "CAUSAL_LM", "TOKEN_CLS", "QUESTION_ANS", "FEATURE_EXTRACTION")
_CLASS_SUFFIX_TASK = (
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSeq2SeqLM", "SEQ_2_SEQ_LM"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
)


def infer_task_type(model: nn.Module) -> str | None:
    """PEFT's task_type for a transformers model, from its class name (None when it is not a
    transformers model: the file then loads with PeftModel.from_pretrained, not AutoPeftModelFor…)."""
    name = type(model).__name__
    for suffix, task in _CLASS_SUFFIX_TASK:
        if name.endswith(suffix):
            return task
    config = getattr(model, "config", None)
    if config is not None and type(config).__module__.startswith("transformers") and name.endswith("Model"):
        return "FEATURE_EXTRACTION"
    return None


def export_peft_lora(model: nn.Module, path, *, dtype: torch.dtype | None = None, modules_to_save=None,
                     task_type: str | None = None) -> Path:
    """Write the model's LoRA-XS layers as a PEFT LoRA adapter directory (adapter_config.json with
    peft_type "LORA", r, lora_alpha = r, target_modules = the layers' full dotted paths, and
    adapter_model.safetensors with `base_model.model.<path>.lora_A.weight` = (A R)ᵀ and
    `.lora_B.weight` = scaling·Bᵀ); return the directory.

    `peft.PeftModel.from_pretrained(base, path)` on the same base model then computes what this
    model computes. dtype: the tensors' dtype in the file (default: each layer's weight dtype; the
    products are formed in fp32, fp64 for fp64 layers). modules_to_save: default the ones recorded by
    apply_loraxs / load_adapter; their state is written under their own paths, as PEFT does.
    Layers of different ranks go into rank_pattern / alpha_pattern.
    task_type: PEFT's task type (one of TASK_TYPES, e.g. "SEQ_CLS"), which AutoPeftModelFor<Task> needs;
    default: inferred from the model's class (infer_task_type).
    """
    if task_type is None:
        task_type = infer_task_type(model)
    elif task_type not in TASK_TYPES:
        raise ValueError(f"task_type must be one of {list(TASK_TYPES)} (PEFT's TaskType values) or None, got {task_type!r}")
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, FusedLoRAXSLinear)]
    if not layers:
        raise ValueError("the model has no FusedLoRAXSLinear layers to export")
    if modules_to_save is None:
        modules_to_save = list(getattr(model, MODULES_TO_SAVE_ATTR, None) or [])
    tensors: dict[str, torch.Tensor] = {}
    for lpath, layer in layers:
        out_dtype = dtype or layer.weight.dtype
        work = torch.float64 if torch.float64 in (layer.weight.dtype, out_dtype) else torch.float32
        A, R, B = (t.detach().to(work) for t in (layer.lora_A, layer.lora_R, layer.lora_B))
        if not torch.isfinite(R).all():
            raise ValueError(f"{lpath}.lora_R has NaN or Inf entries; refusing to export a broken adapter")
        tensors[f"{PEFT_PREFIX}{lpath}.lora_A.weight"] = (A @ R).t().to(out_dtype).cpu().contiguous()
        tensors[f"{PEFT_PREFIX}{lpath}.lora_B.weight"] = (layer.scaling * B).t().to(out_dtype).cpu().contiguous()
    for mpath in modules_to_save:
        for k, v in model.get_submodule(mpath).state_dict().items():
            tensors[f"{PEFT_PREFIX}{mpath}.{k}"] = v.detach().cpu().contiguous().clone()
    ranks = {p: m.rank for p, m in layers}
    r = max(set(ranks.values()), key=list(ranks.values()).count)  # the most common rank is the default
    pattern = {p: rk for p, rk in ranks.items() if rk != r}
    conv = [bool(getattr(m, "fan_in_fan_out", False)) for _, m in layers]
    name_or_path = getattr(getattr(model, "config", None), "_name_or_path", None)
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": name_or_path or None,
        "r": r,
        "lora_alpha": r,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),  # alpha = r per layer: every layer's scale is 1, s is in lora_B
        "use_rslora": False,
        "use_dora": False,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": all(conv),
        "target_modules": [p for p, _ in layers],
        "modules_to_save": list(modules_to_save) or None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    return write_adapter_dir(path, tensors, config, {"format": "pt"})
