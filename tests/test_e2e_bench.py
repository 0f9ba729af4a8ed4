"""The e2e preset (benchmarks/e2e.py) on tiny random models: every provider adapts the same layers at
the same rank, the floor back-propagates through every block, and a run writes every field."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

pytest.importorskip("peft")
pytest.importorskip("transformers")

from benchmarks import e2e  # noqa: E402
from benchmarks.e2e_models import ModelSpec, block_targets, llama, loss_of, make_batch, tiny_bert  # noqa: E402
from benchmarks.e2e_providers import PROVIDERS, RANK, build, unavailable_reason  # noqa: E402

CPU = torch.device("cpu")


def tiny_llama(device, dtype=torch.float32):
    return llama(device, hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=100, dtype=dtype)


SPECS = {
    "bert": ModelSpec("tiny-bert", "encoder", 2, 12, torch.float32, tiny_bert, "bert.encoder.layer"),
    "llama": ModelSpec("tiny-llama", "decoder", 2, 12, torch.float32, tiny_llama, "model.layers"),
}
LINEARS_PER_BLOCK = {"bert": 6, "llama": 7}  # q, k, v, attention out, intermediate, output / q, k, v, o, gate, up, down


def _available():
    return [p for p in PROVIDERS if unavailable_reason(p, CPU) is None]


@pytest.fixture(scope="module", params=list(SPECS))
def model(request):
    spec = SPECS[request.param]
    base = spec.build(CPU)
    return request.param, spec, base, block_targets(base, spec)


def test_targets_are_every_linear_of_the_blocks(model):
    key, spec, base, targets = model
    blocks = base.get_submodule(spec.blocks)
    assert len(targets) == LINEARS_PER_BLOCK[key] * len(blocks)
    assert all(type(base.get_submodule(t)) is nn.Linear for t in targets)
    outside = [p for p, m in base.named_modules() if type(m) is nn.Linear and not p.startswith(spec.blocks + ".")]
    assert outside and not set(outside) & set(targets)  # the head / pooler stay unadapted


@pytest.mark.parametrize("name", [p for p in PROVIDERS if p != "frozen_base"])
def test_providers_adapt_the_same_layers_at_the_same_rank(model, name):
    _, spec, base, targets = model
    if unavailable_reason(name, CPU) is not None:
        pytest.skip(unavailable_reason(name, CPU))
    t = build(name, base, targets)
    layers = t.adapted_layers(targets)
    adapted = [p for p, m in layers.items() if type(m) is not nn.Linear]
    trainable = sum(p.numel() for p in t.params)
    if name == "full_ft":
        assert adapted == [] and trainable == sum(p.numel() for p in base.parameters())
        return
    assert adapted == targets, f"{name} adapted {len(adapted)} of {len(targets)} target layers"
    if name == "peft_lora":
        expect = sum(RANK * (base.get_submodule(p).in_features + base.get_submodule(p).out_features) for p in targets)
    else:  # LoRA-XS, TinyLoRA with u = r², the official latent: r² per layer
        expect = len(targets) * RANK * RANK
    assert trainable == expect, f"{name}: {trainable} trainable parameters, expected {expect}"
    # Only the adapter trains: no base parameter is trainable.
    base_ids = {id(p) for p in base.parameters()}
    assert not any(id(p) in base_ids for p in t.params)
    # One step changes the loss (the optimizer steps what trains).
    batch = make_batch(base, spec, CPU)
    step, opt = e2e.make_step(t, batch)
    before = [p.detach().clone() for p in t.params]
    step()
    assert any(not torch.equal(a, p) for a, p in zip(before, t.params)), f"{name}: a step changed nothing"


def _block_inputs_grads(spec, model, inner):
    """Run loss.backward() and return, per block, whether its input hidden states received a gradient."""
    seen = []

    def grab(module, args, kwargs):
        h = args[0] if args else kwargs["hidden_states"]
        if h.requires_grad:
            h.retain_grad()
        seen.append(h)

    blocks = inner.get_submodule(spec.blocks)
    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in blocks]
    try:
        loss = loss_of(model, make_batch(inner, spec, CPU))
        if loss.requires_grad:
            loss.backward()
    finally:
        for h in handles:
            h.remove()
    return [h.grad is not None and bool(h.grad.abs().sum() > 0) for h in seen]


def test_floor_backpropagates_through_every_block(model):
    _, spec, base, targets = model
    t = build("frozen_base", base, targets)
    assert t.params == []
    reached = _block_inputs_grads(spec, t.model, t.inner)
    assert len(reached) == len(base.get_submodule(spec.blocks)) and all(reached), reached
    # The check can fail: a frozen model without the floor's hook back-propagates through nothing.
    from benchmarks.e2e_providers import share_base

    plain = share_base(base)
    for p in plain.parameters():
        p.requires_grad_(False)
    assert not any(_block_inputs_grads(spec, plain, plain))


def test_saved_bytes_in_adapted_layers_are_attributed():
    """ours keeps x A (r numbers per token) in its layers; PEFT LoRA keeps x too (in numbers per token)."""
    spec = SPECS["llama"]
    base = spec.build(CPU)
    targets = block_targets(base, spec)
    batch = make_batch(base, spec, CPU)
    got = {}
    for name in ("ours", "peft_lora", "frozen_base"):
        t = build(name, base, targets)
        got[name] = e2e.saved_bytes(t, batch, t.adapted_layers(targets))
    assert got["frozen_base"][1] == 0  # plain frozen nn.Linear layers save only their (owned) weight
    assert 0 < got["ours"][1] < got["peft_lora"][1] <= got["peft_lora"][0]


def test_run_writes_every_field(tmp_path):
    providers = ["frozen_base", "ours", "peft_lora", "peft_tinylora", "peft_tinylora+ours"]
    providers = [p for p in providers if unavailable_reason(p, CPU) is None]
    records = e2e.run(CPU, tmp_path, log=lambda m: None, quick=True, specs=[SPECS["llama"]], providers=providers)
    data = json.loads((tmp_path / "e2e.json").read_text())
    env = data["environment"]
    for key in ("device_name", "torch", "peft", "git_commit", "load_avg_start", "timing", "peak_mem_method"):
        assert key in env, key
    train = {r["provider"]: r for r in records if r["kind"] == "train"}
    assert set(train) == set(providers)
    for name, r in train.items():
        for key in ("median_ms", "vs_floor", "vs_ours", "tokens_per_s", "peak_mem_bytes", "saved_bytes",
                    "saved_bytes_adapted", "optimizer_state_bytes", "trainable_params", "adapted_layers",
                    "adapter_file_bytes", "init_s", "other_cpu_frac", "vs_floor_ci", "vs_ours_ci"):
            assert key in r, (name, key)
        assert len(r["times_ms"]) == e2e._settings(CPU, True).min_reps
    assert train["frozen_base"]["vs_floor"] == 1.0 and train["ours"]["vs_ours"] == 1.0
    assert train["ours"]["optimizer_state_bytes"] > 0 and train["frozen_base"]["optimizer_state_bytes"] == 0
    decode = {r["provider"]: r for r in records if r["kind"] == "decode"}
    assert {"base", "ours", "ours merged"} <= set(decode)
    assert all(r["same_tokens_as_base"] is not None and r["tokens_per_s"] > 0 for r in decode.values())
    md = (tmp_path / "e2e.md").read_text()
    assert "tiny-llama" in md and "Goals (issue 20)" in md and "Greedy decoding" in md
    assert (tmp_path / "e2e-step-time.png").stat().st_size > 0 and (tmp_path / "e2e-memory.png").stat().st_size > 0
    assert len(data["goals"]) == 5


def test_goals_say_whether_the_interval_decides_them():
    """A goal is met on the median; it is decided only when the whole 95 % interval lies on one side of
    its line. Timed goals without an interval (quick runs: 3 rounds) are undecided (None); the counted
    saved-bytes goal needs none."""
    def row(provider, vs_ours, ci, vs_floor=1.0, floor_ci=(0.99, 1.01)):
        return dict(kind="train", model="m", provider=provider, vs_ours=vs_ours, vs_ours_ci=ci,
                    vs_floor=vs_floor, vs_floor_ci=floor_ci, saved_bytes_adapted=10)
    rows = [row("frozen_base", 0.98, (0.95, 1.0)), row("ours", 1.0, (1.0, 1.0), 1.02, (1.00, 1.04)),
            row("peft_lora", 1.3, (1.2, 1.4)), row("peft_tinylora", 1.055, (1.03, 1.08)),
            row("peft_tinylora+ours", 1.01, None)]
    rows[2]["saved_bytes_adapted"] = 100
    by = {g["goal"]: g for g in e2e.goals(rows, CPU)}
    floor = by["ours ≤ 1.05× the frozen-base floor"]
    assert floor["met"] and floor["decided"]                       # 1.00-1.04 under 1.05
    tiny = by["PEFT TinyLoRA / ours ≥ 1.05×"]
    assert tiny["met"] and tiny["decided"] is False                # 1.055, but 1.03-1.08 straddles 1.05
    assert by["PEFT LoRA / ours ≥ 1.10×"]["decided"]
    assert by["peft_tinylora+ours ≤ 1.03× ours"]["decided"] is None
    saved = [g for g in e2e.goals(rows, CPU) if g["goal"].startswith("autograd-saved")][0]
    assert saved["met"] and saved["decided"]
    md = e2e.markdown(dict(device_name="cpu", timestamp="t", torch="t", peft="p", git_commit="0" * 12,
                           torch_threads=1, load_avg_start=[0, 0, 0], peak_mem_method="m"), [], {},
                      e2e.goals(rows, CPU))
    assert "| 1.055× (1.030–1.080) | yes | no |" in md


def test_min_reps_sets_the_e2e_rounds_and_is_refused_elsewhere():
    assert e2e._settings(CPU, False, 40).min_reps == 40 and e2e._settings(CPU, False).min_reps == 15
    assert e2e._settings(CPU, True, None).min_reps == 3
    from benchmarks.__main__ import main

    with pytest.raises(SystemExit, match="--min-reps"):
        main(["--preset", "store", "--min-reps", "5", "--out", "/nonexistent/never-written"])
