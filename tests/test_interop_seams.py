"""Interop seams (issue 18, item 5): export_peft_lora writes PEFT's task_type, so AutoPeftModelFor…
loads the file; load_official_loraxs reads both spellings of the latent mapping's key."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from hf_models import minilm, outputs, token_ids
from loraxs_kernels import apply_loraxs
from loraxs_kernels.interop import export_peft_lora, load_official_loraxs
from loraxs_kernels.interop.peft_lora import infer_task_type
from test_interop import _close, _official_checkpoint


def _trained(model):
    apply_loraxs(model, 4, ["query", "value"], scaling=2.0, modules_to_save=["classifier"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, "lora_R"):
                m.lora_R.copy_(torch.randn(m.lora_R.shape, generator=g) * 0.1)
        model.classifier.weight.add_(torch.randn(model.classifier.weight.shape, generator=g) * 0.1)
    return model


def test_export_writes_the_task_type_and_auto_peft_model_loads_it(tmp_path):
    peft = pytest.importorskip("peft")
    model = _trained(minilm(head_seed=1))
    export_peft_lora(model, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["base_model_name_or_path"]
    loaded = peft.AutoPeftModelForSequenceClassification.from_pretrained(str(tmp_path / "lora")).eval()
    ids = token_ids(3, 9)
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert (want - minilm(head_seed=1)(input_ids=ids).logits).abs().max() > 1e-3, "the adapter must matter"
    _close(got, want, "AutoPeftModel logits")


def test_task_type_parameter_and_inference(tmp_path):
    model = _trained(minilm())
    export_peft_lora(model, tmp_path / "fe", task_type="FEATURE_EXTRACTION")
    assert json.loads((tmp_path / "fe" / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    with pytest.raises(ValueError, match=r"task_type must be one of .*'SEQ_CLS'.*got 'seq-cls'"):
        export_peft_lora(model, tmp_path / "bad", task_type="seq-cls")
    assert not (tmp_path / "bad").exists()
    assert infer_task_type(model.bert) == "FEATURE_EXTRACTION"
    assert infer_task_type(nn.Sequential(nn.Linear(2, 2))) is None


def test_official_checkpoint_with_current_peft_key_spelling(tmp_path):
    official = _official_checkpoint(minilm(), tmp_path / "old")
    tensors = load_file(str(tmp_path / "old" / "adapter_model.safetensors"))
    renamed = {k.replace("_lora_latent_mapping.weight", ".default_lora_latent_mapping.weight"): v
               for k, v in tensors.items()}
    assert renamed != tensors
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "adapter_config.json").write_text((tmp_path / "old" / "adapter_config.json").read_text())
    save_file(renamed, str(tmp_path / "new" / "adapter_model.safetensors"))
    ids = token_ids(3, 9)
    a = outputs(load_official_loraxs(minilm(head_seed=3), tmp_path / "new"), ids)
    b = outputs(load_official_loraxs(minilm(head_seed=3), tmp_path / "old"), ids)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    _close(a[1], outputs(official, ids)[1], "logits")
    # Both spellings of one layer at once are refused, naming the layer.
    both = dict(tensors)
    key = next(k for k in renamed if k.endswith(".default_lora_latent_mapping.weight"))
    both[key] = renamed[key].clone()
    (tmp_path / "both").mkdir()
    (tmp_path / "both" / "adapter_config.json").write_text((tmp_path / "old" / "adapter_config.json").read_text())
    save_file(both, str(tmp_path / "both" / "adapter_model.safetensors"))
    model = minilm()
    with pytest.raises(ValueError, match="has its latent mapping twice"):
        load_official_loraxs(model, tmp_path / "both")
    assert not any(hasattr(m, "lora_R") for m in model.modules())
