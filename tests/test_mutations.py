"""Planted faults that the per-element tolerance (tests/common.py) must catch, in every dtype, on every
backend that runs here: torch, cpp, and Triton (on the CPU interpreter, bf16 included through the
interpreter_bf16 fixture; on CUDA tensors when a GPU is present, where the CUDA C++ backend joins).

Each fault is planted at the backend's boundary, through the public op loraxs_linear(..., backend=...),
so that it depends on no kernel internals:
- a forward fault computes y from perturbed inputs (the gradients come from a clean call);
- a backward fault computes grad_x and grad_R by autograd through a call on perturbed inputs, so the
  backend's backward sees the perturbed grad_out / layer tensors / saved x A (y comes from a clean call).
Each perturbation is what the kernel bug it stands for would compute, e.g. a K loop that stops one
column early adds nothing for x's last column: x[..., -1] = 0.

A fault counts as visible to a check when its exact effect (computed in fp64) exceeds twice that check's
per-element tolerance in some element; every visible check must raise, no check the fault cannot reach
may raise, and each of the five faults of issue 10 must be visible to some check in every dtype. The layer
is small enough for that in bf16 (a one-term fault is then a few percent of the per-element bound: the
size of a one-element bug): in = 32, out = 24, r = 4, M = 16, bias ~ U(−1, 1), A and B from the SVD of
Wᵀ (the last rank column carries the smallest singular value), s = 0.5. At in = 64, out = 48, r = 8 a
dropped k column is already only 1.4× the bf16 tolerance: sound per-element bounds see a one-term
fault only while it is more than C·u of the bound, i.e. inner dimensions up to ~1/(C·u) (≈ 85 in bf16).

`python tests/test_mutations.py` prints the table of which check caught each fault and the measured
tolerance margins (worst error / per-element tolerance, per backend and dtype).
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton (conftest.py does it under pytest)

import pytest
import torch

from common import (
    C_BASE,
    C_LOW,
    SHAPES,
    abs_bound_parts,
    assert_matches_reference,
    cpu_backends,
    allowance_used,
    depths,
    elementwise_tolerance,
    make_inputs,
    reference_fp64,
)
from loraxs_kernels import backends, loraxs_linear

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
LEAD, IN, OUT, RANK, SCALING = (16,), 32, 24, 4, 0.5
CHECKS = ("y", "grad_x", "grad_R")


def _backend_params():
    """(backend, device) pytest params: the CPU backends, and Triton where it runs."""
    params = [pytest.param((p.values[0], "cpu"), id=p.id, marks=p.marks) for p in cpu_backends()]
    if torch.cuda.is_available():
        gpu = [pytest.mark.gpu]
        params += [pytest.param(("triton", "cuda"), id="triton-cuda", marks=gpu),
                   pytest.param(("cuda", "cuda"), id="cuda", marks=gpu)]
    else:
        # conftest.py set TRITON_INTERPRET=1 before anything imported triton.
        reason = backends.unavailable_reason("triton", torch.device("cpu"))
        marks = []
        if reason is not None and "cannot be imported" in reason:
            marks.append(pytest.mark.skip(reason=reason))  # Triton not installed: nothing to interpret
        params.append(pytest.param(("triton", "cpu"), id="triton-interp", marks=marks))
    return params


BACKENDS = _backend_params()


# ------------------------------------------------------------------------------------------ faults
def _zero_last_column(t):
    t = t.clone()
    t[..., -1] = 0
    return t


def _zero_last_row(t):
    t = t.clone()
    t[-1] = 0
    return t


# name -> (direction, perturbation of (x, w, b, A, R, B, s, g), the checks the fault reaches). The five
# faults of issue 10 first; "last token" is one more, for grad_R's M-long sum.
FAULTS = {
    "bias dropped": ("forward", lambda x, w, b, A, R, B, s, g: (x, w, None, A, R, B, s, g), {"y"}),
    # A K loop one column short: x's last column contributes nothing to x Wᵀ nor to x A.
    "last k column (fwd)": ("forward", lambda x, w, b, A, R, B, s, g: (_zero_last_column(x), w, b, A, R, B, s, g),
                            {"y"}),
    # grad_x = g W runs its K loop over out: g's last column dropped (u = g Bᵀ loses it too).
    "last k column (bwd)": ("backward", lambda x, w, b, A, R, B, s, g: (x, w, b, A, R, B, s, _zero_last_column(g)),
                            {"grad_x", "grad_R"}),
    # grad_R = s·(x A)ᵀ u sums over the M tokens: the last token dropped (x A's last row is zero).
    "last token (grad_R sum)": ("backward",
                                lambda x, w, b, A, R, B, s, g: (_zero_last_row(x.reshape(-1, x.shape[-1])).reshape(
                                    x.shape), w, b, A, R, B, s, g), {"grad_R"}),
    # The rank loop one column short: x A's last column is zero (forward), u = g Bᵀ's (backward).
    "last rank column (fwd)": ("forward", lambda x, w, b, A, R, B, s, g: (x, w, b, _zero_last_column(A), R, B, s, g),
                               {"y"}),
    "last rank column (bwd)": ("backward", lambda x, w, b, A, R, B, s, g: (x, w, b, A, R, _zero_last_row(B), s, g),
                               {"grad_x", "grad_R"}),
    "scaling applied twice (fwd)": ("forward", lambda x, w, b, A, R, B, s, g: (x, w, b, A, R, B, s * s, g), {"y"}),
    "scaling applied twice (bwd)": ("backward", lambda x, w, b, A, R, B, s, g: (x, w, b, A, R, B, s * s, g),
                                    {"grad_x", "grad_R"}),
    "R transposed (fwd)": ("forward", lambda x, w, b, A, R, B, s, g: (x, w, b, A, R.t().contiguous(), B, s, g), {"y"}),
    # grad_x's (u Rᵀ) Aᵀ with R in place of Rᵀ; grad_R = s·(x A)ᵀ u does not read R.
    "R transposed (bwd)": ("backward", lambda x, w, b, A, R, B, s, g: (x, w, b, A, R.t().contiguous(), B, s, g),
                           {"grad_x"}),
}


def _call(backend, x, w, b, A, R, B, s, g):
    """(y, grad_x, grad_R) of one call of the op, gradients by autograd with grad_out g."""
    xl = x.detach().clone().requires_grad_()
    Rl = R.detach().clone().requires_grad_()
    y = loraxs_linear(xl, w, b, A, Rl, B, s, backend=backend)
    gx, gR = torch.autograd.grad(y, (xl, Rl), g)
    return y.detach(), gx, gR


def _inputs(dtype, device, seed=0):
    x, w, b, A, R, B = make_inputs(LEAD, IN, OUT, RANK, dtype=dtype, device=device, seed=seed, requires_grad=False)
    g = torch.randn(*LEAD, OUT, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return (x, w, b, A, R, B), g.to(device=device, dtype=dtype)


def caught_by(backend, device, dtype, fault=None) -> dict[str, str]:
    """Run the layer with `fault` planted (None: the control) and return {check: failure message} for
    each of y, grad_x, grad_R whose per-element check against the reference raised."""
    inputs, g = _inputs(dtype, device)
    clean = _call(backend, *inputs, SCALING, g)
    outs = dict(zip(CHECKS, clean))
    if fault is not None:
        direction, perturb, _ = FAULTS[fault]
        faulty = _call(backend, *perturb(*inputs, SCALING, g))
        if direction == "forward":
            outs["y"] = faulty[0]
        else:
            outs["grad_x"], outs["grad_R"] = faulty[1], faulty[2]
    failed = {}
    for check in CHECKS:
        only = {c: (outs[c] if c == check else None) for c in CHECKS}
        try:
            assert_matches_reference(only["y"], only["grad_x"], only["grad_R"], inputs, SCALING, dtype,
                                     f"{backend} {dtype} {fault}", grad_out=g)
        except AssertionError as e:
            failed[check] = str(e)
    return failed


def visible_to(dtype, fault, factor=2.0) -> dict[str, float]:
    """{check: max over elements of |exact effect of the fault| / per-element tolerance} for the
    checks where that exceeds `factor`: the checks that must catch the fault whatever the rounding."""
    inputs, g = _inputs(dtype, "cpu")
    direction, perturb, reaches = FAULTS[fault]
    ref = reference_fp64(*inputs, SCALING, g)
    faulty = reference_fp64(*perturb(*inputs, SCALING, g))
    bounds = abs_bound_parts(*inputs, SCALING, g)
    strengths = {}
    for check, r, f, bound, depth in zip(CHECKS, ref, faulty, bounds, depths(IN, OUT, RANK, LEAD[0])):
        if check in reaches:
            strengths[check] = ((f - r).abs() / elementwise_tolerance(dtype, bound, depth)).max().item()
    return {c: v for c, v in strengths.items() if v > factor}


# ------------------------------------------------------------------------------------------- tests
@pytest.fixture(autouse=True)
def _bf16_on_the_interpreter(request):
    if request.node.callspec.params.get("backend_device") == ("triton", "cpu"):
        request.getfixturevalue("interpreter_bf16")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_device", BACKENDS)
def test_control_passes(backend_device, dtype):
    """No fault: every check passes (so a caught fault below is the fault, not the set-up)."""
    failed = caught_by(*backend_device, dtype)
    assert not failed, failed


@pytest.mark.parametrize("fault", list(FAULTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend_device", BACKENDS)
def test_fault_is_caught(backend_device, dtype, fault):
    """The planted fault fails every check it is visible to, and only checks it reaches (module doc)."""
    must = visible_to(dtype, fault)
    if not must:
        strength = visible_to(dtype, fault, factor=0.0)
        assert fault == "last token (grad_R sum)" and dtype in (torch.bfloat16, torch.float16), (
            f"{fault} is invisible in {dtype}: effect / tolerance {strength}")
        pytest.skip(f"one token of {LEAD[0]} in grad_R is {strength['grad_R']:.2f}× the {dtype} per-element tolerance "
                    "(the bound sums |x A||g Bᵀ| over the tokens): below what a sound per-element check can see")
    failed = caught_by(*backend_device, dtype, fault)
    reaches = FAULTS[fault][2]
    assert set(must) <= set(failed) <= reaches, (
        f"{fault}: caught by {sorted(failed)}; visible to {must} (effect / tolerance), reaches {sorted(reaches)}; "
        f"messages: {failed}")


# ------------------------------------------------------------------------------- report (not a test)
def margins(backend, device, dtype, shapes) -> dict[str, float]:
    """Worst error / per-element tolerance of y, grad_x and grad_R over `shapes` (1 = the whole allowance)."""
    worst = dict.fromkeys(CHECKS, 0.0)
    for seed, (lead, i, o, r) in enumerate(shapes):
        if lead[0] == 0 or (backend == "triton" and i * o * max(1, lead[0]) > 2**17):
            continue
        x, w, b, A, R, B = make_inputs(lead, i, o, r, dtype=dtype, device=device, seed=seed, requires_grad=False)
        g = torch.randn(*lead, o, generator=torch.Generator().manual_seed(seed + 7), dtype=torch.float64)
        g = g.to(device=device, dtype=dtype)
        got = _call(backend, x, w, b, A, R, B, 0.75, g)
        refs = reference_fp64(x, w, b, A, R, B, 0.75, g)
        bounds = abs_bound_parts(x, w, b, A, R, B, 0.75, g)
        for check, out, ref, bound, depth in zip(CHECKS, got, refs, bounds, depths(i, o, r, x.shape[:-1].numel())):
            worst[check] = max(worst[check], allowance_used(out.reshape(ref.shape), ref, bound, dtype, depth))
    return worst


MARGIN_SHAPES = SHAPES + [((33,), 72, 88, 20), ((9,), 128, 112, 100), ((600,), 288, 264, 256), ((64,), 512, 256, 64)]


def _main():
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import interpreter_bf16

    interpreter_bf16.install()
    names = [("torch", "cpu"), ("cpp", "cpu"), ("triton", "cpu")]
    names = [n for n in names if backends.unavailable_reason(n[0], torch.device(n[1])) is None]
    print(f"margins: worst |err| / tolerance over {len(MARGIN_SHAPES)} shapes, s = 0.75 "
          f"(C_BASE = {C_BASE}, C_LOW = {C_LOW}; 1.0 = the whole allowance)")
    print("| backend | dtype | y | grad_x | grad_R |\n|---|---|---|---|---|")
    for backend, device in names:
        for dtype in DTYPES:
            m = margins(backend, device, dtype, MARGIN_SHAPES)
            print(f"| {backend} | {str(dtype)[6:]} | " + " | ".join(f"{m[c]:.3f}" for c in CHECKS) + " |")
    print("\nmutations: the checks that failed (control: none)")
    print("| fault | dtype | " + " | ".join(b for b, _ in names) + " |\n|---|---|" + "---|" * len(names))
    for fault in [None] + list(FAULTS):
        for dtype in DTYPES:
            cells = [",".join(sorted(caught_by(b, d, dtype, fault))) or "—" for b, d in names]
            print(f"| {fault or 'control'} | {str(dtype)[6:]} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    torch.set_num_threads(1)
    _main()
