"""Adapter files and bank slots (issue 11): save_adapter(model, path, slot=i) writes adapter i of every
MultiLoRAXSLinear as an ordinary single-adapter file, load_adapter(model, path, slot=i) loads one into
slot i in place, and merge_loraxs(model, adapter=i) turns the banks into the plain layers rows with
id i compute. Toy models for the format, the errors and the in-place guarantees; all-MiniLM-L6-v2
for a round trip on a real model."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import loraxs_kernels as lk
from common import assert_close
from loraxs_kernels import FusedLoRAXSLinear, MultiLoRAXSLinear, apply_loraxs, load_adapter, merge_loraxs, save_adapter
from loraxs_kernels.adapters import AdapterError
from loraxs_kernels.adapters.slots import _svd_residual

LAYERS = ["block.q_proj", "block.v_proj", "block.up", "block.down"]


class Toy(nn.Module):
    def __init__(self, d=24, hidden=32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.block = nn.Module()
        self.block.q_proj, self.block.v_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.block.up, self.block.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        h = x + self.block.q_proj(x) * torch.sigmoid(self.block.v_proj(x))
        h = h + self.block.down(F.gelu(self.block.up(h)))
        return self.head(h)


X = torch.randn(5, 7, 24, generator=torch.Generator().manual_seed(3))


def fused_toy(seed=1, std=0.3, scaling=1.5, targets=("q_proj", "v_proj", "up", "down")):
    model = apply_loraxs(Toy(), 4, list(targets), scaling=scaling)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FusedLoRAXSLinear):
                m.lora_R.copy_(torch.randn(m.lora_R.shape, generator=g) * std)
    return model


def multi_toy(n=4, std=0.3, scaling=1.5, targets=("q_proj", "v_proj", "up", "down"), **kw):
    model = apply_loraxs(Toy(), 4, list(targets), scaling=scaling, num_adapters=n, **kw)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MultiLoRAXSLinear):
                m.lora_R.copy_(torch.randn(m.lora_R.shape, generator=g) * std)
    return model


def banks(model):
    return {p: m for p, m in model.named_modules() if isinstance(m, MultiLoRAXSLinear)}


def rows_with(model, ids, x=X):
    with torch.no_grad(), lk.use_adapters(model, ids):
        return model(x)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snap):
    now = model.state_dict()
    assert now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)


# ------------------------------------------------------------------------------------------ save
def test_slot_file_is_an_ordinary_adapter_file(tmp_path):
    """Adapter 2 of every bank, saved, loads into a plain base (FusedLoRAXSLinear layers) and gives
    what rows with id 2 give; the file has the same layout as one saved from a FusedLoRAXSLinear model."""
    model = multi_toy()
    save_adapter(model, tmp_path / "slot2", slot=2)
    cfg = json.loads((tmp_path / "slot2" / "adapter_config.json").read_text())
    tensors = {k.removeprefix("base_model.model."): v
               for k, v in load_file(str(tmp_path / "slot2" / "adapter_model.safetensors")).items()}
    assert cfg["target_modules"] == LAYERS and cfg["rank"] == 4 and cfg["scaling"] == 1.5
    assert all(cfg["layers"][p]["basis"] == "svd" for p in LAYERS)
    assert set(tensors) == {f"{p}.lora_R" for p in LAYERS}
    for p, m in banks(model).items():
        assert torch.equal(tensors[f"{p}.lora_R"], m.lora_R[2].detach())
    fused_cfg = json.loads((save_adapter(fused_toy(), tmp_path / "fused") / "adapter_config.json").read_text())
    assert set(fused_cfg) == set(cfg) and all(set(fused_cfg["layers"][p]) == set(cfg["layers"][p]) for p in LAYERS)

    plain = load_adapter(Toy(), tmp_path / "slot2")
    assert all(isinstance(plain.get_submodule(p), FusedLoRAXSLinear) for p in LAYERS)
    with torch.no_grad():
        assert_close(plain(X), rows_with(model, torch.full((5,), 2)), torch.float32, "slot 2 file on a plain base")
        # The check has teeth: adapter 1's rows differ from the file's model by far more than TOL.
        with pytest.raises(AssertionError, match="max error"):
            assert_close(plain(X), rows_with(model, torch.full((5,), 1)), torch.float32, "planted: slot 1")


def test_save_errors(tmp_path):
    model = multi_toy(n=3)
    with pytest.raises(IndexError, match=r"slot 3 is out of range: block.q_proj holds 3 adapters \(slots 0 to 2\)"):
        save_adapter(model, tmp_path / "a", slot=3)
    with pytest.raises(IndexError, match="slot -1 is out of range"):
        save_adapter(model, tmp_path / "a", slot=-1)
    with pytest.raises(TypeError, match="slot must be an int"):
        save_adapter(model, tmp_path / "a", slot=1.0)
    with pytest.raises(ValueError, match="MultiLoRAXSLinear banks of 3 adapters: name the one to save with slot=i"):
        save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match="slot=0 picks an adapter of MultiLoRAXSLinear banks, but the model has none"):
        save_adapter(fused_toy(), tmp_path / "a", slot=0)
    with torch.no_grad():
        banks(model)["block.up"].lora_R[1, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"block.up.lora_R\[1\] has NaN"):
        save_adapter(model, tmp_path / "a", slot=1)
    assert (save_adapter(model, tmp_path / "a", slot=0) / "adapter_model.safetensors").is_file()  # the other slots still save


# ------------------------------------------------------------------------------------------ load
def test_file_into_a_slot_in_place(tmp_path):
    """A FusedLoRAXSLinear model's adapter goes into slot 1: the banks keep their storage, the other
    slots stay bit for bit, slot 1 holds the file's R exactly, and rows with id 1 equal the single model."""
    single = fused_toy()
    save_adapter(single, tmp_path / "ad")
    model = multi_toy()
    before = snapshot(model)
    ptrs = {p: m.lora_R.data_ptr() for p, m in banks(model).items()}
    other_rows = rows_with(model, torch.tensor([0, 2, 3, -1, 0]))
    assert load_adapter(model, tmp_path / "ad", slot=1) is model
    for p, m in banks(model).items():
        assert m.lora_R.data_ptr() == ptrs[p]
        assert torch.equal(m.lora_R[1], single.get_submodule(p).lora_R)
        for k in (0, 2, 3):
            assert torch.equal(m.lora_R[k], before[f"{p}.lora_R"][k])
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if not k.endswith("lora_R"))
    with torch.no_grad():
        assert_close(rows_with(model, torch.full((5,), 1)), single(X), torch.float32, "rows with id 1")
    assert torch.equal(rows_with(model, torch.tensor([0, 2, 3, -1, 0])), other_rows)
    mixed = rows_with(model, torch.tensor([1, 2, 1, -1, 0]))
    with torch.no_grad():
        assert_close(mixed[[0, 2]], single(X)[[0, 2]], torch.float32, "id-1 rows of a mixed batch")
    assert_close(mixed[[1, 3, 4]], other_rows[[1, 3, 4]], torch.float32, "other rows of a mixed batch")
    # The round trip back: slot 1 saved again is the same adapter file.
    save_adapter(model, tmp_path / "back", slot=1)
    a, b = (load_file(str(tmp_path / d / "adapter_model.safetensors")) for d in ("ad", "back"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_banks_the_file_does_not_name_get_zeros(tmp_path):
    single = fused_toy(targets=("q_proj", "up"))
    save_adapter(single, tmp_path / "ad")
    model = multi_toy()
    load_adapter(model, tmp_path / "ad", slot=3)
    for p in ("block.v_proj", "block.down"):
        assert torch.equal(banks(model)[p].lora_R[3], torch.zeros(4, 4))
        assert banks(model)[p].lora_R[2].abs().sum() > 0
    with torch.no_grad():
        assert_close(rows_with(model, torch.full((5,), 3)), single(X), torch.float32, "rows with id 3")


def _flip_pair(layer, j):
    with torch.no_grad():
        layer.lora_A[:, j].neg_()
        layer.lora_B[j].neg_()


@pytest.mark.parametrize("how", ["stored-basis", "pivots"])
def test_a_sign_flipped_basis_loads_exactly(tmp_path, how):
    """A file whose singular pair j has the other sign than the bank's: its R's row and column j are
    negated on the way in, so the rows compute the file's adapter (A R B with the file's signs)."""
    single = fused_toy()
    layer = single.block.up
    j = 1
    if how == "stored-basis":  # the single model's pair j flipped: its basis is no longer canonical, so it is stored
        _flip_pair(layer, j)
        save_adapter(single, tmp_path / "ad")
        assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["layers"]["block.up"]["basis"] == "stored"
    else:  # the file's pivot for pair j moved to an entry of the other sign (what rounding W to bf16 can do)
        save_adapter(single, tmp_path / "ad")
        cfg_path = tmp_path / "ad" / "adapter_config.json"
        cfg = json.loads(cfg_path.read_text())
        col = layer.lora_A[:, j]
        cfg["layers"]["block.up"]["pivots"][j] = int(torch.where(col < 0, col.abs(), 0).argmax())
        cfg_path.write_text(json.dumps(cfg))
        single = load_adapter(Toy(), tmp_path / "ad")  # the file's meaning: the basis with those pivots
        assert torch.allclose(single.block.up.lora_A[:, j], -layer.lora_A[:, j], atol=1e-6)
    model = multi_toy()
    load_adapter(model, tmp_path / "ad", slot=0)
    R_file, R_bank = single.block.up.lora_R, model.block.up.lora_R[0]
    assert torch.equal(R_bank[j, j], R_file[j, j]) and torch.equal(R_bank[j, 0], -R_file[j, 0])
    assert torch.equal(model.block.q_proj.lora_R[0], single.block.q_proj.lora_R)
    with torch.no_grad():
        want = single(X)
        assert_close(rows_with(model, torch.full((5,), 0)), want, torch.float32, f"{how}: rows with id 0")
        # Planted fault: the flip ignored (R copied as is) is caught.
        model.block.up.lora_R[0].copy_(R_file)
        with pytest.raises(AssertionError, match="max error"):
            assert_close(rows_with(model, torch.full((5,), 0)), want, torch.float32, "planted: flip ignored")


def _file(tmp_path, name="ad", **kw):
    return save_adapter(fused_toy(**kw), tmp_path / name)


LOAD_ERRORS = {
    "slot out of range": (lambda p, m: load_adapter(m, p, slot=4), IndexError,
                          r"slot 4 is out of range: block.q_proj holds 4 adapters \(slots 0 to 3\)"),
    "slot not an int": (lambda p, m: load_adapter(m, p, slot="1"), TypeError, "slot must be an int"),
    "no banks": (lambda p, m: load_adapter(Toy(), p, slot=0), ValueError,
                 r"slot=0\): the model has no MultiLoRAXSLinear layers .* leave slot=None"),
    "slot=None into banks": (lambda p, m: load_adapter(m, p), AdapterError,
                             "layer block.q_proj: the model's module is a MultiLoRAXSLinear bank of 4 adapters: "
                             r"load the file into one of its slots with load_adapter\(model, path, slot=i\)"),
    "scaling": (lambda p, m: load_adapter(multi_toy(scaling=0.5), p, slot=0), AdapterError,
                r"layer block.q_proj: the adapter's scaling is 1.5, the bank's 0.5, and every slot of a bank shares one "
                r"scaling. Build the banks with apply_loraxs\(..., scaling=1.5\), or fold the ratio into R"),
    "rank": (lambda p, m: load_adapter(apply_loraxs(Toy(), 3, ["q_proj", "v_proj", "up", "down"], scaling=1.5,
                                                    num_adapters=2), p, slot=0),
             AdapterError, "layer block.q_proj: the model's bank has rank 3, the adapter rank 4"),
    "layer not a bank": (lambda p, m: load_adapter(multi_toy(targets=("q_proj", "v_proj", "up")), p, slot=0),
                         AdapterError, "layer block.down: the model's module is a Linear, not a MultiLoRAXSLinear"),
    "another base": (lambda p, m: load_adapter(apply_loraxs(Toy(seed=5), 4, ["q_proj", "v_proj", "up", "down"],
                                                            scaling=1.5, num_adapters=2), p, slot=0),
                     AdapterError, "layer block.q_proj: this adapter was made for another base model"),
}


@pytest.mark.parametrize("case", list(LOAD_ERRORS))
def test_load_errors_leave_the_banks_unchanged(tmp_path, case):
    path = _file(tmp_path)
    model = multi_toy()
    snap = snapshot(model)
    make, exc, match = LOAD_ERRORS[case]
    with pytest.raises(exc, match=match):
        make(path, model)
    assert_unchanged(model, snap)


def test_a_bank_whose_basis_is_not_the_svd_refuses_an_svd_file(tmp_path):
    path = _file(tmp_path)
    model = multi_toy()
    Q, _ = torch.linalg.qr(torch.randn(24, 4, generator=torch.Generator().manual_seed(0)))
    with torch.no_grad():  # a random orthonormal basis with the SVD's column norms: only the subspace differs
        model.block.v_proj.lora_A.copy_(Q * model.block.v_proj.lora_A.norm(dim=0))
    snap = snapshot(model)
    with pytest.raises(AdapterError, match=r"layer block.v_proj: the adapter's basis is the SVD of W, the bank's A and B "
                                           r"are not \(residual [0-9.]+ > 0.0001"):
        load_adapter(model, path, slot=0)
    assert_unchanged(model, snap)


def test_a_stored_basis_that_is_not_the_banks_is_refused(tmp_path):
    single = fused_toy()
    with torch.no_grad():
        single.block.down.lora_A.add_(0.05 * torch.randn(single.block.down.lora_A.shape))
    save_adapter(single, tmp_path / "ad")
    model = multi_toy()
    snap = snapshot(model)
    with pytest.raises(AdapterError, match=r"layer block.down: the adapter's stored basis \(A, B\) differs from the bank's "
                                           r"by [0-9.e-]+ \(relative, after sign flips; at most 0.0001 allowed\)"):
        load_adapter(model, tmp_path / "ad", slot=0)
    assert_unchanged(model, snap)


def test_modules_to_save_must_match_the_model(tmp_path):
    single = apply_loraxs(Toy(), 4, ["q_proj", "up"], scaling=1.5, modules_to_save=["head"])
    save_adapter(single, tmp_path / "ad")
    model = apply_loraxs(Toy(), 4, ["q_proj", "up"], scaling=1.5, num_adapters=2)
    load_adapter(model, tmp_path / "ad", slot=1)  # the same head: nothing to load
    with torch.no_grad():
        single.head.weight.add_(0.1)
    save_adapter(single, tmp_path / "ad2")
    snap = snapshot(model)
    with pytest.raises(AdapterError, match="modules_to_save head: the adapter holds its own copy of this module, which "
                                           r"differs from the model's; .*save_adapter\(..., modules_to_save=\[\]\)"):
        load_adapter(model, tmp_path / "ad2", slot=0)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_svd_residual_tolerance(dtype):
    """The bank check's yardstick (_DERIVABLE_TOL of the weight's dtype): the SVD basis passes in every
    dtype; a basis turned by 1 % inside its own span (planted) fails in fp32 and fp64, a random one in all."""
    from loraxs_kernels.adapters.slots import _DERIVABLE_TOL
    from loraxs_kernels.modules.svd_init import svd_basis

    w = nn.Linear(96, 64).weight.detach().to(dtype)
    b = svd_basis(w, 8)
    tol = _DERIVABLE_TOL[dtype]
    assert _svd_residual(w, b.A, b.B) <= tol
    c, s = math.cos(0.01), math.sin(0.01)
    G = torch.eye(8, dtype=torch.float64)
    G[0, 0], G[0, 1], G[1, 0], G[1, 1] = c, -s, s, c  # mixes pairs 1 and 2: A G, Gᵀ B is still an exact factorisation
    turned = _svd_residual(w, (b.A.double() @ G).to(dtype), (G.t() @ b.B.double()).to(dtype))
    if dtype in (torch.float64, torch.float32):
        assert turned > tol, turned
    Q, _ = torch.linalg.qr(torch.randn(96, 8, dtype=torch.float64))
    assert _svd_residual(w, (Q * b.A.double().norm(dim=0)).to(dtype), b.B) > 0.5


# ------------------------------------------------------------------------------------------ merge
class WithShared(nn.Module):
    """A Conv1D (GPT-2's layer, weight in×out) and one nn.Linear used twice, under two parents."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(4)
        self.c_attn = Conv1D(24, 24)
        self.a, self.b = nn.Module(), nn.Module()
        self.a.shared = self.b.shared = nn.Linear(24, 24)

    def forward(self, x):
        return self.b.shared(F.gelu(self.a.shared(self.c_attn(x))))


@pytest.mark.parametrize("adapter", [0, 2, -1])
def test_merge_adapter_equals_its_rows(adapter):
    pytest.importorskip("transformers")
    model = WithShared()
    base = WithShared()
    apply_loraxs(model, 4, ["c_attn", "shared"], scaling=0.7, num_adapters=3)
    assert model.a.shared is model.b.shared
    with torch.no_grad():
        for m in banks(model).values():
            m.lora_R.normal_(0, 0.3)
    want = rows_with(model, torch.full((5,), adapter))
    other = rows_with(model, torch.full((5,), (adapter + 1) % 3))
    merged = merge_loraxs(model, adapter=adapter)
    assert type(merged.c_attn).__name__ == "Conv1D" and type(merged.a.shared) is nn.Linear
    assert merged.a.shared is merged.b.shared, "a shared bank stays one shared layer"
    assert not any(isinstance(m, MultiLoRAXSLinear) for m in merged.modules())
    with torch.no_grad():
        got = merged(X)
        assert_close(got, want, torch.float32, f"merged adapter {adapter}")
        if adapter == -1:
            assert_close(got, base(X), torch.float32, "adapter -1: the base model")
        with pytest.raises(AssertionError, match="max error"):  # planted: the neighbour's adapter
            assert_close(other, got, torch.float32, "planted: neighbour")


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_merge_dtypes(dtype):
    model = multi_toy(n=2).to(dtype)
    want = rows_with(model, torch.full((5,), 1), X.to(dtype))
    merged = merge_loraxs(model, adapter=1)
    assert merged.block.up.weight.dtype == dtype
    with torch.no_grad():
        assert_close(merged(X.to(dtype)), want, dtype, f"{dtype} merged")


def test_merge_errors_leave_the_model_unchanged():
    model = multi_toy(n=3)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"MultiLoRAXSLinear banks of 3 adapters: merge_loraxs\(model, adapter=i\)"):
        merge_loraxs(model)
    with pytest.raises(IndexError, match=r"adapter 3 is out of range: a bank \(q_proj\) holds 3 adapters"):
        merge_loraxs(model, adapter=3)
    with pytest.raises(IndexError, match="adapter -2 is out of range"):
        merge_loraxs(model, adapter=-2)
    with pytest.raises(TypeError, match="adapter must be an int"):
        merge_loraxs(model, adapter=True)
    assert all(isinstance(model.get_submodule(p), MultiLoRAXSLinear) for p in LAYERS)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="the model has no MultiLoRAXSLinear layers"):
        merge_loraxs(fused_toy(), adapter=0)


# ------------------------------------------------------------------------------------------ the real model
def test_minilm_fused_adapter_into_a_slot(tmp_path):
    """all-MiniLM-L6-v2: an adapter on query and value (a FusedLoRAXSLinear model, R ~ N(0, 0.05²)) saved,
    loaded into slot 2 of banks on query, key and value; rows with id 2 equal the single model, rows of
    the other slots don't, and merge_loraxs(adapter=2) gives the same model as plain layers."""
    from hf_models import minilm, outputs, token_ids

    single = apply_loraxs(minilm(head_seed=1), 8, ["query", "value"], scaling=2.0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in single.modules():
            if isinstance(m, FusedLoRAXSLinear):
                m.lora_R.copy_(torch.randn(8, 8, generator=g) * 0.05)
    save_adapter(single, tmp_path / "ad")
    model = apply_loraxs(minilm(head_seed=1), 8, ["query", "key", "value"], scaling=2.0, num_adapters=3)
    load_adapter(model, tmp_path / "ad", slot=2)
    ids = token_ids(4, 12)
    h_single, y_single = outputs(single, ids)
    with lk.use_adapters(model, torch.tensor([2, 2, 2, 2])):
        h_multi, y_multi = outputs(model, ids)
    with lk.use_adapters(model, torch.tensor([0, 1, 0, 1])):
        h_other, _ = outputs(model, ids)
    assert_close(h_multi, h_single, torch.float32, "last hidden state, slot 2")
    assert_close(y_multi, y_single, torch.float32, "logits, slot 2")
    assert (h_other - h_single).abs().max() > 100 * 1e-5 * h_single.abs().max()
    h_merged, _ = outputs(merge_loraxs(model, adapter=2), ids)
    assert_close(h_merged, h_single, torch.float32, "merged slot 2")
