"""Shared test inputs and tolerances. Every backend is compared to the fp64 reference.

Two yardsticks:

- Per element (check_against_reference, assert_matches_reference; what every reference comparison of
  the suites uses): |out − ref| ≤ (C·u + depth·u_acc)·bound + (C + depth)·η, element by element, where
  bound is the output evaluated on absolute values (abs_bounds: |x||W|ᵀ + |b| + |s|·((|x||A|)|R|)|B|
  for y, and likewise for grad_x and grad_R), u the unit roundoff of the compute dtype (2^-53, 2^-24,
  2^-11, 2^-8 for fp64, fp32, fp16, bf16), u_acc that of the accumulator (fp32 for the 16-bit dtypes)
  and η the dtype's smallest subnormal. See elementwise_tolerance for C and depth.
- Global (assert_close without a bound): max|out − ref| ≤ TOL[dtype]·max|ref|, for comparisons that
  are not against the reference of the same inputs (compiled vs eager, autocast).
"""

from __future__ import annotations

import math

import torch

from loraxs_kernels import reference

TOL = {
    torch.float64: 1e-10,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}

# Unit roundoff u = 2^-p (half an ulp at 1) of the compute dtype, and the dtype every backend
# accumulates its dot products in (fp32 for the 16-bit dtypes: mma/wgmma, ATen's CPU GEMMs and the C++
# kernel all accumulate 16-bit products in fp32).
UNIT_ROUNDOFF = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
ACCUMULATOR = {torch.float64: torch.float64, torch.float32: torch.float32,
               torch.float16: torch.float32, torch.bfloat16: torch.float32}
SMALLEST_SUBNORMAL = {torch.float64: 2.0**-1074, torch.float32: 2.0**-149, torch.float16: 2.0**-24,
                      torch.bfloat16: 2.0**-133}

# C: the roundings to the compute dtype on the longest chain any backend runs, each erring by at
# most u times its share of the bound (to first order), counted separately for the base term
# (|x||W|ᵀ + |b|) and the low-rank term (|s|·((|x||A|)|R|)|B|), since every rounding inside the rank-r
# chain scales with the low-rank part only:
#   low-rank schedule (torch, cpp; M small): x A, (x A) R, ·s, ·B, the R cast (fp32 master R) → 5 low;
#     x Wᵀ + b → 1 base; y += (·) → 1 on both.                                       base 2, low 7
#   merged schedule (torch, cpp; M large): the R cast, R B or A R, A (R B), ·s → 4 low; W + (·) → 1 on
#     both (|x|·|W'| ≤ |x||W| + low-rank part); x W'ᵀ, + b → 2 on both.               base 3, low 7
#   Triton fused/split: x A, T = s·(x A) R (s folded into the fp32 accumulator), the R cast → 3 low;
#     the output store → 1 on both.                                                     base 1, low 4
# grad_x has the same chains on (g, W, Bᵀ, Rᵀ, Aᵀ); grad_R = s·(x A)ᵀ(g Bᵀ) has x A, g Bᵀ, ·s, the
# store (and an fp32 partial sum): low 4. Hence C_BASE = 3 and C_LOW = 7.
# Measured (`python tests/test_mutations.py` prints it; 11 shapes, r 1..256, in up to 512, torch, cpp and
# the Triton interpreter): the worst error used 0.22 of this allowance in bf16, 0.20 in fp16, 0.05 in
# fp32 and 0.04 in fp64 (there the accumulation term dominates). Rounding errors rarely all reach
# their bound at once; the count is what a correct backend may reach, not what it usually does.
# A fault shows only when it exceeds C·u of the bound in some element: about 3 % in bf16 (C_BASE), so
# a one-term fault is caught while the inner dimension is below ~1/(C·u) (≈ 85 in bf16); see
# tests/test_mutations.py.
C_BASE = 3
C_LOW = 7


