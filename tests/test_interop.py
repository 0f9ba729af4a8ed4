"""PEFT LoRA export (loaded back by PEFT itself), official LoRA-XS checkpoints, PEFT tinylora."""

from __future__ import annotations

import copy
import json
import pickle
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import loraxs_kernels as lk
from hf_models import minilm, outputs, token_ids
from loraxs_kernels import FusedLoRAXSLinear, apply_loraxs, export_peft_lora
from loraxs_kernels.adapters import AdapterError
from loraxs_kernels.interop import from_peft_tinylora, load_official_loraxs

peft = pytest.importorskip("peft")


def _randomise_R(model, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FusedLoRAXSLinear):
                m.lora_R.copy_(torch.randn(m.lora_R.shape, generator=g, dtype=torch.float64) * std)


def _close(a, b, what, atol=2e-5, rtol=1e-4):
    # Per element in fp32: two summation orders of a 384-wide model's 6 layers agree to ~1e-6 (measured 4e-8 on logits).
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# ------------------------------------------------------------------------------------ PEFT LoRA export
def test_export_peft_lora_loads_in_peft_with_the_same_outputs(tmp_path):
    model = minilm(head_seed=1)
    apply_loraxs(model, 8, ["query", "value"], scaling=2.0, modules_to_save=["classifier"])
    _randomise_R(model, std=0.05)
    with torch.no_grad():
        model.classifier.weight.add_(0.1)
    export_peft_lora(model, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8 and cfg["lora_alpha"] == 8
    assert len(cfg["target_modules"]) == 12 and cfg["modules_to_save"] == ["classifier"]
    keys = set(load_file(str(tmp_path / "lora" / "adapter_model.safetensors")))
    q = "base_model.model.bert.encoder.layer.0.attention.self.query"
    assert {f"{q}.lora_A.weight", f"{q}.lora_B.weight", "base_model.model.classifier.weight"} <= keys
    peft_model = peft.PeftModel.from_pretrained(minilm(head_seed=2), str(tmp_path / "lora")).eval()
    ids = token_ids(4, 12)
    (h, y), (hp, yp) = outputs(model, ids), outputs(peft_model, ids)
    base_h, _ = outputs(minilm(), ids)
    assert (h - base_h).abs().max() > 0.1, "the adapter changes the output, so equality below means something"
    _close(hp, h, "hidden states")
    _close(yp, y, "logits")


def test_export_conv1d_and_mixed_ranks(tmp_path):
    """GPT-2-style Conv1D layers (fan_in_fan_out) and two ranks (rank_pattern) through PEFT."""
    transformers = pytest.importorskip("transformers")
    Conv1D = transformers.pytorch_utils.Conv1D

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.c_attn, self.c_proj = Conv1D(24, 16), Conv1D(16, 24)

        def forward(self, x):
            return self.c_proj(torch.tanh(self.c_attn(x)))

    model = apply_loraxs(Net(), 4, ["c_attn"], scaling=0.5)
    apply_loraxs(model, 2, ["c_proj"], scaling=3.0)
    _randomise_R(model, std=3.0)  # Conv1D starts at N(0, 0.02): a large R to move the output visibly
    export_peft_lora(model, tmp_path / "lora")
    cfg = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert cfg["fan_in_fan_out"] is True and cfg["rank_pattern"] in ({"c_proj": 2}, {"c_attn": 4})
    peft_model = peft.PeftModel.from_pretrained(Net(), str(tmp_path / "lora")).eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        _close(peft_model(x), model(x), "Conv1D model", atol=1e-5, rtol=1e-5)
        assert (model(x) - Net()(x)).abs().max() > 1e-3


# ------------------------------------------------------------------------------------ official LoRA-XS
class OfficialLayer(nn.Module):
    """The official forward: base(x) + lora_B(R(lora_A(x))) * scaling, as three nn.Linear calls."""

    def __init__(self, base, a, b, latent, scaling):
        super().__init__()
        self.base, self.a, self.b, self.latent, self.scaling = base, a, b, latent, scaling

    def forward(self, x):
        return self.base(x) + F.linear(F.linear(F.linear(x, self.a), self.latent), self.b) * self.scaling


def _official_checkpoint(model, root, r=8, alpha=16, fmt="safetensors", seed=0):
    """What the official code's initialization_utils saves: SVD of Wᵀ = U Σ Vᵀ, lora_A.weight =
    (U_r Σ_r)ᵀ, lora_B.weight = V_r, latent mapping = Rᵀ, keys without the adapter name. Random
    signs per pair stand for its randomized SVD's own sign choice. Returns the official model."""
    g = torch.Generator().manual_seed(seed)
    official = copy.deepcopy(model)
    tensors = {}
    for path, mod in list(model.named_modules()):
        if not (isinstance(mod, nn.Linear) and path.endswith(("query", "value"))):
            continue
        U, S, Vh = torch.linalg.svd(mod.weight.detach().t(), full_matrices=False)
        signs = torch.randint(0, 2, (r,), generator=g) * 2.0 - 1
        a = ((U[:, :r] * signs) * S[:r]).t().contiguous()  # (r, in)
        b = (Vh[:r].t() * signs).contiguous()  # (out, r)
        latent = (torch.randn(r, r, generator=g) * 0.05).contiguous()
        tensors[f"base_model.model.{path}.lora_A.weight"] = a
        tensors[f"base_model.model.{path}.lora_B.weight"] = b
        tensors[f"base_model.model.{path}_lora_latent_mapping.weight"] = latent
        parent, _, name = path.rpartition(".")
        setattr(official.get_submodule(parent), name, OfficialLayer(mod, a, b, latent, alpha / r))
    head = torch.randn(official.classifier.weight.shape, generator=g) * 0.1
    with torch.no_grad():
        official.classifier.weight.copy_(head)
    tensors["base_model.model.classifier.weight"] = head
    tensors["base_model.model.classifier.bias"] = official.classifier.bias.detach().clone()
    root.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["query", "value"],
           "modules_to_save": ["classifier"], "bias": "none", "lora_dropout": 0.1, "task_type": "SEQ_CLS"}
    (root / "adapter_config.json").write_text(json.dumps(cfg))
    if fmt == "safetensors":
        save_file(tensors, str(root / "adapter_model.safetensors"))
    else:
        torch.save(tensors, str(root / "adapter_model.bin"))
    return official.eval()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_official_checkpoint_gives_the_official_outputs(tmp_path, fmt):
    official = _official_checkpoint(minilm(), tmp_path / "ck", fmt=fmt)
    model = load_official_loraxs(minilm(head_seed=3), tmp_path / "ck")
    layer = model.bert.encoder.layer[2].attention.self.value
    assert isinstance(layer, FusedLoRAXSLinear) and layer.rank == 8 and layer.scaling == 2.0
    ref = official.bert.encoder.layer[2].attention.self.value
    assert torch.equal(layer.lora_A, ref.a.t()) and torch.equal(layer.lora_B, ref.b.t()), "its A and B are kept"
    assert model.loraxs_modules_to_save == ["classifier"]
    ids = token_ids(4, 12)
    (h, y), (ho, yo) = outputs(model, ids), outputs(official, ids)
    assert (h - outputs(minilm(), ids)[0]).abs().max() > 0.1
    _close(h, ho, "hidden states")
    _close(y, yo, "logits")


