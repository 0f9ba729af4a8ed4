"""accelerate_peft: PEFT TinyLoRA (and official LoRA-XS) layers on the fused op give PEFT's outputs and
gradients, per element; what it cannot serve is left alone and named; PEFT's files stay PEFT's.

Per-element bound (tests/common.py's rule): ours and PEFT's own forward each err from the exact layer
by at most elementwise_tolerance(dtype, bound, depth), with the bound the layer evaluated on absolute
values (abs_bound_parts) and R's absolute value taken as Σᵢ|vᵢ||Pᵢ| (R is itself a u-term sum, rounded
in both), so |ours − PEFT| ≤ 2 × that, element by element. For v's gradient, ∂L/∂vᵢ = Σ_jk G_jk P_ijk
with G = ∂L/∂R_t: its bound is |P| contracted with grad_R's bound, depth grad_R's plus r².
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from torch import nn

from common import abs_bound_parts, assert_close, depths, elementwise_tolerance

peft = pytest.importorskip("peft")
pytest.importorskip("peft.tuners.tinylora")
from peft import LoraConfig, PeftModel, TinyLoraConfig, get_peft_model  # noqa: E402

from loraxs_kernels.interop import peft_accelerate as accel  # noqa: E402
from loraxs_kernels.interop.peft_accelerate import UNFUSED_FORWARD, accelerate_peft  # noqa: E402


class Two(nn.Module):
    def __init__(self, emb=False):
        super().__init__()
        self.emb = nn.Embedding(50, 24) if emb else None
        self.q = nn.Linear(24, 40)
        self.k = nn.Linear(40, 24, bias=False)

    def forward(self, x):
        if self.emb is not None:
            x = self.emb(x)
        return self.k(torch.tanh(self.q(x)))


def tiny_tinylora(dtype=torch.float32, seed=0, **config):
    torch.manual_seed(seed)
    cfg = dict(r=4, u=16, target_modules=["q", "k"], save_projection=True)
    cfg.update(config)
    pm = get_peft_model(Two().to(dtype), TinyLoraConfig(**cfg))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # v = 0 at init would hide every fault in R: make the low-rank term matter
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g))
    return pm


def _abs_R(v, P):
    """Σᵢ|vᵢ||Pᵢ|ᵀ in fp64, ≥ |R| entrywise: the absolute-value evaluation of R = (Σ vᵢPᵢ)ᵀ."""
    return torch.einsum("i,ijk->kj", v.detach().double().abs(), P.detach().double().abs())


def fused_and_peft(layer, x, g, trained):
    """The layer's output and the gradient of `trained` (for cotangent g): fused (exactly one op
    call), then through PEFT's own forward."""
    with fused_calls() as calls:
        y_ours = layer(x)
    assert calls.n == 1, "the fused op did not run"
    grad_ours, = torch.autograd.grad(y_ours, trained, g)
    y_peft = getattr(layer, UNFUSED_FORWARD)(x)
    grad_peft, = torch.autograd.grad(y_peft, trained, g)
    return y_ours, grad_ours, y_peft, grad_peft


def compare_tinylora_layer(layer, x, g, dtype):
    """Fused forward (layer(x)) vs PEFT's own (UNFUSED_FORWARD): y and grad_v per element."""
    adapter = layer.active_adapters[0]
    v = layer.tinylora_v[adapter][layer._tinylora_v_key[adapter]]
    P = layer.tinylora_P[adapter]
    base = layer.get_base_layer()
    y_ours, gv_ours, y_peft, gv_peft = fused_and_peft(layer, x, g, v)
    A, B = layer.tinylora_A[adapter].t(), layer.tinylora_B[adapter].t()
    sy, _, sR = abs_bound_parts(x, base.weight, base.bias, A, _abs_R(v, P), B, 1.0, g)
    r, u = A.shape[1], P.shape[0]
    dy, _, dR = depths(base.in_features, base.out_features, r, x.shape[:-1].numel())
    _within(y_ours, y_peft, 2 * elementwise_tolerance(dtype, sy, dy + u), "y")
    # grad_v_i = Σ_jk (∂L/∂R_t)_jk P_ijk, and ∂L/∂R_t = (∂L/∂R)ᵀ.
    sv = torch.einsum("jk,ijk->i", sR[1].t(), P.double().abs())
    _within(gv_ours, gv_peft, 2 * elementwise_tolerance(dtype, sv, dR + r * r), "grad_v")
    return y_ours


