"""LoRA-XS as a PEFT method (loraxs_kernels.peft) on all-MiniLM-L6-v2: registration, the round trip
get_peft_model -> train -> save_pretrained -> PeftModel / AutoPeftModel.from_pretrained, merge, unload,
disable, named adapters, the one file format read by both entry points, and the refusals."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
import loraxs_kernels.peft as lp  # noqa: E402  (registers the method)
from hf_models import minilm, outputs, token_ids  # noqa: E402
from loraxs_kernels import FusedLoRAXSLinear, apply_loraxs, load_adapter, save_adapter  # noqa: E402
from loraxs_kernels.adapters import AdapterError  # noqa: E402
from loraxs_kernels.peft.registration import add_enum_member, unsupported_reason  # noqa: E402
from peft.utils.peft_types import PeftType  # noqa: E402

R = 4
TARGETS = ["query", "value"]
N_LAYERS = 12  # 6 BERT layers × (query, value)
CLASSIFIER = 384 * 2 + 2  # SEQ_CLS puts the classifier in modules_to_save
IDS = token_ids(batch=4, length=10)


def _config(**kw):
    return lp.LoraXSConfig(**{"r": R, "target_modules": TARGETS, "task_type": "SEQ_CLS", **kw})


def _train(model, steps=3, lr=5e-2, seed=0):
    """A few AdamW steps on random labels, in eval mode (no dropout), so R moves away from its init."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (IDS.shape[0],), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        loss = model(input_ids=IDS, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()


def _snapshot(model):
    return ([(n, type(m)) for n, m in model.named_modules()],
            {k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()})