def elementwise_tolerance(dtype: torch.dtype, bound, depth: int) -> torch.Tensor:
    """The largest error a correct backend may make in each element, for a result whose absolute-value
    evaluation is `bound` = (base part, low-rank part) (fp64 tensors, see abs_bound_parts; a single
    tensor counts as low-rank, the looser) and whose longest chain of nested sums has `depth` terms.

    (C·u + depth·u_acc)·part, summed over the parts: C roundings to the compute dtype (C_BASE, C_LOW),
    plus the accumulation of dot products, |fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γ_n·Σ|aᵢ||bᵢ| with γ_n ≈ n·u_acc, in
    any order of summation (blocked, split-K, tree: the bound holds for all); for a chain of products
    the γ of each inner dimension add (Higham, Accuracy and Stability of Numerical Algorithms, §3.5).
    For the 16-bit dtypes the accumulation term is 2^-16 of a rounding's per term: negligible below
    depths of tens of thousands. (C + depth)·η covers results in the subnormal range."""
    base, low = bound if isinstance(bound, tuple) else (torch.zeros_like(bound), bound)
    u = UNIT_ROUNDOFF[dtype]
    u_acc = UNIT_ROUNDOFF[ACCUMULATOR[dtype]]
    eta = SMALLEST_SUBNORMAL[dtype]
    return ((C_BASE * u + depth * u_acc) * base + (C_LOW * u + depth * u_acc) * low
            + (C_LOW + depth) * eta)


def depths(in_features: int, out_features: int, rank: int, M: int) -> tuple[int, int, int]:
    """Inner-product lengths summed along the longest chain of y, grad_x and grad_R:
    y = x·Wᵀ (in) or ((x A) R) B (in + r + r); grad_x = g·W (out) or ((g Bᵀ) Rᵀ) Aᵀ (out + 2r);
    grad_R = (x A)ᵀ (g Bᵀ) (in, out, and the M-long sum)."""
    return in_features + 2 * rank, out_features + 2 * rank, M + in_features + out_features


