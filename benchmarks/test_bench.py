"""pytest-benchmark over the smoke case, plus checks that keep the suite honest.

    pytest benchmarks/                        times every provider × mode (a few seconds each)
    pytest benchmarks/ --benchmark-disable    runs each once: the CI check that nothing rotted

The cases, providers and steps are the CLI's own (cases.py, providers.py, measure.py), so the two
can never measure different things.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from loraxs_kernels import reference

from . import roofline
from .__main__ import main
from .cases import CPU_KEY, MODES, cases_for
from .measure import Timing, paired_ratio, paired_ratio_ci, peak_mem_bytes, round_orders, saved_bytes, step_for
from .providers import PROVIDERS, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASE, MULTI_CASE = cases_for("smoke", DEVICE)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(CASE, DEVICE)


@pytest.fixture(scope="module")
def built(inputs):
    """Build each provider once per module: building compiled_unfused compiles, peft_lora imports peft."""
    cache = {}

    def get(name):
        reason = PROVIDERS[name].unavailable_reason(DEVICE)
        if reason is not None:
            pytest.skip(f"{name} unavailable: {reason}")
        if name not in cache:
            cache[name] = PROVIDERS[name].build(inputs)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def multi_inputs():
    return make_inputs(MULTI_CASE, DEVICE)


SINGLE = [n for n, p in PROVIDERS.items() if not p.many]
MANY = [n for n, p in PROVIDERS.items() if p.many]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", SINGLE)
def test_bench(benchmark, built, inputs, provider, mode):
    b = built(provider)
    step = step_for(b, inputs, mode)
    step.run(step.setup() if step.setup else None)  # first call: compile/autotune, never timed
    benchmark.group = f"{CASE.id} {mode}"
    benchmark.extra_info.update(provider=provider, mode=mode, case=CASE.id, device=str(DEVICE))
    if step.setup is not None:  # a lone backward needs a fresh, untimed forward each round
        benchmark.pedantic(step.run, setup=lambda: ((step.setup(),), {}), rounds=20, warmup_rounds=2)
    else:
        benchmark.pedantic(step.run, args=(None,), rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("provider", [n for n in SINGLE if PROVIDERS[n].same_output])
def test_same_output(built, inputs, provider):
    """Every provider that claims the LoRA-XS math computes it: a fast wrong kernel is no result."""
    i = inputs
    with torch.no_grad():
        y = built(provider).forward()
        ref = reference.loraxs_linear(i.x.double(), i.weight.double(), i.bias.double(), i.A.double(),
                                      i.R.double(), i.B.double(), i.scaling)
    tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[i.x.dtype]
    assert (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item()


@pytest.mark.parametrize("provider", MANY)
def test_many_adapter_providers(multi_inputs, provider):
    """Each many-adapter provider runs its modes on the smoke case; those that claim the math equal
    the reference row by row (per-row R), and a single-adapter case is refused with a reason."""
    p = PROVIDERS[provider]
    if p.unavailable_reason(DEVICE) is not None:
        pytest.skip(f"{provider} unavailable: {p.unavailable_reason(DEVICE)}")
    i = multi_inputs
    b = p.build(i)
    for mode in ("forward",) if p.forward_only else MODES:
        step = step_for(b, i, mode)
        step.run(step.setup() if step.setup else None)
    if p.same_output:
        with torch.no_grad():
            y = b.forward()
            ref = reference.loraxs_linear_multi(i.x.double(), i.weight.double(), i.bias.double(), i.A.double(),
                                                i.R_bank.double(), i.B.double(), i.ids, i.scaling)
        tol = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}[i.x.dtype]
        assert (y.double() - ref).abs().max().item() <= tol * ref.abs().max().item()
    assert MULTI_CASE.active == len(i.ids.unique()) and i.R_bank.shape[0] == MULTI_CASE.adapters
    with pytest.raises(ValueError, match="not a many-adapter case"):
        p.build(make_inputs(CASE, DEVICE))


def test_saved_bytes(built, inputs):
    """The hooks see what each layer keeps: the floor keeps no activation, LoRA-XS keeps x A only,
    PEFT LoRA keeps x (for lora_A's gradient)."""
    e = inputs.x.element_size()
    M, K, r = CASE.M, CASE.in_features, CASE.rank
    assert saved_bytes(built("nn_linear")) == 0
    assert saved_bytes(built("unfused")) == M * r * e
    for name in ("torch", "cpp"):
        if PROVIDERS[name].unavailable_reason(DEVICE) is None:
            assert saved_bytes(built(name)) == M * r * e, name
    if PROVIDERS["peft_lora"].unavailable_reason(DEVICE) is None:
        assert saved_bytes(built("peft_lora")) >= M * K * e


def test_peak_memory_counts_the_output(built, inputs):
    """The forward of the floor allocates at least y (M×out); the measurement must see it."""
    peak = peak_mem_bytes(step_for(built("nn_linear"), inputs, "forward"), DEVICE)
    if peak is None:
        pytest.skip("the profiler gave no memory events here")
    assert peak >= CASE.M * CASE.out_features * inputs.x.element_size()


def test_round_orders_vary_who_runs_before_whom():
    """Every provider once per round, and no provider always after the same one (a fixed rotation
    keeps each one's predecessor: that was the bias round_orders removes)."""
    names = ["frozen_base", "ours", "peft_lora", "peft_tinylora", "official_loraxs", "tinylora_ours", "full_ft"]
    orders = round_orders(names, 7)
    assert all(sorted(o) == sorted(names) for o in orders)
    assert orders == round_orders(names, 7)  # seeded: a run repeats
    for name in names:
        before = {o[o.index(name) - 1] if o.index(name) else None for o in orders}
        assert len(before) >= 3, (name, before)
    assert len({o[0] for o in orders}) >= 4  # and the first place (the cold one) goes round


def test_roofline_model():
    # forward 2MK(N+r) + 2Mr² + 2MrN; backward 2MN(K+r) + 4Mr² + 2MrK
    M, K, N, r = 2, 3, 5, 1
    assert roofline.flops(M, K, N, r, "forward") == 2 * 2 * 3 * 5 + 2 * 2 * 3 + 2 * 2 + 2 * 2 * 5
    assert roofline.flops(M, K, N, r, "backward") == 2 * 2 * 5 * 3 + 2 * 2 * 5 + 4 * 2 + 2 * 2 * 3
    assert roofline.flops(M, K, N, r, "forward", lora_xs=False) == 2 * M * K * N
    assert roofline.min_bytes(M, K, N, r, "forward", "bf16", lora_xs=False) == 2 * (M * K + K * N + N + M * N)
    assert roofline.gpu_peak("NVIDIA H200").name == "NVIDIA H200 SXM"
    assert roofline.gpu_peak("NVIDIA H100 80GB HBM3").name == "NVIDIA H100 SXM"
    assert roofline.gpu_peak("NVIDIA A100-SXM4-80GB").name == "NVIDIA A100 80GB SXM"
    assert roofline.gpu_peak("NVIDIA L4").name == "NVIDIA L4"
    for other in ("NVIDIA H100 PCIe", "NVIDIA L40S", "NVIDIA A100-SXM4-40GB", "NVIDIA H200 NVL"):
        assert roofline.gpu_peak(other) is None, other


def test_presets():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    quick = cases_for("quick", cpu)
    key = [c for c in quick if c.key]
    assert len(key) == 1 and key[0] == quick[0]
    assert (key[0].M, key[0].in_features, key[0].out_features, key[0].rank, key[0].dtype) == (
        CPU_KEY["M"], 1024, 1024, 16, "fp32")
    assert {c.dtype for c in quick} == {"fp32"}
    gpu_quick = cases_for("quick", gpu)
    assert {c.dtype for c in gpu_quick} == {"bf16"} and len(gpu_quick) == 4 * 2 * 3
    assert {c.dtype for c in cases_for("full", gpu)} == {"bf16", "fp16"}
    assert [bool(c.adapters) for c in cases_for("smoke", cpu)] == [False, True]
    multi = cases_for("multi", cpu)
    assert multi[0].key and (multi[0].M, multi[0].adapters, multi[0].active) == (4096, 1000, 1000)
    assert [(c.M, c.adapters, c.active, c.dtype) for c in cases_for("multi", gpu)[1:]] == [
        (64, 10_000, 64, "bf16"), (16, 10_000, 16, "bf16")]


def test_cli_smoke(tmp_path):
    """The CLI end to end: three outputs, unavailable providers skipped with a reason, no crash."""
    out = tmp_path / "run"
    names = ["nn_linear", "unfused", "torch", "cpp", "triton", "cuda"]
    res = main(["--preset", "smoke", "--providers", ",".join(names), "--out", str(out)])
    assert (out / "results.md").is_file() and (out / "results.json").is_file()
    if importlib.util.find_spec("matplotlib") is not None:
        assert res["plots"] and all(p.is_file() for p in res["plots"])
    data = json.loads((out / "results.json").read_text())
    ran = {r["provider"] for r in data["records"]}
    assert ran | set(data["skipped"]) == set(names) and not data["errors"]
    # The smoke preset's many-adapter case runs the single-adapter providers too (the yardstick).
    assert len(data["records"]) == 2 * 3 * len(ran)
    if DEVICE.type == "cpu":
        assert "interpreter" in data["skipped"]["triton"] and "cuda" in data["skipped"]
    for key in ("provider", "mode", "M", "in_features", "out_features", "rank", "dtype", "device", "median_ms",
                "p20_ms", "p80_ms", "peak_mem_bytes", "saved_bytes", "tflops", "gbps", "roofline_frac"):
        assert key in data["records"][0], key
    for key in ("device_name", "torch", "triton", "git_commit", "python", "cpu_count", "preset"):
        assert key in data["environment"], key
    assert "vs unfused" in (out / "results.md").read_text()


def test_paired_ratio_interval_brackets_the_median_and_narrows_with_rounds():
    """The bootstrap interval of the per-round-ratio median: None under 5 rounds; it holds the median;
    the same spread over 4× the rounds gives an interval about half as wide; the same inputs give the
    same interval (seeded), and a ratio with no spread gives a point."""
    import random

    def timings(n, seed):
        rng = random.Random(seed)
        den = [1000 * (1 + rng.random()) for _ in range(n)]  # round-to-round load: cancels in the ratio
        num = [d * 1.05 * (1 + rng.gauss(0, 0.06)) for d in den]
        return Timing(num, list(range(n))), Timing(den, list(range(n)))

    assert paired_ratio_ci(*timings(4, 0)) is None
    short, long = timings(15, 1), timings(60, 1)
    lo, hi = paired_ratio_ci(*short)
    assert lo < paired_ratio(*short) < hi
    lo4, hi4 = paired_ratio_ci(*long)
    assert lo4 < paired_ratio(*long) < hi4 and lo4 < 1.05 < hi4
    assert 0.3 < (hi4 - lo4) / (hi - lo) < 0.75, (hi - lo, hi4 - lo4)
    assert paired_ratio_ci(*short) == (lo, hi)
    flat = Timing([2.0] * 6, list(range(6))), Timing([1.0] * 6, list(range(6)))
    assert paired_ratio_ci(*flat) == (2.0, 2.0)
