"""A seeded fuzz of the many-adapter op (issue 19): CASES random calls of loraxs_linear_multi on the CPU
against the fp64 reference (reference.loraxs_linear_multi), forward, grad_x and grad_R, every element
within tests/common.py's per-element tolerance (assert_within_bound on test_multi.reference_and_bounds'
absolute-value bounds), and grad_R of every adapter no row used exactly zero.

Each case draws: a dtype (fp64, fp32, bf16, fp16) and an fp32 master bank beside a 16-bit or fp64 layer;
int32 or int64 ids; a bank of n = 1 … 5,000 adapters and r = 1 … 256 (n·r² kept under ~1M numbers so a
case stays fast); an ids pattern (random with -1 rows, all -1, one adapter, every row its own adapter,
mostly -1, runs of one id per sequence); x, the bank and the ids strided or not; a float or a per-adapter scaling tensor (with inf
and NaN in slots no row uses); 1- to 3-D leading dims with a small M. The CPU kernel picks its schedule
per call (csrc/cpu/multi_aten.cpp: per row when used·6000 > active·r², else grouped, on the runs in
place when each adapter's rows are consecutive); the draw is steered so all three appear, and a third share of the cases runs the device plan (LORAXS_MULTI_DEVICE_PLAN=1:
what cuBLAS runs on CUDA, no host copies, segmented grad_R). test_every_schedule_is_covered counts them.
"""

from __future__ import annotations

import math
import random

import pytest
import torch

import loraxs_kernels
from common import allow_no_native, assert_within_bound, depths, native_reason
from test_multi import reference_and_bounds

pytestmark = pytest.mark.skipif(native_reason() is not None and allow_no_native(),
                                reason=f"the C++ extension is missing: {native_reason()}")