def assert_within_bound(actual, expected, bound, dtype, what="", depth=0):
    """|actual − expected| ≤ elementwise_tolerance(dtype, bound, depth), element by element.

    The message names the worst element (its index, error, allowance) and the worst ratio."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    err = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs()
    bound = tuple(t.detach().to(torch.float64).to(err.device) for t in bound) if isinstance(bound, tuple) \
        else bound.detach().to(torch.float64).to(err.device)
    allowed = elementwise_tolerance(dtype, bound, depth)
    # NaN in err (a NaN output) must fail: compare with `not (err <= allowed)`.
    bad = ~(err <= allowed)
    if bool(bad.any()):
        ratio = torch.nan_to_num(torch.where(bad, err / allowed, torch.zeros_like(err)), nan=math.inf)
        flat = int(ratio.reshape(-1).argmax())
        idx = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), err.shape))
        raise AssertionError(
            f"{what}: max error beyond the per-element tolerance in {int(bad.sum())} of {err.numel()} elements "
            f"({dtype}); worst at {idx}: |err| {err[idx].item():.3e} > {allowed[idx].item():.3e} allowed "
            f"(depth {depth}), {ratio[idx].item():.2f}× over")


def allowance_used(actual, expected, bound, dtype, depth) -> float:
    """max over elements of |actual − expected| / elementwise_tolerance: ≤ 1 passes (margins report)."""
    if expected.numel() == 0:
        return 0.0
    err = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs()
    return (err / elementwise_tolerance(dtype, bound, depth)).max().item()


# (leading dims of x, in, out, r): normal shapes first, then the weird ones.
SHAPES = [
    ((64,), 128, 96, 16),
    ((4, 33), 64, 80, 8),       # 3-D x
    ((1,), 48, 40, 4),          # M = 1 (decoding)
    ((17,), 31, 45, 1),         # odd sizes, r = 1
    ((2, 3, 5), 40, 24, 7),     # 4-D x, r not a power of two
    ((0,), 32, 16, 4),          # empty batch
    ((300,), 40, 30, 12),       # M large enough that the merged schedule runs
]


def make_inputs(lead=(64,), in_features=128, out_features=96, rank=16, dtype=torch.float32, device="cpu",
                bias=True, r_dtype=None, seed=0, requires_grad=True):
    """x ~ N(0, 1); W like nn.Linear; A, B from the SVD of Wᵀ (as the module builds them: A = U_r Σ_r,
    B = V_rᵀ, so the rank columns carry decreasing singular values); R ~ N(0, 1/r) so the low-rank term
    is of the same order as the base term and a wrong low-rank path shows.

    b ~ U(−1, 1): of the order of y itself (x Wᵀ has standard deviation ≈ 0.58 with this W), so a dropped
    or doubled bias is tens of percent of the per-element bound. nn.Linear's U(±1/√in) made it 0.4-0.5 %
    of max|y| at in = 4096 (issue 10), below every 16-bit tolerance."""
    from loraxs_kernels.modules.svd_init import svd_factors

    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(in_features)
    w = (torch.rand(out_features, in_features, generator=g, dtype=torch.float64) * 2 - 1) * bound
    b = (torch.rand(out_features, generator=g, dtype=torch.float64) * 2 - 1) if bias else None
    A, B = svd_factors(w, rank)
    x = torch.randn(*lead, in_features, generator=g, dtype=torch.float64)
    R = torch.randn(rank, rank, generator=g, dtype=torch.float64) / math.sqrt(rank)
    to = dict(device=device, dtype=dtype)
    x, w, A, B = x.to(**to), w.to(**to), A.to(**to), B.to(**to)
    b = b.to(**to) if b is not None else None
    R = R.to(device=device, dtype=r_dtype or dtype)
    x.requires_grad_(requires_grad)
    R.requires_grad_(requires_grad)
    return x, w, b, A, R, B


def reference_fp64(x, w, b, A, R, B, scaling, grad_out=None):
    """(y, grad_x, grad_R) of the reference in fp64, for inputs of any dtype."""
    d = lambda t: None if t is None else t.detach().to(torch.float64)  # noqa: E731
    x64, R64 = d(x).requires_grad_(), d(R).requires_grad_()
    y = reference.loraxs_linear(x64, d(w), d(b), d(A), R64, d(B), scaling)
    if grad_out is None:
        return y, None, None
    gx, gR = torch.autograd.grad(y, (x64, R64), d(grad_out))
    return y, gx, gR


def assert_close(actual, expected, dtype, what="", scale=None):
    """Global yardstick: max|actual - expected| <= TOL[dtype] * max(max|expected|, 1e-30).

    For comparisons that are not against the reference on the same inputs (compiled vs eager, merged
    layer vs fused layer, autocast). Reference comparisons use the per-element check
    (check_against_reference / assert_matches_reference), which catches one-element faults that this
    one misses. scale: a tensor (or float) whose max magnitude replaces max|expected|."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    if expected.numel() == 0:
        return
    err = (actual.detach().to(torch.float64) - expected.detach().to(torch.float64)).abs().max().item()
    if scale is None:
        scale = expected
    if isinstance(scale, torch.Tensor):
        scale = scale.detach().abs().max().item() if scale.numel() else 0.0
    scale = max(scale, 1e-30)
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3e} > {TOL[dtype]:.1e} * {scale:.3e} ({dtype})"


# ------------------------------------------------------------------------------------------------
# Additions for the core suite (test_op.py, test_native.py, test_properties.py, ...).

import os  # noqa: E402

import pytest  # noqa: E402

