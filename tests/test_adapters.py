"""Adapters as files (save_adapter / load_adapter / fingerprint) and apply_loraxs targeting.

Toy models for the format, the error paths and atomicity; the real all-MiniLM-L6-v2 for the
end-to-end round trip (train → save → fresh base → load → the same outputs) and the bf16 base."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import loraxs_kernels as lk
from hf_models import minilm, outputs, token_ids
from loraxs_kernels import FusedLoRAXSLinear, apply_loraxs, load_adapter, merge_loraxs, save_adapter
from loraxs_kernels.adapters import GAP_THRESHOLD, AdapterError, fingerprint, fingerprint_mismatch


class Toy(nn.Module):
    def __init__(self, d=24, hidden=32, vocab=40, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, d)
        self.block = nn.Module()
        self.block.q_proj, self.block.v_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.block.up, self.block.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, ids):
        h = self.embed(ids)
        h = h + self.block.q_proj(h) * torch.sigmoid(self.block.v_proj(h))
        h = h + self.block.down(F.gelu(self.block.up(h)))
        return self.head(h.mean(1))


IDS = torch.randint(0, 40, (3, 5), generator=torch.Generator().manual_seed(7))


def _randomise_R(model, std=0.2, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FusedLoRAXSLinear):
                m.lora_R.copy_(torch.randn(m.lora_R.shape, generator=g, dtype=torch.float64) * std)


def _snapshot(model):
    """Everything load_adapter could change: module types per path, tensors, flags, the recorded list."""
    return (
        {n: type(m) for n, m in model.named_modules()},
        {k: v.clone() for k, v in model.state_dict().items()},
        {n: p.requires_grad for n, p in model.named_parameters()},
        copy.copy(getattr(model, "loraxs_modules_to_save", "<absent>")),
    )


def _assert_unchanged(model, snap):
    types, sd, flags, mts = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(now[k], sd[k]) for k in sd)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert getattr(model, "loraxs_modules_to_save", "<absent>") == mts


def _trained_toy(tmp_path, **save_kw):
    model = apply_loraxs(Toy(), 4, ["q_proj", "v_proj", "up", "down"], scaling=1.5, modules_to_save=["head"])
    _randomise_R(model)
    with torch.no_grad():
        model.head.weight.add_(0.5)
    save_adapter(model, tmp_path / "ad", **save_kw)
    return model, tmp_path / "ad"


# ------------------------------------------------------------------------------ apply_loraxs targeting
def test_apply_targets_by_name_path_and_regex():
    by_name = apply_loraxs(Toy(), 2, ["q_proj"])
    by_path = apply_loraxs(Toy(), 2, ["block.q_proj"])
    by_regex = apply_loraxs(Toy(), 2, r"block\.(q|v)_proj")  # a single string: re.fullmatch (PEFT's rule)
    adapted = lambda m: sorted(n for n, x in m.named_modules() if isinstance(x, FusedLoRAXSLinear))
    assert adapted(by_name) == adapted(by_path) == ["block.q_proj"]
    assert adapted(by_regex) == ["block.q_proj", "block.v_proj"]
    # A list entry is a path or a suffix after a '.': "q_" is neither; a string must match the whole path.
    with pytest.raises(ValueError, match="found no layer to adapt: 'q_' matches no module"):
        apply_loraxs(Toy(), 2, ["q_"])
    with pytest.raises(ValueError, match="found no layer to adapt: 'q_proj' matches no module"):
        apply_loraxs(Toy(), 2, "q_proj")


def test_apply_reuses_the_base_weight_tensor():
    model = Toy()
    w, b = model.block.q_proj.weight, model.block.q_proj.bias
    ptr = w.data_ptr()
    apply_loraxs(model, 4, ["q_proj"])
    assert model.block.q_proj.weight is w and model.block.q_proj.bias is b
    assert model.block.q_proj.weight.data_ptr() == ptr and not w.requires_grad


def test_modules_to_save_trainable_and_recorded():
    model = apply_loraxs(Toy(), 4, ["q_proj", "v_proj"], modules_to_save=["head"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"block.q_proj.lora_R", "block.v_proj.lora_R", "head.weight", "head.bias"}
    assert model.loraxs_modules_to_save == ["head"]
    with pytest.raises(ValueError, match="modules_to_save: no module matches"):
        apply_loraxs(Toy(), 4, ["q_proj"], modules_to_save=["nope"])
    untouched = Toy()
    snap = _snapshot(untouched)
    # PEFT's rule: a layer inside modules_to_save trains whole and is never adapted.
    with pytest.raises(ValueError, match="'q_proj' matches only layers inside modules_to_save"):
        apply_loraxs(untouched, 4, ["q_proj"], modules_to_save=["block"])
    _assert_unchanged(untouched, snap)


def test_conv1d_base_shares_memory_and_merges_back():
    transformers = pytest.importorskip("transformers")
    Conv1D = transformers.pytorch_utils.Conv1D
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("c_attn", Conv1D(20, 12))  # nf=out=20, nx=in=12; weight (12, 20)
    ref = copy.deepcopy(model)
    ptr = model.c_attn.weight.data_ptr()
    apply_loraxs(model, 3, ["c_attn"], r_init="zeros")
    layer = model.c_attn
    assert isinstance(layer, FusedLoRAXSLinear) and layer.fan_in_fan_out
    assert (layer.in_features, layer.out_features) == (12, 20) and layer.weight.shape == (20, 12)
    assert layer.weight.data_ptr() == ptr, "Conv1D's weight is used through a transposed view, not copied"
    x = torch.randn(2, 4, 12)
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x), atol=1e-6, rtol=1e-5)
        _randomise_R(model)
        y = model(x)
    merge_loraxs(model)
    assert type(model.c_attn) is Conv1D and model.c_attn.weight.shape == (12, 20)
    with torch.no_grad():
        assert torch.allclose(model(x), y, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------ round trip
def test_round_trip_on_a_fresh_base(tmp_path):
    model, path = _trained_toy(tmp_path)
    fresh = Toy()
    fresh.head.reset_parameters()  # the saved head must come back from the file
    assert load_adapter(fresh, path) is fresh
    assert torch.equal(fresh(IDS), model(IDS))
    assert {n for n, p in fresh.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert fresh.loraxs_modules_to_save == ["head"]
    assert fresh.block.q_proj.scaling == 1.5


def test_round_trip_into_existing_loraxs_layers(tmp_path):
    model, path = _trained_toy(tmp_path)
    other = apply_loraxs(Toy(), 4, ["q_proj", "v_proj", "up", "down"], scaling=0.1, modules_to_save=["head"])
    load_adapter(other, path)
    assert torch.equal(other(IDS), model(IDS)) and other.block.up.scaling == 1.5


def test_file_holds_R_only(tmp_path):
    model, path = _trained_toy(tmp_path)
    tensors = {k.removeprefix("base_model.model."): v for k, v in load_file(str(path / "adapter_model.safetensors")).items()}
    cfg = json.loads((path / "adapter_config.json").read_text())
    layers = ["block.q_proj", "block.v_proj", "block.up", "block.down"]
    assert cfg["format"] == "loraxs-kernels-adapter" and cfg["rank"] == 4 and cfg["scaling"] == 1.5
    assert cfg["target_modules"] == layers and cfg["modules_to_save"] == ["head"]
    stored = [p for p in layers if cfg["layers"][p]["basis"] == "stored"]
    expect = {f"{p}.lora_R" for p in layers} | {f"{p}.lora_{x}" for p in stored for x in "AB"} | {"head.weight", "head.bias"}
    assert set(tensors) == expect
    assert all(tensors[f"{p}.lora_R"].shape == (4, 4) for p in layers)
    full = save_adapter(model, tmp_path / "full", include_basis=True)
    assert {f"base_model.model.{p}.lora_A" for p in layers} <= set(load_file(str(full / "adapter_model.safetensors")))


def test_ill_conditioned_layer_stores_its_basis(tmp_path):
    """σ_4 = σ_5 within 1e-4 (relative): that layer's basis is in the file; the other's is not."""
    torch.manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(16, 16, dtype=torch.float64))
    s = torch.linspace(4.0, 0.5, 16, dtype=torch.float64)
    s[4] = s[3] * (1 - 1e-4)
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.copy_((U * s) @ V.t())
    apply_loraxs(model, 4, r"\d")
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["layers"]
    assert cfg["0"]["basis"] == "stored" and cfg["0"]["min_relative_gap"] < GAP_THRESHOLD
    assert "gap" in cfg["0"]["basis_reason"]
    assert cfg["1"]["basis"] == "svd" and cfg["1"]["min_relative_gap"] >= GAP_THRESHOLD


def test_a_basis_that_is_not_the_svd_is_stored(tmp_path):
    model = apply_loraxs(Toy(), 4, ["q_proj", "up"])
    with torch.no_grad():
        model.block.up.lora_A.copy_(torch.randn_like(model.block.up.lora_A))
    _randomise_R(model)
    save_adapter(model, tmp_path / "ad")
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["layers"]
    assert cfg["block.up"]["basis"] == "stored" and "not the SVD" in cfg["block.up"]["basis_reason"]
    assert cfg["block.q_proj"]["basis"] == "svd"
    fresh = load_adapter(Toy(), tmp_path / "ad")
    assert torch.equal(fresh(IDS), model(IDS))


# ------------------------------------------------------------------------------------ refusals
def _break(path, edit):
    cfg_path = path / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    edit(cfg)
    cfg_path.write_text(json.dumps(cfg))


def _set_tensor(path, key, fn):
    tensors = load_file(str(path / "adapter_model.safetensors"))
    key = "base_model.model." + key  # format_version 2 spells keys as PEFT does
    tensors[key] = fn(tensors[key])
    save_file(tensors, str(path / "adapter_model.safetensors"))


class _Evil:
    def __reduce__(self):
        return (print, ("this pickle runs code",))


BAD_INPUTS = {
    "malformed JSON": (lambda p: (p / "adapter_config.json").write_text('{"format": "loraxs'), AdapterError, "not valid JSON"),
    "missing key": (lambda p: _break(p, lambda c: c.pop("layers")), AdapterError, "missing key 'layers'"),
    "missing layer key": (lambda p: _break(p, lambda c: c["layers"]["block.up"].pop("pivots")), AdapterError,
                          r"layers\['block.up'\] is missing key 'pivots'"),
    "wrong R shape": (lambda p: _set_tensor(p, "block.down.lora_R", lambda t: torch.zeros(3, 3)), AdapterError,
                      r"block.down.lora_R has shape \(3, 3\), expected \(4, 4\)"),
    "NaN in R": (lambda p: _set_tensor(p, "block.up.lora_R", lambda t: t.index_fill(0, torch.tensor([1]), float("nan"))),
                 AdapterError, r"block.up.lora_R has 4 NaN/Inf entries \(layer block.up\)"),
    "Inf in R": (lambda p: _set_tensor(p, "block.v_proj.lora_R", lambda t: t.index_fill(0, torch.tensor([0]), float("inf"))),
                 AdapterError, r"layer block.v_proj"),
    "pickle instead of safetensors": (lambda p: (p / "adapter_model.safetensors").write_bytes(pickle.dumps(_Evil())),
                                      AdapterError, "not a readable safetensors file"),
    "another format": (lambda p: _break(p, lambda c: (c.clear(), c.update(peft_type="LORA", r=4))), AdapterError,
                       "is a PEFT adapter"),
    "another format name": (lambda p: _break(p, lambda c: c.update(format="something-else")), AdapterError,
                            "format is 'something-else'"),
    "future version": (lambda p: _break(p, lambda c: c.update(format_version=99)), AdapterError, "format_version 99"),
    "no weights file": (lambda p: (p / "adapter_model.safetensors").unlink(), AdapterError, "holds no adapter_model.safetensors"),
    "extra tensor": (lambda p: _set_tensor(p, "block.up.lora_R", lambda t: t) or
                     save_file({**load_file(str(p / "adapter_model.safetensors")), "junk": torch.zeros(1)},
                               str(p / "adapter_model.safetensors")), AdapterError, "not described"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
@pytest.mark.parametrize("onto", ["plain base", "loraxs model"])
def test_bad_files_are_refused_and_leave_the_model_unchanged(tmp_path, case, onto):
    _, path = _trained_toy(tmp_path)
    corrupt, exc, msg = BAD_INPUTS[case]
    corrupt(path)
    target = Toy() if onto == "plain base" else apply_loraxs(Toy(), 4, ["q_proj", "v_proj", "up", "down"], modules_to_save=["head"])
    snap = _snapshot(target)
    with pytest.raises(exc, match=msg):
        load_adapter(target, path)
    _assert_unchanged(target, snap)


def test_missing_path_and_file_path(tmp_path):
    model = Toy()
    snap = _snapshot(model)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(model, tmp_path / "nowhere")
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(AdapterError, match="is a file"):
        load_adapter(model, tmp_path / "f.json")
    with pytest.raises(AdapterError, match="holds no adapter_config.json"):
        load_adapter(model, tmp_path)
    _assert_unchanged(model, snap)


def test_other_base_rank_or_shape_refused_naming_the_layer(tmp_path):
    _, path = _trained_toy(tmp_path)
    other_base = Toy(seed=1)  # the same architecture, another initialisation
    snap = _snapshot(other_base)
    with pytest.raises(AdapterError, match=r"layer block.q_proj: this adapter was made for another base model"):
        load_adapter(other_base, path)
    _assert_unchanged(other_base, snap)
    # Atomicity past the first layer: only block.down differs, so the earlier layers were planned first.
    half = Toy()
    with torch.no_grad():
        half.block.down.weight.mul_(1.1)
    snap = _snapshot(half)
    with pytest.raises(AdapterError, match=r"layer block.down: .*another base model"):
        load_adapter(half, path)
    _assert_unchanged(half, snap)
    wrong_rank = apply_loraxs(Toy(), 2, ["q_proj"])
    snap = _snapshot(wrong_rank)
    with pytest.raises(AdapterError, match=r"layer block.q_proj: the model's LoRA-XS layer has rank 2, the adapter rank 4"):
        load_adapter(wrong_rank, path)
    _assert_unchanged(wrong_rank, snap)
    wide = Toy(hidden=48)
    snap = _snapshot(wide)
    with pytest.raises(AdapterError, match=r"layer block.up: the base weight is \(out, in\) = \(48, 24\).*\(32, 24\)"):
        load_adapter(wide, path)
    _assert_unchanged(wide, snap)


# ------------------------------------------------------------------------------------ fingerprint
def test_fingerprint_tolerates_dtype_and_tells_checkpoints_apart():
    w = Toy().block.up.weight.detach()
    fp = fingerprint(w)
    assert fp["shape"] == [32, 24] and len(fp["samples"]) == 32 and len(fp["sigma"]) == 8
    assert len({i % 24 for i, _ in fp["samples"]}) > 8, "samples spread over columns"
    json.dumps(fp)  # JSON-ready
    assert fingerprint_mismatch(fp, w) is None
    assert fingerprint_mismatch(fp, w.bfloat16()) is None
    assert fingerprint_mismatch(fp, w.half()) is None
    assert fingerprint_mismatch(fp, w.double()) is None
    assert fingerprint_mismatch(fp, Toy(seed=3).block.up.weight.detach()) is not None
    # Permuted rows keep the norm and every singular value: only the sampled entries tell.
    assert "entry" in fingerprint_mismatch(fp, w[torch.randperm(32, generator=torch.Generator().manual_seed(0))])
    g = torch.Generator().manual_seed(0)
    assert fingerprint_mismatch(fp, w * (1 + 0.03 * torch.randn(w.shape, generator=g))) is not None
    assert "shape" in fingerprint_mismatch(fp, w[:, :20])


# ------------------------------------------------------------------------------------ the real model
def test_minilm_train_save_fresh_base_load_same_outputs(tmp_path):
    model = minilm(head_seed=1)
    apply_loraxs(model, 8, ["query", "value"], scaling=2.0, modules_to_save=["classifier"])
    ids, labels = token_ids(8, 12), torch.tensor([0, 1] * 4)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        F.cross_entropy(model(input_ids=ids).logits, labels).backward()
        opt.step()
        opt.zero_grad()
    assert model.bert.encoder.layer[0].attention.self.query.lora_R.abs().max() > 1e-3, "R trained"
    save_adapter(model, tmp_path / "ad")
    size = (tmp_path / "ad" / "adapter_model.safetensors").stat().st_size
    # 12 R's of 8×8 fp32 (3 KiB), the classifier (384·2+2 fp32, 3 KiB), one stored basis (2·384·8 fp32, 24 KiB).
    assert size < 40_000, size
    cfg = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert cfg["layers"]["bert.encoder.layer.1.attention.self.query"]["basis"] == "stored"  # gap 1.5e-3
    fresh = minilm(head_seed=2)
    load_adapter(fresh, tmp_path / "ad")
    (h, y), (h2, y2) = outputs(model, ids), outputs(fresh, ids)
    assert torch.equal(h, h2) and torch.equal(y, y2)


def test_minilm_stored_pivots_keep_the_signs_under_bf16():
    """encoder.layer.1.attention.self.query at rank 8: rounding W to bf16 swaps which entry of one
    U column is largest, so the default sign rule flips that pair; the pivots recorded from the fp32
    run keep A·R·B within a few percent (measured 79 % vs 1.8 %)."""
    from loraxs_kernels.modules.svd_init import svd_basis

    w = minilm().bert.encoder.layer[1].attention.self.query.weight.detach()
    R = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))
    ref = svd_basis(w, 8)
    arb = lambda b: b.A.double() @ R.double() @ b.B.double()
    rel = lambda b: ((arb(b) - arb(ref)).norm() / arb(ref).norm()).item()
    w16 = w.bfloat16().float()  # the SVD runs in fp32 either way
    assert rel(svd_basis(w16, 8)) > 0.5
    assert rel(svd_basis(w16, 8, pivots=ref.pivots)) < 0.05


def test_minilm_adapter_from_fp32_loads_into_bf16_base(tmp_path):
    """A larger R than a few steps give, so the adapter moves the outputs by far more than bf16's error."""
    model = minilm(head_seed=1)
    apply_loraxs(model, 8, ["query", "value"], scaling=2.0, modules_to_save=["classifier"])
    _randomise_R(model, std=0.05)
    save_adapter(model, tmp_path / "ad")
    ids = token_ids(4, 12)
    h, _ = outputs(model, ids)
    base_h, _ = outputs(minilm(), ids)
    bf16 = minilm(head_seed=2).to(torch.bfloat16)
    load_adapter(bf16, tmp_path / "ad")
    layer = bf16.bert.encoder.layer[1].attention.self.query
    assert layer.weight.dtype == torch.bfloat16 and layer.lora_R.dtype == torch.float32
    h16, _ = outputs(bf16, ids)
    plain16, _ = outputs(minilm().to(torch.bfloat16), ids)
    # The bound is measured on the running machine, not taken from one machine's error: bf16's rounding
    # of this model differs between CPUs (AVX-512 or not, AMD or Intel; on an AMD EPYC without AVX-512 the
    # error was ~10 % of the adapter's effect, on this project's Intel Xeon far less). The loaded bf16
    # model must be as close to the fp32 adapted run as the bf16 base is to the fp32 base (base_err: this
    # machine's bf16 error on the same model and inputs, with slack for the adapter's own rounding).
    err, base_err = (h16 - h).abs().max().item(), (plain16 - base_h).abs().max().item()
    tol = 1.5 * base_err + 1e-3
    assert err <= tol, (err, base_err)
    # The same bound rejects what a lost adapter would give, on this machine: the bf16 model without the
    # adapter (a dropped R), and with the adapter at twice its scaling (a doubled scaling).
    dropped = (plain16 - h).abs().max().item()
    assert dropped > tol, (dropped, tol)
    for _, layer in bf16.named_modules():
        if hasattr(layer, "lora_R"):
            layer.scaling *= 2
    doubled = (outputs(bf16, ids)[0] - h).abs().max().item()
    assert doubled > tol, (doubled, tol)


def test_minilm_fingerprint_refuses_another_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = apply_loraxs(minilm(), 4, ["query"])
    save_adapter(model, tmp_path / "ad")
    torch.manual_seed(5)
    other = transformers.AutoModelForSequenceClassification.from_config(minilm().config).eval()  # same architecture
    snap = _snapshot(other)
    with pytest.raises(AdapterError, match=r"layer bert.encoder.layer.0.attention.self.query: this adapter was made for another base"):
        load_adapter(other, tmp_path / "ad")
    _assert_unchanged(other, snap)