def _assert_unchanged(model, snap):
    mods, sd, flags = snap
    assert [(n, type(m)) for n, m in model.named_modules()] == mods
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(PEFT model trained 3 steps, its logits, the base logits, the saved adapter folder)."""
    base = minilm(head_seed=1)
    torch.manual_seed(0)  # after minilm(): its first call in a process draws from the global RNG
    base_logits = outputs(base, IDS)[1]
    model = peft.get_peft_model(base, _config())
    _train(model)
    model.eval()
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    model.save_pretrained(folder)
    return model, outputs(model, IDS)[1], base_logits, folder


# --------------------------------------------------------------------------------------- registration
def test_the_peft_type_member_behaves_like_peft_s_own():
    member = PeftType.LORAXS
    assert PeftType("LORAXS") is member and PeftType["LORAXS"] is member and "LORAXS" in list(PeftType)
    assert member == "LORAXS" and json.dumps({"t": member}) == '{"t": "LORAXS"}'
    assert add_enum_member(PeftType, "LORAXS") is member  # idempotent
    lp.register()  # again: no error, still one mapping
    from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
    assert PEFT_TYPE_TO_CONFIG_MAPPING[member] is lp.LoraXSConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[member] is lp.LoraXSModel


def test_a_peft_without_the_state_dict_hooks_is_refused_naming_its_version():
    class OldBaseTuner:  # what PEFT < 0.21 has: none of the hooks
        pass

    why = unsupported_reason("0.20.0", OldBaseTuner, has_register=True)
    assert "peft 0.20.0" in why and f">= {lp.MIN_PEFT}" in why and "_get_adapter_state_dict" in why
    why = unsupported_reason("0.14.0", OldBaseTuner, has_register=False)
    assert "peft 0.14.0" in why and "register_peft_method" in why
    from peft.tuners.tuners_utils import BaseTuner
    assert unsupported_reason(peft.__version__, BaseTuner, has_register=True) is None


@pytest.mark.slow  # a fresh interpreter imports torch, transformers and the old PEFT: 20-25 s on the shared CPU
def test_an_installed_old_peft_is_refused_at_import():
    old = Path("/tmp/peft-0.20.0")  # pip install --no-deps --target /tmp/peft-0.20.0 peft==0.20.0
    if not (old / "peft").is_dir():
        pytest.skip(f"no PEFT 0.20.0 installed at {old}")
    env = {**os.environ, "PYTHONPATH": str(old), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-c", "import loraxs_kernels.peft"], env=env, capture_output=True,
                         text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert run.returncode != 0
    assert "ImportError" in run.stderr and "peft 0.20.0" in run.stderr and f">= {lp.MIN_PEFT}" in run.stderr


# --------------------------------------------------------------------------------------- the round trip
def test_get_peft_model_adapts_the_matched_layers_with_the_fused_module(trained):
    model = trained[0]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lp.LoraXSLayer)}
    assert len(layers) == N_LAYERS and all(n.endswith((".query", ".value")) for n in layers)
    for m in layers.values():
        fused = m.loraxs_layer["default"]
        assert isinstance(fused, FusedLoRAXSLinear) and fused.weight is m.base_layer.weight  # shared, no copy
        assert not fused.weight.requires_grad and fused.lora_R.requires_grad
    calls = []
    hooks = [m.register_forward_hook(lambda *a: calls.append(1)) for m in model.modules()
             if isinstance(m, FusedLoRAXSLinear)]
    outputs(model, IDS)
    for h in hooks:
        h.remove()
    assert len(calls) == N_LAYERS  # every adapted layer ran FusedLoRAXSLinear.forward (the op)
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == N_LAYERS * R * R + CLASSIFIER


def test_save_pretrained_writes_R_and_the_config_both_loaders_read(trained):
    model, _, _, folder = trained
    from safetensors.torch import load_file

    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(folder))
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORAXS" and cfg["task_type"] == "SEQ_CLS" and cfg["format_version"] == 2
    assert len(cfg["layers"]) == N_LAYERS and all("fingerprint" in lc for lc in cfg["layers"].values())
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    stored = {p for p, lc in cfg["layers"].items() if lc["basis"] == "stored"}
    want = {f"base_model.model.{p}.lora_R" for p in cfg["layers"]}
    want |= {f"base_model.model.{p}.lora_{t}" for p in stored for t in "AB"}
    want |= {"base_model.model.classifier.weight", "base_model.model.classifier.bias"}
    assert set(tensors) == want
    assert sum(t.numel() for k, t in tensors.items() if k.endswith("lora_R")) == N_LAYERS * R * R
    trained_R = model.base_model.model.bert.encoder.layer[0].attention.self.query.loraxs_layer["default"].lora_R
    assert torch.equal(tensors["base_model.model.bert.encoder.layer.0.attention.self.query.lora_R"], trained_R.detach())


def test_from_pretrained_and_auto_peft_model_give_identical_logits(trained):
    _, logits, base_logits, folder = trained
    assert not torch.equal(logits, base_logits)
    loaded = peft.PeftModel.from_pretrained(minilm(head_seed=2), folder)
    assert torch.equal(outputs(loaded, IDS)[1], logits)
    auto = peft.AutoPeftModelForSequenceClassification.from_pretrained(folder).eval()
    assert torch.equal(outputs(auto, IDS)[1], logits)


def test_merge_and_unload_unload_and_disable_adapter(trained):
    model, logits, base_logits, _ = trained
    with model.disable_adapter():
        assert torch.equal(outputs(model, IDS)[1], base_logits)
    assert torch.equal(outputs(model, IDS)[1], logits)  # enabled again

    # 2e-5 on the logits is the requirement for fp32 MiniLM; the merged weight differs from the
    # adapter's computation by one fp32 rounding of W + s·(A R B)ᵀ per layer. A planted fault (the rank-r
    # term merged with twice its scaling) must fail the same check.
    merged = copy.deepcopy(model).merge_and_unload()
    assert not any(isinstance(m, (lp.LoraXSLayer, FusedLoRAXSLinear)) for m in merged.modules())
    assert not any(p.requires_grad for n, p in merged.named_parameters() if not n.startswith("classifier"))
    assert (outputs(merged, IDS)[1] - logits).abs().max() <= 2e-5
    faulty = copy.deepcopy(model)
    for m in faulty.modules():
        if isinstance(m, lp.LoraXSLayer):
            m.loraxs_layer["default"].scaling *= 2
    assert (outputs(faulty.merge_and_unload(), IDS)[1] - logits).abs().max() > 2e-5

    unloaded = copy.deepcopy(model).unload()
    assert not any(isinstance(m, lp.LoraXSLayer) for m in unloaded.modules())
    # unload hands back the base layers untouched (and keeps the trained copy of modules_to_save, as PEFT does)
    pristine = minilm().bert.state_dict()
    now = unloaded.bert.state_dict()
    assert now.keys() == pristine.keys() and all(torch.equal(now[k], pristine[k]) for k in pristine)
    assert torch.equal(unloaded.classifier.weight, model.base_model.model.classifier.modules_to_save["default"].weight)


def test_two_named_adapters(trained, tmp_path):
    model = copy.deepcopy(trained[0])
    logits = trained[1]
    model.add_adapter("second", lp.LoraXSConfig(r=2, target_modules=["query", "key"], task_type="SEQ_CLS"))
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert set(query.loraxs_layer) == {"default", "second"}
    assert query.loraxs_layer["second"].rank == 2 and not query.loraxs_layer["second"].lora_R.requires_grad
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, lp.LoraXSLayer) and "second" in m.loraxs_layer:
                m.loraxs_layer["second"].lora_R.normal_(0, 0.1)
    model.set_adapter("second")
    assert query.loraxs_layer["second"].lora_R.requires_grad and not query.loraxs_layer["default"].lora_R.requires_grad
    second = outputs(model, IDS)[1]
    assert not torch.equal(second, logits)
    model.set_adapter("default")
    assert torch.equal(outputs(model, IDS)[1], logits)
    # Saved together (the second one in its own subfolder) and loaded by name into a fresh model.
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "second" / "adapter_config.json").read_text())
    assert cfg["r"] == 2 and len(cfg["layers"]) == 12 and all(lc["rank"] == 2 for lc in cfg["layers"].values())
    fresh = peft.PeftModel.from_pretrained(minilm(head_seed=8), tmp_path)
    fresh.load_adapter(tmp_path / "second", adapter_name="second")
    fresh.set_adapter("second")
    assert torch.equal(outputs(fresh, IDS)[1], second)


# --------------------------------------------------------------------------------------- one file format
def test_peft_reads_save_adapter_files_and_load_adapter_reads_peft_files(trained, tmp_path):
    model, logits, _, folder = trained
    # PEFT's file -> the PEFT-free loader
    plain = load_adapter(minilm(head_seed=3), folder)
    assert torch.equal(outputs(plain, IDS)[1], logits)
    # save_adapter's file -> PEFT, and the same file -> load_adapter: one result
    torch.manual_seed(1)
    ours = apply_loraxs(minilm(head_seed=4), R, TARGETS, modules_to_save=["classifier"])
    _train(ours, steps=2)
    path = save_adapter(ours, tmp_path / "ours")
    cfg = json.loads((path / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["peft_type"] == "LORAXS"
    fields = set(lp.LoraXSConfig.__dataclass_fields__)
    assert set(cfg) <= fields, f"save_adapter writes keys PEFT's config would drop: {set(cfg) - fields}"
    via_peft = peft.PeftModel.from_pretrained(minilm(head_seed=5), path)
    via_ours = load_adapter(minilm(head_seed=6), path)
    assert torch.equal(outputs(via_peft, IDS)[1], outputs(via_ours, IDS)[1])
    via_auto = peft.AutoPeftModelForSequenceClassification.from_pretrained(path).eval()  # base from the config
    assert torch.equal(outputs(via_auto, IDS)[1], outputs(via_ours, IDS)[1])
    assert not torch.equal(outputs(via_peft, IDS)[1], logits)


# --------------------------------------------------------------------------------------- refusals
def test_an_adapter_for_another_base_is_refused_and_the_model_unchanged(trained):
    other = minilm(head_seed=1)
    with torch.no_grad():
        w = other.bert.encoder.layer[2].attention.self.value.weight
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(9)) * w.std())
    snap = _snapshot(other)
    with pytest.raises(AdapterError, match=r"layer bert\.encoder\.layer\.2\.attention\.self\.value: this adapter was "
                                           r"made for another base model"):
        peft.PeftModel.from_pretrained(other, trained[3])
    _assert_unchanged(other, snap)


@pytest.mark.parametrize("kw, exc, words", [
    ({"r": 8.0}, TypeError, "r must be a positive int"),
    ({"r": True}, TypeError, "r must be a positive int"),
    ({"r": 0}, ValueError, "r must be ≥ 1"),
    ({"scaling": "1"}, TypeError, "scaling must be a float"),
    ({"scaling": float("nan")}, ValueError, "scaling must be finite"),
    ({"init": "pca"}, ValueError, "init must be one of"),
    ({"r_init": "ones"}, ValueError, "r_init must be one of"),
    ({"r_dtype": "int8"}, ValueError, "r_dtype must be None or one of"),
    ({"target_modules": None}, ValueError, "target_modules is required"),
    ({"target_modules": ["query", 3]}, TypeError, "target_modules must be a string or a list of strings"),
])
def test_bad_config_values_name_what_to_change(kw, exc, words):
    with pytest.raises(exc, match=words):
        _config(**kw)


@pytest.mark.parametrize("kw, exc, words", [
    ({"r": 400}, ValueError, r"r=400 does not fit bert\.encoder\.layer\.0\.attention\.self\.query"),
    # the query of layer 0 is replaced before the LayerNorm after it is refused: the replacement is undone
    ({"target_modules": ["query", "output.LayerNorm"]}, TypeError,
     r"matched bert\.encoder\.layer\.0\.attention\.output\.LayerNorm, a LayerNorm"),
])
def test_refused_get_peft_model_leaves_the_model_unchanged(kw, exc, words):
    model = minilm()
    snap = _snapshot(model)
    with pytest.raises(exc, match=words):
        peft.get_peft_model(model, _config(**kw))
    _assert_unchanged(model, snap)


def test_version_1_files_still_load(trained, tmp_path):
    """A file as save_adapter wrote it before format_version 2 (no PEFT fields, keys without the
    base_model.model. prefix) loads through load_adapter as before."""
    from safetensors.torch import load_file, save_file

    _, logits, _, folder = trained
    v1 = tmp_path / "v1"
    v1.mkdir()
    cfg = json.loads((folder / "adapter_config.json").read_text())
    peft_only = {"peft_type", "task_type", "base_model_name_or_path", "inference_mode", "r", "init", "r_dtype",
                 "r_init", "exclude_modules", "layers_to_transform", "layers_pattern", "auto_mapping", "revision",
                 "peft_version"}
    cfg = {k: v for k, v in cfg.items() if k not in peft_only}
    cfg.update(format_version=1, modules_to_save=list(cfg["saved_module_keys"]), rank=R)
    (v1 / "adapter_config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    save_file({k.removeprefix("base_model.model."): v for k, v in tensors.items()}, str(v1 / "adapter_model.safetensors"))
    assert torch.equal(outputs(load_adapter(minilm(head_seed=7), v1), IDS)[1], logits)


def test_all_linear_and_exclude_modules_follow_peft_s_matching():
    base = minilm()
    linears = [n for n, m in base.named_modules() if type(m) is torch.nn.Linear]
    model = peft.get_peft_model(base, _config(r=2, target_modules="all-linear", exclude_modules=["pooler.dense"]))
    adapted = sorted(n.removeprefix("base_model.model.") for n, m in model.named_modules() if isinstance(m, lp.LoraXSLayer))
    # every linear but the output head (the classifier, a modules_to_save of SEQ_CLS) and the excluded pooler
    assert adapted == sorted(n for n in linears if n not in ("classifier", "bert.pooler.dense")) and len(adapted) == 36
    assert sorted(model.peft_config["default"].layers) == adapted


def test_random_basis_on_a_bf16_base_round_trips_with_an_fp32_R(tmp_path):
    """init="random": A and B cannot be recomputed, so the file stores them; a bf16 base gets an fp32 R
    by default (an optimizer step on a bf16 R loses most updates)."""
    base = minilm(head_seed=1).to(torch.bfloat16)
    model = peft.get_peft_model(base, _config(r=2, target_modules=["value"], init="random"))
    layers = [m for m in model.modules() if isinstance(m, lp.LoraXSLayer)]
    assert len(layers) == 6 and all(m.loraxs_layer["default"].lora_R.dtype == torch.float32 for m in layers)
    assert all(lc["basis"] == "stored" for lc in model.peft_config["default"].layers.values())
    with torch.no_grad():
        for m in layers:
            m.loraxs_layer["default"].lora_R.normal_(0, 0.5)
    model.eval()
    want = outputs(model, IDS)[1]
    model.save_pretrained(tmp_path / "ad")
    loaded = peft.PeftModel.from_pretrained(minilm(head_seed=2).to(torch.bfloat16), tmp_path / "ad")
    assert torch.equal(outputs(loaded, IDS)[1], want)
    with model.disable_adapter():
        assert not torch.equal(outputs(model, IDS)[1], want)


def test_an_adapter_not_named_default_is_active_and_trains():
    model = peft.get_peft_model(minilm(head_seed=1), _config(r=2, target_modules=["value"]), adapter_name="mine")
    layers = [m for m in model.modules() if isinstance(m, lp.LoraXSLayer)]
    assert len(layers) == 6 and all(m.active_adapters == ["mine"] for m in layers)
    assert all(m.loraxs_layer["mine"].lora_R.requires_grad for m in layers)
    before = outputs(model, IDS)[1]
    with torch.no_grad():
        layers[0].loraxs_layer["mine"].lora_R.normal_(0, 0.5)
    assert not torch.equal(outputs(model, IDS)[1], before)