# Every dtype the op takes on CPU, widest first.
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def aten_op_names(fn) -> list[str]:
    """The names of the ops fn runs, in order, from the CPU profiler (one entry per call)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return [e.name for e in prof.events()]


def native_reason():
    """None when the C++ extension (backend "cpp") is loaded and has a CPU kernel, else why not."""
    from loraxs_kernels import backends

    return backends.unavailable_reason("cpp", torch.device("cpu"))


def allow_no_native() -> bool:
    """CI must never skip the C++ build silently: a missing extension fails the native tests unless
    LORAXS_ALLOW_NO_NATIVE=1 says that is expected on this machine."""
    return os.environ.get("LORAXS_ALLOW_NO_NATIVE") == "1"


def cpu_backends():
    """pytest params for the CPU backends: "torch" always, "cpp" unless it is missing and that is
    explicitly allowed (then skipped with the reason; otherwise it runs, and fails loudly)."""
    reason = native_reason()
    cpp_marks = [pytest.mark.skip(reason=reason)] if (reason is not None and allow_no_native()) else []
    return [pytest.param("torch", id="torch"), pytest.param("cpp", id="cpp", marks=cpp_marks)]


def run_fwd_bwd(fn, x, R, grad_out=None, seed=1):
    """y = fn(x, R); backward with grad_out (random N(0,1) of y's shape when None).
    Returns (y, grad_out, x.grad, R.grad); x and R are leaves that may or may not require grad."""
    x.grad = None
    R.grad = None
    y = fn(x, R)
    if grad_out is None:
        g = torch.Generator().manual_seed(seed)
        grad_out = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    if y.requires_grad:
        y.backward(grad_out)
    return y, grad_out, x.grad, R.grad


def abs_bounds(x, w, b, A, R, B, scaling, grad_out=None):
    """The textbook rounding-error yardsticks of y, grad_x and grad_R: each formula evaluated on
    absolute values (|fl(Σ aᵢbᵢ) − Σ aᵢbᵢ| ≤ γ·Σ|aᵢ||bᵢ|), in fp64.

        |y|     ≤ |x||W|ᵀ + |b| + |s|·((|x||A|)|R|)|B|
        |g_x|   ≤ |g||W| + |s|·((|g||B|ᵀ)|R|ᵀ)|A|ᵀ
        |g_R|   ≤ |s|·(|x||A|)ᵀ(|g||B|ᵀ)

    Shapes: y and grad_x like x's leading dims; grad_R (r, r). grad_x and grad_R are None without
    grad_out. These, not max|expected|, are the right yardstick where the result cancels: at
    r = min(in, out), A B = Wᵀ exactly, so R ≈ −I/s makes W + s·(A R B)ᵀ ≈ 0, and grad_R is a sum over
    M tokens of products of x A and g Bᵀ rounded to the compute dtype; any correct implementation then
    errs by ~u times these bounds, not times the result. Every merged-weight schedule is covered too:
    |x|·(|W| + |s|·|A||R||B|)ᵀ is the same sum (products of non-negative matrices associate).
    """
    d = lambda t: None if t is None else t.detach().to(torch.float64).abs()  # noqa: E731
    lead = x.shape[:-1]
    x2 = d(x).reshape(-1, w.shape[1])
    W, A_, R_, B_, s = d(w), d(A), d(R), d(B), abs(scaling)
    xa = x2 @ A_
    y = x2 @ W.t() + s * (xa @ R_) @ B_
    if b is not None:
        y = y + d(b)
    y = y.reshape(*lead, w.shape[0])
    if grad_out is None:
        return y, None, None
    g2 = d(grad_out).reshape(-1, w.shape[0])
    u = g2 @ B_.t()
    gx = (g2 @ W + s * (u @ R_.t()) @ A_.t()).reshape(*lead, w.shape[1])
    gR = s * xa.t() @ u
    return y, gx, gR


def abs_bound_parts(x, w, b, A, R, B, scaling, grad_out=None):
    """abs_bounds split into (base part, low-rank part) for y and grad_x, and (zeros, grad_R) for grad_R:
    y: (|x||W|ᵀ + |b|, |s|·((|x||A|)|R|)|B|); grad_x: (|g||W|, |s|·((|g||B|ᵀ)|R|ᵀ)|A|ᵀ).
    elementwise_tolerance allows different rounding counts on each (C_BASE, C_LOW)."""
    d = lambda t: None if t is None else t.detach().to(torch.float64).abs()  # noqa: E731
    lead = x.shape[:-1]
    x2 = d(x).reshape(-1, w.shape[1])
    W, A_, R_, B_, s = d(w), d(A), d(R), d(B), abs(scaling)
    xa = x2 @ A_
    y_base = x2 @ W.t()
    if b is not None:
        y_base = y_base + d(b)
    y_low = s * (xa @ R_) @ B_
    y = (y_base.reshape(*lead, w.shape[0]), y_low.reshape(*lead, w.shape[0]))
    if grad_out is None:
        return y, None, None
    g2 = d(grad_out).reshape(-1, w.shape[0])
    u = g2 @ B_.t()
    gx = ((g2 @ W).reshape(*lead, w.shape[1]), (s * (u @ R_.t()) @ A_.t()).reshape(*lead, w.shape[1]))
    gR_low = s * xa.t() @ u
    return y, gx, (torch.zeros_like(gR_low), gR_low)


def assert_matches_reference(y, grad_x, grad_R, inputs, scaling, dtype, what="", grad_out=None):
    """Per-element check of a backend's (y, grad_x, grad_R) against the fp64 reference of `inputs`
    (x, w, b, A, R, B as the backend saw them). Pass None for an output that was not computed;
    grad_out is required for the gradients."""
    x, w, b, A, R, B = inputs
    need_grads = grad_x is not None or grad_R is not None
    y_ref, gx_ref, gR_ref = reference_fp64(x, w, b, A, R, B, scaling, grad_out if need_grads else None)
    sy, sx, sR = abs_bound_parts(x, w, b, A, R, B, scaling, grad_out if need_grads else None)
    M = x.shape[:-1].numel()
    dy, dx, dR = depths(w.shape[1], w.shape[0], A.shape[1], M)
    if y is not None:
        assert_within_bound(y.reshape(y_ref.shape), y_ref, sy, dtype, f"{what} y", dy)
    if grad_x is not None:
        assert_within_bound(grad_x.reshape(gx_ref.shape), gx_ref, sx, dtype, f"{what} grad_x", dx)
    if grad_R is not None:
        # grad_R is computed in the layer's dtype and then stored in R's (an fp32 master R): the
        # layer's dtype sets the tolerance.
        assert_within_bound(grad_R, gR_ref, sR, dtype, f"{what} grad_R", dR)


def check_against_reference(fn, inputs, scaling, dtype, what="", grad_out=None, cancellation_safe=True):
    """fn(x, R) vs the fp64 reference: forward, grad_x and grad_R (when x / R require grad), each
    element within elementwise_tolerance of the abs_bounds yardstick.

    cancellation_safe: accepted for old callers and ignored; every comparison is per element against
    abs_bounds, which is safe where the result cancels (see abs_bounds)."""
    x, w, b, A, R, B = inputs
    y, g, gx, gR = run_fwd_bwd(fn, x, R, grad_out)
    assert y.dtype == x.dtype, f"{what}: output dtype {y.dtype} != x dtype {x.dtype}"
    if x.requires_grad:
        assert gx is not None and gx.dtype == x.dtype, f"{what}: grad_x {None if gx is None else gx.dtype}"
    if R.requires_grad:
        assert gR is not None and gR.dtype == R.dtype, f"{what}: grad_R {None if gR is None else gR.dtype}"
    assert_matches_reference(y, gx if x.requires_grad else None, gR if R.requires_grad else None, inputs, scaling,
                             dtype, what, grad_out=g)
    return y
