"""FusedLoRAXSLinear (SVD initialisation, merge, state dict, training) and apply_loraxs/merge_loraxs."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import loraxs_kernels
from common import assert_close, assert_matches_reference, cpu_backends
from loraxs_kernels import FusedLoRAXSLinear, apply_loraxs, merge_loraxs

F64 = torch.float64
BACKENDS = cpu_backends()


def _linear(in_f, out_f, dtype=torch.float32, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def _with_random_R(layer, std=0.3, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_R.copy_(torch.randn(layer.lora_R.shape, generator=g) * std)
    return layer


# ------------------------------------------------------------------------------------ SVD init
@pytest.mark.parametrize("in_f,out_f,rank", [(48, 40, 8), (40, 48, 8), (32, 32, 32), (20, 7, 1)])
def test_svd_is_the_best_rank_r_approximation(in_f, out_f, rank):
    lin = _linear(in_f, out_f, dtype=F64)
    layer = FusedLoRAXSLinear.from_linear(lin, rank)
    A, B, Wt = layer.lora_A, layer.lora_B, lin.weight.detach().t()
    assert A.shape == (in_f, rank) and B.shape == (rank, out_f) and A.dtype == B.dtype == F64
    S = torch.linalg.svdvals(Wt)
    residual = Wt - A @ B
    tail = S[rank:]
    # Eckart–Young: the Frobenius error is the root of the tail's squares, the spectral error σ_{r+1}.
    assert torch.allclose(torch.linalg.matrix_norm(residual), tail.square().sum().sqrt(), rtol=1e-10, atol=1e-12)
    spectral = torch.linalg.matrix_norm(residual, ord=2)
    assert torch.allclose(spectral, tail[0] if len(tail) else torch.zeros((), dtype=F64), rtol=1e-10, atol=1e-12)
    # Σ on A: A's column norms are σ_1 ≥ … ≥ σ_r; B's rows are orthonormal.
    assert torch.allclose(A.norm(dim=0), S[:rank], rtol=1e-10)
    assert torch.allclose(B @ B.t(), torch.eye(rank, dtype=F64), atol=1e-12)
    # And A's columns are orthogonal (U_r Σ_r): AᵀA = Σ².
    assert torch.allclose(A.t() @ A, torch.diag(S[:rank] ** 2), atol=1e-10 * S[0] ** 2)


def test_svd_fp32_layer():
    lin = _linear(64, 48)
    layer = FusedLoRAXSLinear.from_linear(lin, 12)
    Wt = lin.weight.detach().double().t()
    S = torch.linalg.svdvals(Wt)
    err = torch.linalg.matrix_norm(Wt - layer.lora_A.double() @ layer.lora_B.double())
    # fp32 SVD: the factors carry ~1e-7 relative error of ‖W‖, well inside 1e-5 of the tail norm.
    assert abs(err - S[12:].square().sum().sqrt()) <= 1e-5 * S[0]
    assert torch.allclose(layer.lora_B.double() @ layer.lora_B.double().t(), torch.eye(12, dtype=F64), atol=1e-5)


@pytest.mark.parametrize("in_f,out_f,rank", [(48, 40, 8), (16, 64, 16)])
def test_canonical_signs(in_f, out_f, rank):
    layer = FusedLoRAXSLinear.from_linear(_linear(in_f, out_f, dtype=F64), rank)
    U = layer.lora_A / layer.lora_A.norm(dim=0)
    pivot = U.abs().argmax(dim=0)
    assert (U[pivot, torch.arange(rank)] > 0).all(), "the largest-magnitude entry of each U_r column must be positive"


def test_signs_do_not_depend_on_W_sign_flips():
    """Wᵀ and -Wᵀ have the same left singular vectors up to sign; with canonical signs A is the same
    for both and the sign moves to B."""
    lin = _linear(24, 20, dtype=F64)
    neg = copy.deepcopy(lin)
    with torch.no_grad():
        neg.weight.neg_()
    a, b = FusedLoRAXSLinear.from_linear(lin, 5), FusedLoRAXSLinear.from_linear(neg, 5)
    assert torch.allclose(a.lora_A, b.lora_A, atol=1e-12), "U_r is canonical: the same for W and -W"
    assert torch.allclose(a.lora_B, -b.lora_B, atol=1e-12)


def test_svd_deterministic():
    lin = _linear(96, 80)
    one, two = FusedLoRAXSLinear.from_linear(lin, 16), FusedLoRAXSLinear.from_linear(lin, 16)
    fresh_lin = nn.Linear(96, 80)
    fresh_lin.load_state_dict(copy.deepcopy(lin.state_dict()))  # the same W in new memory
    three = FusedLoRAXSLinear.from_linear(fresh_lin, 16)
    for other in (two, three):
        assert torch.equal(one.lora_A, other.lora_A) and torch.equal(one.lora_B, other.lora_B)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_precision_weights(dtype):
    lin = _linear(64, 48).to(dtype)
    layer = FusedLoRAXSLinear.from_linear(lin, 8)
    assert layer.lora_A.dtype == layer.lora_B.dtype == layer.weight.dtype == dtype
    # The SVD ran in fp32 on the (exact) fp32 copy of the half weight, then was cast back.
    lin32 = nn.Linear(64, 48)
    with torch.no_grad():
        lin32.weight.copy_(lin.weight.float())
        lin32.bias.copy_(lin.bias.float())
    ref = FusedLoRAXSLinear.from_linear(lin32, 8)
    assert torch.equal(layer.lora_A, ref.lora_A.to(dtype)) and torch.equal(layer.lora_B, ref.lora_B.to(dtype))
    x = torch.randn(5, 64, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and torch.isfinite(y).all()


def test_lora_R_init_normal_1e5():
    torch.manual_seed(0)
    layer = FusedLoRAXSLinear(80, 72, 64)
    R = layer.lora_R.detach().double()
    # 4096 samples: the sample std has a relative spread of ~1/sqrt(2·4096) ≈ 1.1 %; the mean ~1.6e-7.
    assert abs(R.std().item() - 1e-5) < 0.1e-5
    assert abs(R.mean().item()) < 1e-6
    assert layer.lora_R.dtype == torch.float32


def test_r_init_zeros_is_the_base_layer():
    lin = _linear(48, 40)
    layer = FusedLoRAXSLinear.from_linear(lin, 8, r_init="zeros")
    assert torch.equal(layer.lora_R, torch.zeros(8, 8))
    for lead in [(3,), (300,), (2, 7)]:  # both schedules, 3-D x
        x = torch.randn(*lead, 48)
        assert torch.equal(layer(x), lin(x)), lead
    with pytest.raises(ValueError, match="r_init"):
        FusedLoRAXSLinear(8, 8, 2, r_init="uniform")


def test_from_linear_copies_and_freezes():
    lin = _linear(24, 20)
    layer = FusedLoRAXSLinear.from_linear(lin, 4, scaling=0.5)
    assert torch.equal(layer.weight, lin.weight) and torch.equal(layer.bias, lin.bias)
    assert layer.weight.data_ptr() != lin.weight.data_ptr(), "the layer holds its own copy"
    assert lin.weight.requires_grad, "the source linear is not modified"
    assert layer.scaling == 0.5 and layer.rank == 4
    no_bias = FusedLoRAXSLinear.from_linear(_linear(24, 20, bias=False), 4)
    assert no_bias.bias is None
    assert "weight" in dict(no_bias.named_parameters()) and "bias" not in no_bias.state_dict()


def test_only_lora_R_trains():
    layer = FusedLoRAXSLinear(24, 20, 4)
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_R"]
    assert dict(layer.named_buffers()).keys() == {"lora_A", "lora_B"}
    x = torch.randn(6, 24, requires_grad=True)
    layer(x).sum().backward()
    assert layer.lora_R.grad is not None and layer.weight.grad is None and layer.bias.grad is None


@pytest.mark.parametrize("rank", [0, 21, 25])
def test_rank_out_of_range(rank):
    with pytest.raises(ValueError, match=rf"(?=.*\brank={rank}\b)(?=.*in_features=24, out_features=20)"):
        FusedLoRAXSLinear(24, 20, rank)
    with pytest.raises(ValueError, match=r"min\(in_features, out_features\) = 20"):
        FusedLoRAXSLinear(24, 20, rank)
    with pytest.raises(ValueError, match=rf"rank={rank}"):
        FusedLoRAXSLinear.from_linear(_linear(24, 20), rank)


# ----------------------------------------------------------------------------- forward / merge
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_forward_is_the_reference(dtype, backend):
    layer = _with_random_R(FusedLoRAXSLinear.from_linear(_linear(32, 24, dtype=dtype), 6, scaling=1.5, backend=backend))
    x = torch.randn(2, 5, 32, dtype=dtype)
    assert_matches_reference(layer(x), None, None, (x, layer.weight, layer.bias, layer.lora_A, layer.lora_R,
                                                    layer.lora_B), 1.5, dtype, "module forward")


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_merge(dtype, bias):
    layer = _with_random_R(FusedLoRAXSLinear.from_linear(_linear(32, 24, dtype=dtype, bias=bias), 6, scaling=-0.7))
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    merged = layer.merge()
    assert type(merged) is nn.Linear and merged.weight.dtype == dtype and (merged.bias is None) == (not bias)
    x = torch.randn(7, 32, dtype=dtype)
    assert_close(merged(x), layer(x), dtype, "merged output")
    after = layer.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert merged.weight.data_ptr() != layer.weight.data_ptr()


def test_merge_half_precision():
    layer = _with_random_R(FusedLoRAXSLinear.from_linear(_linear(32, 24).to(torch.bfloat16), 6,
                                                         r_dtype=torch.float32))
    merged = layer.merge()
    assert merged.weight.dtype == torch.bfloat16
    x = torch.randn(7, 32, dtype=torch.bfloat16)
    assert_close(merged(x), layer(x).double(), torch.bfloat16, "merged bf16 output")


def test_state_dict_round_trip():
    layer = _with_random_R(FusedLoRAXSLinear.from_linear(_linear(32, 24), 6, scaling=2.0))
    sd = layer.state_dict()
    assert set(sd) == {"weight", "bias", "lora_A", "lora_B", "lora_R"}
    assert sd["lora_A"].shape == (32, 6) and sd["lora_B"].shape == (6, 24) and sd["lora_R"].shape == (6, 6)
    torch.manual_seed(123)
    fresh = FusedLoRAXSLinear(32, 24, 6, scaling=2.0)
    x = torch.randn(5, 32)
    assert not torch.equal(fresh(x), layer(x))
    fresh.load_state_dict(sd)
    assert torch.equal(fresh(x), layer(x))
    assert [n for n, p in fresh.named_parameters() if p.requires_grad] == ["lora_R"]


# ------------------------------------------------------------------------------------ training
def test_fp32_master_R_with_bf16_layer_trains():
    layer = FusedLoRAXSLinear.from_linear(_linear(32, 24).to(torch.bfloat16), 6, r_dtype=torch.float32)
    assert layer.lora_R.dtype == torch.float32 and layer.weight.dtype == torch.bfloat16
    x = torch.randn(9, 32, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert layer.lora_R.grad.dtype == torch.float32 and layer.lora_R.grad.abs().sum() > 0
    R0 = layer.lora_R.detach().clone()
    torch.optim.SGD([layer.lora_R], lr=1e-2).step()
    assert not torch.equal(layer.lora_R, R0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_optimizer_step_changes_output(backend):
    layer = FusedLoRAXSLinear.from_linear(_linear(32, 24), 6, backend=backend)
    x = torch.randn(9, 32)
    y0 = layer(x).detach()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    (layer(x) - 1).square().mean().backward()
    opt.step()
    y1 = layer(x).detach()
    assert (y1 - y0).abs().max() > 1e-4
    assert torch.equal(layer.weight, _linear(32, 24).weight), "the frozen weight did not move"


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_reduces_loss(backend):
    """Fit a target that differs from the base layer only inside span(A)·R·span(B): R can reach it."""
    torch.manual_seed(0)
    layer = FusedLoRAXSLinear.from_linear(_linear(16, 12), 4, backend=backend)
    R_target = torch.randn(4, 4) * 0.5
    x = torch.randn(128, 16)
    with torch.no_grad():
        target = F.linear(x, layer.weight, layer.bias) + ((x @ layer.lora_A) @ R_target) @ layer.lora_B
    opt = torch.optim.Adam([layer.lora_R], lr=0.05)
    losses = []
    for _ in range(40):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], losses[::8]


# ------------------------------------------------------------------------------ apply / merge model
class Block(nn.Module):
    """A toy transformer block: embedding, LayerNorm, attention projections, an MLP, an LM head."""

    def __init__(self, vocab=50, d=32, hidden=48):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.ln = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.q_proj, self.attn.k_proj = nn.Linear(d, d), nn.Linear(d, d, bias=False)
        self.attn.v_proj, self.attn.o_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.mlp = nn.Module()
        self.mlp.up, self.mlp.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids):
        h = self.ln(self.embed(ids))
        q, k, v = self.attn.q_proj(h), self.attn.k_proj(h), self.attn.v_proj(h)
        att = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        h = h + self.attn.o_proj(att @ v)
        h = h + self.mlp.down(F.gelu(self.mlp.up(h)))
        return self.lm_head(h)


TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up", "down"]


def _block():
    torch.manual_seed(0)
    return Block()


def test_apply_loraxs_replaces_exactly_the_targets():
    model = _block()
    original = copy.deepcopy(model)
    ids = torch.randint(0, 50, (2, 7))
    out = apply_loraxs(model, 4, TARGETS, scaling=2.0, r_init="zeros")
    assert out is model
    adapted = {n for n, m in model.named_modules() if isinstance(m, FusedLoRAXSLinear)}
    assert adapted == {"attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.up", "mlp.down"}
    assert type(model.lm_head) is nn.Linear
    assert all(m.rank == 4 and m.scaling == 2.0 for m in model.modules() if isinstance(m, FusedLoRAXSLinear))
    assert model.attn.k_proj.bias is None
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_R" for n in adapted}
    # R = 0: the adapted model computes exactly what the original did.
    with torch.no_grad():
        assert torch.equal(model(ids), original(ids))
    # Backward reaches every R and nothing else.
    model(ids).logsumexp(-1).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == n.endswith("lora_R"), n
    assert all(model.get_submodule(n).lora_R.grad.abs().sum() > 0 for n in adapted)


def test_apply_loraxs_string_target_and_kwargs():
    # A single string is a regular expression on the whole dotted path (PEFT's rule).
    model = apply_loraxs(_block(), 2, r".*\.v_proj", backend="torch", r_dtype=torch.float64)
    assert isinstance(model.attn.v_proj, FusedLoRAXSLinear) and model.attn.v_proj.backend == "torch"
    assert model.attn.v_proj.lora_R.dtype == torch.float64
    assert sum(isinstance(m, FusedLoRAXSLinear) for m in model.modules()) == 1


def test_merge_loraxs_round_trip():
    model = apply_loraxs(_block(), 4, TARGETS)
    for m in model.modules():
        if isinstance(m, FusedLoRAXSLinear):
            _with_random_R(m, std=0.2)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        y = model(ids)
    assert merge_loraxs(model) is model
    assert not any(isinstance(m, FusedLoRAXSLinear) for m in model.modules())
    assert type(model.attn.q_proj) is nn.Linear and type(model.mlp.down) is nn.Linear
    with torch.no_grad():
        assert_close(model(ids), y, torch.float32, "merged model")


def test_apply_loraxs_errors():
    with pytest.raises(ValueError, match="target_modules is empty"):
        apply_loraxs(_block(), 4, [])
    with pytest.raises(ValueError, match=r"found no layer to adapt: 'query' matches no module.*; 'nope' matches no"):
        apply_loraxs(_block(), 4, ["query", "nope"])
    with pytest.raises(ValueError, match="rank"):
        apply_loraxs(_block(), 64, ["q_proj"])  # 64 > min(32, 32)


def test_apply_loraxs_failure_leaves_model_untouched():
    """A call that raises must not have half-changed the model (frozen parameters, swapped layers)."""
    model = _block()
    with pytest.raises(ValueError):
        apply_loraxs(model, 4, ["query"])  # no match
    assert all(p.requires_grad for p in model.parameters()), "a failed apply_loraxs froze the model"
    # The rank fits the first target (32×32) but not the second (32→4): nothing may be replaced.
    model = nn.Sequential()
    model.add_module("big", nn.Linear(32, 32))
    model.add_module("small", nn.Linear(32, 4))
    with pytest.raises(ValueError, match="rank"):
        apply_loraxs(model, 8, ["big", "small"])
    assert type(model.big) is nn.Linear, "a failed apply_loraxs replaced some of the layers"
    assert all(p.requires_grad for p in model.parameters()), "a failed apply_loraxs froze the model"