class fused_calls:
    """Counts the calls that reach loraxs_linear: a comparison where the fused path silently fell
    back to PEFT's forward would compare PEFT with itself."""

    def __enter__(self):
        self.n, self._orig = 0, accel.loraxs_linear

        def counted(*a, **k):
            self.n += 1
            return self._orig(*a, **k)

        accel.loraxs_linear = counted
        return self

    def __exit__(self, *exc):
        accel.loraxs_linear = self._orig


def _within(a, b, allowed, what):
    err = (a.detach().double() - b.detach().double()).abs()
    bad = ~(err <= allowed)
    assert not bool(bad.any()), (f"{what}: {int(bad.sum())} of {err.numel()} elements beyond the per-element "
                                 f"bound; worst {float((err / allowed).max()):.2f}× the allowance")


def _inputs(layer, dtype, seed=3, lead=(3, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, layer.in_features, generator=g).to(dtype)
    go = torch.randn(*lead, layer.out_features, generator=g).to(dtype)
    return x, go


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("tying", [0.0, 1.0], ids=["own_v", "tied_v"])
def test_tinylora_matches_peft_per_element(dtype, tying):
    pm = tiny_tinylora(dtype, weight_tying=tying)
    done = accelerate_peft(pm)
    assert done.served == ("base_model.model.q", "base_model.model.k") and not done.left_alone
    for layer in (pm.base_model.model.q, pm.base_model.model.k):
        x, g = _inputs(layer, dtype)
        compare_tinylora_layer(layer, x, g, dtype)
    # The whole model: the same loss and the same gradient for every v (tied or not).
    ref = copy.deepcopy(pm)
    for m in ref.modules():
        if hasattr(m, UNFUSED_FORWARD):
            m.forward = getattr(m, UNFUSED_FORWARD)
            del m._loraxs_unfused_forward
    x = torch.randn(6, 24).to(dtype)
    for model in (pm, ref):
        model(x).float().square().sum().backward()
    for (n, p), (_, q) in zip(pm.named_parameters(), ref.named_parameters()):
        if p.requires_grad:
            tol = 1e-5 if dtype == torch.float32 else 3e-2
            assert torch.allclose(p.grad, q.grad, rtol=tol, atol=tol * q.grad.abs().max().item()), n


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_planted_faults_are_caught(monkeypatch, dtype):
    """A wrong P orientation (R = Σ vᵢPᵢ instead of its transpose) is caught by the per-element check."""
    pm = tiny_tinylora(dtype)
    accelerate_peft(pm)
    layer = pm.base_model.model.q
    x, g = _inputs(layer, dtype)
    compare_tinylora_layer(layer, x, g, dtype)  # passes as built

    def untransposed(v, P):
        u, r = P.shape[0], P.shape[1]
        return (v @ P.to(v.dtype).reshape(u, r * r)).reshape(r, r)

    monkeypatch.setattr(accel, "tinylora_R", untransposed)
    with pytest.raises(AssertionError, match="y:"):
        compare_tinylora_layer(layer, x, g, dtype)


def _grad_off_by(R, factor):
    """R's value, with a gradient scaled by `factor`: a backward-only fault."""
    return R.detach() + (R - R.detach()) * factor


@pytest.mark.parametrize("dtype, factor", [(torch.float32, 1.001), (torch.bfloat16, 16.0)], ids=["fp32", "bf16"])
def test_planted_gradient_fault_is_caught(monkeypatch, dtype, factor):
    """A gradient to v scaled by `factor`, the forward exact, is caught by the grad_v bound. fp32
    catches 0.1 %. bf16 only catches gross faults: the bound of grad_vᵢ sums r² entries of grad_R's
    bound, each a sum over M tokens of |x A||g Bᵀ|, and came out 5-300× |grad_vᵢ| on these inputs
    (cancellation in x A, g Bᵀ and across the random Pᵢ), so 2× or a sign flip stays inside it."""
    pm = tiny_tinylora(dtype)
    accelerate_peft(pm)
    layer = pm.base_model.model.k
    x, g = _inputs(layer, dtype)
    good = accel.tinylora_R
    monkeypatch.setattr(accel, "tinylora_R", lambda v, P: _grad_off_by(good(v, P), factor))
    with pytest.raises(AssertionError, match="grad_v:"):
        compare_tinylora_layer(layer, x, g, dtype)


# ------------------------------------------------------------------------------- official layout
def _official(seed=0, alpha=8):
    from benchmarks.e2e_providers import make_official_loraxs

    torch.manual_seed(seed)
    pm = make_official_loraxs(Two(), 4, ["q", "k"], lora_alpha=alpha)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in pm.modules():
            if hasattr(m, "default_lora_latent_mapping"):
                m.default_lora_latent_mapping.weight.copy_(torch.randn(4, 4, generator=g) / 2)
    return pm


def compare_official_layer(layer, x, g):
    latent = layer.default_lora_latent_mapping.weight
    base = layer.get_base_layer()
    y_ours, gl_ours, y_peft, gl_peft = fused_and_peft(layer, x, g, latent)
    A, B, s = layer.lora_A["default"].weight.t(), layer.lora_B["default"].weight.t(), layer.scaling["default"]
    sy, _, sR = abs_bound_parts(x, base.weight, base.bias, A, latent.t(), B, s, g)
    dy, _, dR = depths(base.in_features, base.out_features, 4, x.shape[:-1].numel())
    _within(y_ours, y_peft, 2 * elementwise_tolerance(torch.float32, sy, dy), "y")
    _within(gl_ours, gl_peft, 2 * elementwise_tolerance(torch.float32, sR[1].t(), dR), "grad_latent")


def test_official_loraxs_layout_matches_and_dropped_scaling_is_caught(monkeypatch):
    pm = _official(alpha=8)  # scaling = alpha / r = 2: a dropped scaling shows
    done = accelerate_peft(pm)
    assert len(done.served) == 2 and not done.left_alone
    layer = pm.base_model.model.q
    x, g = _inputs(layer, torch.float32)
    compare_official_layer(layer, x, g)
    monkeypatch.setattr(accel, "official_scaling", lambda layer, adapter: 1.0)
    with pytest.raises(AssertionError, match="y:"):
        compare_official_layer(layer, x, g)
    monkeypatch.undo()
    good = accel.official_R
    monkeypatch.setattr(accel, "official_R", lambda latent: _grad_off_by(good(latent), 1.001))
    with pytest.raises(AssertionError, match="grad_latent:"):
        compare_official_layer(layer, x, g)


def test_plain_lora_latent_without_official_forward_is_not_taken():
    """A latent mapping beside PEFT's class forward is never used by PEFT: serving it would change
    the output, so such a model holds nothing to accelerate."""
    pm = get_peft_model(Two(), LoraConfig(r=4, target_modules=["q", "k"]))
    pm.base_model.model.q.default_lora_latent_mapping = nn.Linear(4, 4, bias=False)
    with pytest.raises(ValueError, match="holds no PEFT TinyLoRA Linear layer"):
        accelerate_peft(pm)


# --------------------------------------------------------------------------- what is left alone
def test_unservable_layers_are_named_once_and_left_alone():
    torch.manual_seed(0)
    base = Two(emb=True)
    pm = get_peft_model(base, TinyLoraConfig(r=4, u=16, target_modules=["emb", "q", "k"], bias="all"))
    with pytest.warns(UserWarning) as caught:
        done = accelerate_peft(pm)
    msgs = [str(w.message) for w in caught if "accelerate_peft" in str(w.message)]
    assert len(msgs) == 1, msgs
    assert "base_model.model.emb" in msgs[0] and "Embedding" in msgs[0]
    assert "base_model.model.q" in msgs[0] and "bias requires grad" in msgs[0]
    assert done.served == ("base_model.model.k",)  # no bias: bias="all" makes nothing trainable there
    assert set(done.left_alone) == {"base_model.model.emb", "base_model.model.q"}
    assert "forward" not in vars(pm.base_model.model.q) and "forward" in vars(pm.base_model.model.k)


@pytest.mark.parametrize("config, reason", [
    (dict(tinylora_dropout=0.1), "dropout p = 0.1"),
])
def test_nothing_servable_is_an_error_and_changes_nothing(config, reason):
    torch.manual_seed(0)
    pm = get_peft_model(Two(), TinyLoraConfig(r=4, u=16, target_modules=["q", "k"], **config))
    state = {k: v.clone() for k, v in pm.state_dict().items()}
    with pytest.raises(ValueError, match=reason) as e:
        accelerate_peft(pm)
    assert "base_model.model.q" in str(e.value) and "base_model.model.k" in str(e.value)
    assert not any(hasattr(m, UNFUSED_FORWARD) for m in pm.modules())
    assert all(torch.equal(v, pm.state_dict()[k]) for k, v in state.items())


def test_fan_in_fan_out_conv1d_is_left_alone():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=40, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2Model(config)
    pm = get_peft_model(model, TinyLoraConfig(r=2, u=4, target_modules=["c_attn"], fan_in_fan_out=True))
    with pytest.raises(ValueError, match="fan_in_fan_out"):
        accelerate_peft(pm)


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        accelerate_peft("model")
    with pytest.raises(ValueError, match="holds no PEFT TinyLoRA"):
        accelerate_peft(Two())
    with pytest.raises(TypeError, match="backend"):
        accelerate_peft(tiny_tinylora(), backend=3)


# ------------------------------------------------------------------------------------ PEFT's states
def test_peft_states_disable_merge_and_second_call():
    pm = tiny_tinylora()
    x = torch.randn(4, 24)
    with torch.no_grad():
        before = pm(x)
    accelerate_peft(pm)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = accelerate_peft(pm)  # already served: nothing new, no warning
    assert len(again.served) == 2
    with torch.no_grad():
        with fused_calls() as calls:
            assert torch.allclose(pm(x), before, rtol=1e-5, atol=1e-5 * before.abs().max().item())
        assert calls.n == 2
        with pm.disable_adapter(), fused_calls() as calls:
            off = pm(x)
        assert calls.n == 0
        assert torch.equal(off, pm.get_base_model().k.base_layer(torch.tanh(pm.get_base_model().q.base_layer(x))))
        assert not torch.allclose(off, before)
        pm.merge_adapter()
        with fused_calls() as calls:
            assert torch.allclose(pm(x), before, rtol=1e-4, atol=1e-4 * before.abs().max().item())
        assert calls.n == 0
        pm.unmerge_adapter()
        assert torch.allclose(pm(x), before, rtol=1e-5, atol=1e-5 * before.abs().max().item())


def test_state_dict_and_saved_files_stay_peft(tmp_path):
    from safetensors.torch import load_file

    pm = tiny_tinylora()
    plain = copy.deepcopy(pm)
    accelerate_peft(pm)
    assert list(pm.state_dict()) == list(plain.state_dict())
    pm.save_pretrained(tmp_path / "fused")
    plain.save_pretrained(tmp_path / "plain")
    a = load_file(str(tmp_path / "fused" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # PEFT keeps target_modules as a set and writes it in the set's iteration order, which a deepcopy
    # may change (CI saw ["k", "q"] beside ["q", "k"]): the list is compared as a set, the rest exactly.
    cfg_fused, cfg_plain = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("fused", "plain"))
    assert set(cfg_fused.pop("target_modules")) == set(cfg_plain.pop("target_modules")) == {"q", "k"}
    assert cfg_fused == cfg_plain
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(Two(), tmp_path / "fused")
    trained = {n: p for n, p in pm.named_parameters() if "tinylora_v" in n}
    assert trained and all(torch.equal(p, trained[n]) for n, p in loaded.named_parameters() if n in trained)
    # PEFT recomputes A and B from the base on load (its SVD, not ours): the loaded model, served,
    # computes what its own PEFT forward computes.
    unserved = copy.deepcopy(loaded)
    assert len(accelerate_peft(loaded).served) == 2
    x = torch.randn(5, 24)
    with torch.no_grad():
        assert_close(loaded(x), unserved(x), torch.float32, "loaded")


def test_minilm_tinylora_logits_and_v_grads_match_peft(monkeypatch):
    """The whole of all-MiniLM-L6-v2 with TinyLoRA on every linear of its blocks: accelerate_peft
    serves all 36 layers, and logits and every v's gradient match PEFT's own forward (global yardstick:
    the model's output is not the op's reference on the same inputs)."""
    from hf_models import minilm, token_ids

    torch.manual_seed(0)
    targets = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
    pm = get_peft_model(minilm(head_seed=0), TinyLoraConfig(r=8, u=64, target_modules=targets))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in pm.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    plain = copy.deepcopy(pm)
    done = accelerate_peft(pm)
    assert len(done.served) == 36 and not done.left_alone
    ids = token_ids(4, 16)
    grads = []
    for model in (pm, plain):
        logits = model(input_ids=ids).logits
        logits.square().sum().backward()
        grads.append((logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (l_ours, g_ours), (l_peft, g_peft) = grads
    assert_close(l_ours, l_peft, torch.float32, "logits")
    assert g_ours.keys() == g_peft.keys() and len(g_ours) == 36
    for n in g_ours:
        assert_close(g_ours[n], g_peft[n], torch.float32, f"grad {n}")
    # Planted fault: R = Σ vᵢPᵢ untransposed in every layer shows in the logits.
    monkeypatch.setattr(accel, "tinylora_R", lambda v, P: (v @ P.reshape(P.shape[0], -1)).reshape(P.shape[1:]))
    with torch.no_grad(), pytest.raises(AssertionError, match="logits"):
        assert_close(pm(input_ids=ids).logits, l_peft, torch.float32, "logits")
