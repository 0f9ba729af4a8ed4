"""Zero-size layers (issue 19, item 5): M, in_features or out_features = 0 (r >= 1) in loraxs_linear and
loraxs_linear_multi, forward and backward, on every backend that runs here: "cpp", "torch", "triton"
(under the interpreter), and the build-less fallbacks (ops/fallback.py, ops/multi.py's _fallback).

What the math says: y = b broadcast over M rows (zeros without a bias; empty when M or out is 0),
since x A = 0 when in = 0 and there is nothing to add when out = 0; grad_x = 0 of x's shape (g W sums
over out = 0 terms, or x is empty); grad_R = 0 of R's shape ((r, r) or (n, r, r)): a sum over zero rows
or of products with x A = 0 or g Bᵀ = 0. Every comparison is exact (torch.equal): no rounding is involved.

Before the fix, out_features = 0 with R requiring grad divided by zero in csrc/contract.cpp (SIGFPE:
the process dies). So the whole matrix runs once in a subprocess first (`crash_free`): a regression
is a test failure naming the signal, not a dead pytest; the in-process tests run only after it passed.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import loraxs_kernels
from common import allow_no_native, native_reason

pytestmark = pytest.mark.skipif(native_reason() is not None and allow_no_native(),
                                reason=f"the C++ extension is missing: {native_reason()}")

# (leading dims of x, in, out): each zero alone and together, 2-D and 3-D x.
SHAPES = [((0,), 4, 5), ((3,), 0, 5), ((3,), 4, 0), ((0,), 0, 0), ((0,), 4, 0), ((0,), 0, 5), ((3,), 0, 0),
          ((2, 0), 4, 5), ((2, 3), 0, 5), ((2, 3), 4, 0), ((0, 3), 0, 0)]
BACKENDS = ["cpp", "torch", "triton", "fallback"]
RANK, BANK = 2, 3


def layer(lead, in_f, out_f, multi, bias=True, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, in_f, generator=g).to(dtype).requires_grad_()
    w = torch.randn(out_f, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, generator=g).to(dtype) if bias else None
    A = torch.randn(in_f, RANK, generator=g).to(dtype)
    B = torch.randn(RANK, out_f, generator=g).to(dtype)
    R = torch.randn(*((BANK,) if multi else ()), RANK, RANK, generator=g).to(dtype).requires_grad_()
    ids = torch.randint(-1, BANK, lead, generator=g) if multi else None
    return x, w, b, A, R, B, ids


def call(backend, multi, x, w, b, A, R, B, ids, scaling=0.5):
    if backend == "fallback":  # the build-less paths, called directly
        if multi:
            from loraxs_kernels.ops import multi as multi_op

            return multi_op._fallback(x, w, b, A, R, B, ids, scaling, None)
        from loraxs_kernels.ops import fallback

        return fallback.linear(x, w, b, A, R, B, scaling, "torch")
    if multi:
        return loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids, scaling, backend=backend)
    return loraxs_kernels.loraxs_linear(x, w, b, A, R, B, scaling, backend=backend)


def check_zero_size(backend, multi, lead, in_f, out_f, bias, need_x, need_R):
    """Forward and backward of one case; raises AssertionError naming what differs."""
    x, w, b, A, R, B, ids = layer(lead, in_f, out_f, multi, bias)
    x.requires_grad_(need_x)
    R.requires_grad_(need_R)
    y = call(backend, multi, x, w, b, A, R, B, ids)
    what = f"{backend} multi={multi} x {tuple(x.shape)} out={out_f} bias={bias}"
    expected = (b if bias else torch.zeros(out_f)).expand(*lead, out_f)
    assert y.shape == (*lead, out_f) and y.dtype == x.dtype, f"{what}: y {tuple(y.shape)} {y.dtype}"
    assert torch.equal(y, expected), f"{what}: y is not the bias broadcast: {y}"
    if not (need_x or need_R):
        return
    y.backward(torch.ones_like(y))
    if need_x:
        assert x.grad is not None and torch.equal(x.grad, torch.zeros_like(x)), f"{what}: grad_x {x.grad}"
    if need_R:
        assert R.grad is not None and R.grad.dtype == R.dtype, f"{what}: grad_R {R.grad}"
        assert torch.equal(R.grad, torch.zeros_like(R)), f"{what}: grad_R is not zeros: {R.grad}"


def matrix():
    return [(backend, multi, lead, in_f, out_f)
            for backend, multi, (lead, in_f, out_f) in itertools.product(BACKENDS, (False, True), SHAPES)]


NEEDS = ((True, True), (False, True), (True, False), (False, False))


def run_matrix():
    """Every (case, bias, need_x, need_R): prints one JSON line per case, its error or None."""
    for case in matrix():
        for bias, (need_x, need_R) in itertools.product((True, False), NEEDS):
            key = repr((*case, bias, need_x, need_R))
            print(json.dumps({"start": key}), flush=True)
            try:
                check_zero_size(*case, bias, need_x, need_R)
                error = None
            except Exception as e:  # reported per case by test_zero_size
                error = f"{type(e).__name__}: {e}"
            print(json.dumps({"case": key, "error": error}), flush=True)
    print(json.dumps({"done": True}), flush=True)


@pytest.fixture(scope="module")
def crash_free():
    """The matrix once, in a child process: a SIGFPE or abort there fails this fixture (and every test
    using it) naming the signal and the case, instead of killing the pytest process. Returns each
    case's error (None: passed)."""
    code = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        warnings.simplefilter("ignore")
        import test_zero_size
        test_zero_size.run_matrix()
    """)
    env = {**os.environ, "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines or not lines[-1].get("done"):
        last = next((d["start"] for d in reversed(lines) if "start" in d), "(no case started)")
        pytest.fail(f"zero-size matrix in a subprocess: exit code {proc.returncode} (negative = killed by that "
                    f"signal) during {last}\n{proc.stderr[-3000:]}")
    return {d["case"]: d["error"] for d in lines if "case" in d}


@pytest.mark.parametrize("backend,multi,lead,in_f,out_f", matrix())
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_zero_size(crash_free, backend, multi, lead, in_f, out_f, bias):
    """Forward, and backward for each of need (x, R), (R), (x) and neither."""
    errors = [crash_free[repr((backend, multi, lead, in_f, out_f, bias, nx, nr))] for nx, nr in NEEDS]
    assert errors == [None] * len(NEEDS), errors


@pytest.mark.parametrize("multi", [False, True], ids=["single", "multi"])
def test_linear_bwd_direct_call_with_no_out_features(crash_free, multi):
    """The backward ops called directly (what autograd calls): grad_out (M, 0), xa (M, r), need_R."""
    x, w, b, A, R, B, ids = layer((3,), 4, 0, multi)
    g = torch.empty(3, 0)
    xa = (x @ A).detach()
    if multi:
        gx, gR = torch.ops.loraxs.linear_multi_bwd(g, xa, w, A, R.detach(), B, ids, 1.0, None, True, True, "cpp")
    else:
        gx, gR = torch.ops.loraxs.linear_bwd(g, xa, w, A, R.detach(), B, 1.0, True, True, "cpp")
    assert torch.equal(gx, torch.zeros(3, 4)) and torch.equal(gR, torch.zeros_like(R))


def test_the_checks_catch_a_wrong_zero_size_result(crash_free, monkeypatch):
    """A planted fault: a backend whose zero-size grad_R is not zeros (empty instead) must fail the check."""
    from loraxs_kernels.ops import fallback

    real = fallback._Linear.backward

    def wrong(ctx, grad_out):
        out = list(real(ctx, grad_out))
        if out[4] is not None:
            out[4] = out[4] + 1  # grad_R off by one everywhere
        return tuple(out)

    monkeypatch.setattr(fallback._Linear, "backward", staticmethod(wrong))
    with pytest.raises(AssertionError, match="grad_R is not zeros"):
        check_zero_size("fallback", False, (3,), 0, 5, True, False, True)