CASES = 320
SEED = 20261202
BANK_NUMBERS = 1 << 20  # n·r² at most: a 5,000-adapter bank at r <= 14, r = 256 with n <= 16
PATTERNS = ["random", "all-minus-one", "one-adapter", "every-row-its-own", "mostly-minus-one", "per-sequence"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def schedule_of(ids: torch.Tensor, r: int, device_plan: bool) -> str:
    """The schedule csrc/cpu/multi_aten.cpp's plan_rows picks (its cost model, mirrored)."""
    if device_plan:
        return "device"
    flat = ids.reshape(-1)
    active = int((flat >= 0).sum())
    used = len(set(flat[flat >= 0].tolist()))
    if active == 0:
        return "none"
    if used * 6000 > active * r * r:
        return "per-row"
    runs = sum(1 for i, k in enumerate(flat.tolist()) if k >= 0 and (i == 0 or int(flat[i - 1]) != k))
    return "runs" if runs == used else "grouped"  # runs: each adapter's rows consecutive, no sort


def draw(i: int) -> dict:
    rnd = random.Random(SEED * 1000 + i)
    dtype = DTYPES[i % len(DTYPES)]
    r_dtype = torch.float32 if dtype != torch.float32 and rnd.random() < 0.3 else dtype
    want_grouped = i % 3 == 1  # steer a share of the cases to few adapters with many rows at a larger r
    if want_grouped:
        r = rnd.choice([16, 24, 32, 48])
        n = rnd.randint(1, 6)
    elif rnd.random() < 0.2:
        r = rnd.randint(1, 14)
        n = rnd.randint(1000, 5000)  # a large bank
    else:
        r = int(round(math.exp(rnd.uniform(0, math.log(256)))))
        n = int(round(math.exp(rnd.uniform(0, math.log(5000)))))
    n = max(1, min(n, BANK_NUMBERS // (r * r)))
    lead = rnd.choice([(rnd.randint(1, 40),), (rnd.randint(1, 5), rnd.randint(1, 8)), (2, rnd.randint(1, 3), 3)])
    if want_grouped:
        lead = (rnd.randint(30, 60),)
    pattern = rnd.choice(["one-adapter", "per-sequence", "random"]) if want_grouped else rnd.choice(PATTERNS)
    return dict(dtype=dtype, r_dtype=r_dtype, r=r, n=n, lead=lead, pattern=pattern,
                in_f=rnd.randint(1, 48), out_f=rnd.randint(1, 48), bias=rnd.random() < 0.7,
                id_dtype=rnd.choice([torch.int32, torch.int64]), strided_x=rnd.random() < 0.4,
                strided_bank=rnd.random() < 0.4, strided_ids=rnd.random() < 0.3,
                ascale=rnd.random() < 0.5, scaling=rnd.choice([1.0, 0.5, -2.0]),
                device_plan=i % 3 == 2, seed=rnd.randrange(1 << 30))


def ids_for(pattern, lead, n, g):
    M = math.prod(lead)
    if pattern == "random":
        ids = torch.randint(-1, n, (M,), generator=g)
    elif pattern == "all-minus-one":
        ids = torch.full((M,), -1)
    elif pattern == "one-adapter":
        ids = torch.full((M,), int(torch.randint(0, n, (1,), generator=g)))
    elif pattern == "every-row-its-own":
        ids = torch.randperm(n, generator=g)[:M].repeat(M // n + 1)[:M] if n < M else torch.randperm(n, generator=g)[:M]
    elif pattern == "per-sequence":  # runs of one id (some -1), an id possibly repeated in a later run
        seqs = max(1, M // max(1, lead[-1])) if len(lead) > 1 else max(1, M // 10)
        per = torch.randint(-1, n, (seqs,), generator=g)
        ids = per.repeat_interleave(-(-M // seqs))[:M]
    else:  # mostly -1
        ids = torch.where(torch.rand(M, generator=g) < 0.8, -1, torch.randint(0, n, (M,), generator=g))
    return ids.reshape(lead)


def strided(t):
    """t's values in a view with a non-unit last stride (every other element of a wider buffer)."""
    wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
    view = wide[..., ::2]
    view.copy_(t)
    return view


def build(c):
    g = torch.Generator().manual_seed(c["seed"])
    dt, r, n, in_f, out_f, lead = c["dtype"], c["r"], c["n"], c["in_f"], c["out_f"], c["lead"]

    def rand(*shape, scale=1.0, dtype=dt):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    x = rand(*lead, in_f)
    w = rand(out_f, in_f, scale=in_f ** -0.5)
    b = rand(out_f) if c["bias"] else None
    A = rand(in_f, r, scale=in_f ** -0.5)
    B = rand(r, out_f, scale=r ** -0.5)
    R = rand(n, r, r, scale=r ** -0.5, dtype=c["r_dtype"])
    ids = ids_for(c["pattern"], lead, n, g)
    if c["strided_x"]:
        x = strided(x)
    if c["strided_bank"]:
        R = R.transpose(1, 2).contiguous().transpose(1, 2)  # column-major slices: strides (r², 1, r)
    ids = ids.to(c["id_dtype"])
    if c["strided_ids"]:
        ids = strided(ids)
    s = c["scaling"]
    if c["ascale"]:
        s = rand(n, scale=1.0, dtype=torch.float64).to(dt if dt != torch.bfloat16 else torch.float32)
        unused = sorted(set(range(n)) - set(ids[ids >= 0].tolist()))
        # An unused slot of a torch.empty scaling tensor may hold anything: its adapter's gradient stays 0.
        # (Not slot 0: the reference's where() sends 0·s_0 into -1 rows' gradient path.)
        poison = [k for k in unused if k > 0][:2]
        for k, v in zip(poison, (math.inf, math.nan)):
            s[k] = v
    return x.requires_grad_(), w, b, A, R.requires_grad_(), B, ids, s


@pytest.fixture
def device_plan(monkeypatch):
    def use(on: bool):
        if on:
            monkeypatch.setenv("LORAXS_MULTI_DEVICE_PLAN", "1")
        else:
            monkeypatch.delenv("LORAXS_MULTI_DEVICE_PLAN", raising=False)
    return use


@pytest.mark.parametrize("i", range(CASES))
def test_fuzz_case(i, device_plan):
    c = draw(i)
    x, w, b, A, R, B, ids, s = build(c)
    device_plan(c["device_plan"])
    what = f"case {i} {c}"
    y = loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, s)
    assert y.dtype == x.dtype and y.shape == (*c["lead"], c["out_f"]), what
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(c["seed"] + 1), dtype=torch.float64)
    g = g.to(y.dtype)
    y.backward(g)
    (y_ref, gx_ref, gR_ref), (sy, sx, sR) = reference_and_bounds(x, w, b, A, R, B, ids, s, g)
    dy, dx, dR = depths(c["in_f"], c["out_f"], c["r"], ids.numel())
    assert_within_bound(y, y_ref, sy, c["dtype"], f"{what} y", dy)
    assert x.grad.dtype == x.dtype and R.grad.dtype == R.dtype and R.grad.shape == R.shape, what
    assert_within_bound(x.grad, gx_ref, sx, c["dtype"], f"{what} grad_x", dx)
    # grad_R comes back in R's dtype: an fp32 bank beside an fp64 layer adds one fp32 rounding.
    r_tol = torch.float32 if (c["dtype"], c["r_dtype"]) == (torch.float64, torch.float32) else c["dtype"]
    assert_within_bound(R.grad, gR_ref, sR, r_tol, f"{what} grad_R", dR)
    unused = sorted(set(range(c["n"])) - set(ids[ids >= 0].tolist()))
    assert torch.equal(R.grad[unused], torch.zeros_like(R.grad[unused])), f"{what}: an unused adapter got a gradient"


def test_every_schedule_is_covered():
    """The draw reaches the three CPU schedules (per row, grouped, runs), the device plan, every ids pattern, both id dtypes, every dtype,
    an fp32 bank, the extremes of n and r, and inf/NaN in unused scaling slots."""
    seen = {"schedule": set(), "pattern": set(), "id": set(), "dtype": set(), "r_dtype": set(), "poison": 0}
    n_max = r_max = 0
    for i in range(CASES):
        c = draw(i)
        *_, ids, s = build(c)
        seen["schedule"].add(schedule_of(ids, c["r"], c["device_plan"]))
        seen["pattern"].add(c["pattern"])
        seen["id"].add(c["id_dtype"])
        seen["dtype"].add(c["dtype"])
        seen["r_dtype"].add((c["dtype"], c["r_dtype"]))
        seen["poison"] += int(isinstance(s, torch.Tensor) and not bool(torch.isfinite(s).all()))
        n_max, r_max = max(n_max, c["n"]), max(r_max, c["r"])
    assert {"per-row", "grouped", "runs", "device", "none"} <= seen["schedule"], seen["schedule"]
    assert seen["pattern"] == set(PATTERNS) and seen["id"] == {torch.int32, torch.int64}
    assert seen["dtype"] == set(DTYPES)
    assert (torch.float64, torch.float32) in seen["r_dtype"] and (torch.bfloat16, torch.float32) in seen["r_dtype"]
    assert seen["poison"] >= 20 and n_max >= 4000 and r_max >= 200, (seen["poison"], n_max, r_max)


def test_the_fuzz_bounds_catch_a_neighbours_R(monkeypatch):
    """A planted fault: every row reading its neighbour adapter's R (id + 1 mod n) fails the fuzz check."""
    real = loraxs_kernels.loraxs_linear_multi

    def shifted(x, w, b, A, R, B, ids, s, **kw):
        n = R.shape[0]
        return real(x, w, b, A, R, B, torch.where(ids >= 0, (ids + 1) % n, ids), s, **kw)

    caught = 0
    for i in range(12):
        c = draw(i)
        ids = build(c)[6]
        if c["n"] < 2 or not bool((ids >= 0).any()):
            continue
        monkeypatch.setattr(loraxs_kernels, "loraxs_linear_multi", shifted)
        try:
            test_fuzz_case(i, lambda on: None)
        except AssertionError:
            caught += 1
        else:
            raise AssertionError(f"case {i}: a neighbour's R passed the bounds")
        finally:
            monkeypatch.setattr(loraxs_kernels, "loraxs_linear_multi", real)
    assert caught >= 3, caught