def _model_state(model):
    return {n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    types, sd = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


def test_official_bad_inputs_refused_model_unchanged(tmp_path):
    _official_checkpoint(minilm(), tmp_path / "ok")
    model = minilm()
    snap = _model_state(model)

    def variant(name, edit_cfg=None, edit_tensors=None, evil=False):
        root = tmp_path / name
        root.mkdir()
        cfg = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
        tensors = load_file(str(tmp_path / "ok" / "adapter_model.safetensors"))
        if edit_cfg:
            edit_cfg(cfg)
        if edit_tensors:
            edit_tensors(tensors)
        (root / "adapter_config.json").write_text(json.dumps(cfg))
        if evil:
            (root / "adapter_model.bin").write_bytes(pickle.dumps({"x": _Evil()}))
        else:
            save_file(tensors, str(root / "adapter_model.safetensors"))
        return root

    lat = "base_model.model.bert.encoder.layer.3.attention.self.query_lora_latent_mapping.weight"
    cases = [
        (variant("evil", evil=True), "refused by torch.load\\(weights_only=True\\)"),
        (variant("nan", edit_tensors=lambda t: t[lat].fill_(float("nan"))), "layer bert.encoder.layer.3.attention.self.query: latent mapping has NaN"),
        (variant("shape", edit_tensors=lambda t: t.update({lat: torch.zeros(4, 4)})), "layer bert.encoder.layer.3.attention.self.query: .*do not fit"),
        (variant("plain_lora", edit_tensors=lambda t: [t.pop(k) for k in list(t) if k.endswith("latent_mapping.weight")]),
         "plain LoRA adapter"),
        (variant("type", edit_cfg=lambda c: c.update(peft_type="IA3")), "peft_type is 'IA3'"),
        (variant("nokey", edit_cfg=lambda c: c.pop("lora_alpha")), "missing key 'lora_alpha'"),
    ]
    for root, msg in cases:
        with pytest.raises(AdapterError, match=msg):
            load_official_loraxs(model, root)
        _unchanged(model, snap)
    (tmp_path / "badjson").mkdir()
    (tmp_path / "badjson" / "adapter_config.json").write_text("{nope")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_official_loraxs(model, tmp_path / "badjson")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_official_loraxs(model, tmp_path / "missing")
    ours = apply_loraxs(minilm(), 2, ["query"])
    lk.save_adapter(ours, tmp_path / "ours")
    with pytest.raises(AdapterError, match="use loraxs_kernels.load_adapter"):
        load_official_loraxs(model, tmp_path / "ours")
    _unchanged(model, snap)


# ------------------------------------------------------------------------------------ PEFT tinylora
def test_from_peft_tinylora_computes_what_tinylora_computes():
    cfg = peft.TinyLoraConfig(r=4, u=16, target_modules=["query", "value"], init_weights="uniform", init_v_bound=0.5,
                              modules_to_save=["classifier"], weight_tying=0.5)
    tl = peft.get_peft_model(minilm(head_seed=1), cfg).eval()
    with torch.no_grad():
        tl.base_model.model.classifier.modules_to_save["default"].weight.add_(0.3)
    ids = token_ids(4, 12)
    h, y = outputs(tl, ids)
    model = from_peft_tinylora(tl)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert isinstance(layer, FusedLoRAXSLinear) and layer.rank == 4 and layer.scaling == 1.0
    assert type(model.classifier) is nn.Linear and model.loraxs_modules_to_save == ["classifier"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if n.endswith("lora_R") or n.startswith("classifier.")}
    h2, y2 = outputs(model, ids)
    assert (h - outputs(minilm(), ids)[0]).abs().max() > 0.1
    _close(h2, h, "hidden states")
    _close(y2, y, "logits")


def test_from_peft_tinylora_refusals(monkeypatch):
    cfg = peft.TinyLoraConfig(r=2, u=4, target_modules=["query"], tinylora_dropout=0.1)
    with pytest.raises(ValueError, match="tinylora_dropout = 0.1"):
        from_peft_tinylora(peft.get_peft_model(minilm(), cfg))
    with pytest.raises(ValueError, match="no PEFT tinylora Linear layers"):
        from_peft_tinylora(minilm())
    # A PEFT without the tinylora tuner: the error names the installed version.
    monkeypatch.setitem(sys.modules, "peft.tuners.tinylora.layer", None)
    with pytest.raises(ImportError, match=rf"the installed PEFT \({peft.__version__}\) has no tinylora"):
        from_peft_tinylora(minilm())
