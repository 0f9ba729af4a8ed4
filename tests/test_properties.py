"""Property tests: random shapes, dtypes, bias, scaling and CPU backends, forward and backward,
against the fp64 reference. Hypothesis shrinks a failure to the smallest shape that shows it."""

from __future__ import annotations

import pytest
import torch

# The GPU image may lack hypothesis (no network there); CI and `make test` install it.
pytest.importorskip("hypothesis", reason="hypothesis is not installed (requirements/common.txt)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import loraxs_kernels
from common import allow_no_native, check_against_reference, make_inputs, native_reason

BACKENDS = ["torch"] + ([] if (native_reason() is not None and allow_no_native()) else ["cpp"])
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True)


@st.composite
def layers(draw):
    """(lead dims, in, out, r): lead dims 0..3 long with sizes 0..9 (so M = 0 and M = 1 occur),
    in/out 1..64, r 1..min(in, out)."""
    lead = tuple(draw(st.lists(st.integers(0, 9), min_size=0, max_size=3)))
    if not lead:
        lead = (draw(st.integers(0, 70)),)  # a longer single batch dim: reaches the merged schedule
    in_f = draw(st.integers(1, 64))
    out_f = draw(st.integers(1, 64))
    r = draw(st.integers(1, min(in_f, out_f)))
    return lead, in_f, out_f, r


scalings = st.one_of(st.just(0.0), st.just(1.0), st.floats(-4.0, 4.0, allow_nan=False, width=32))


def _check(backend, shape, dtype, bias, scaling, r_dtype=None, seed=0):
    lead, in_f, out_f, r = shape
    inputs = make_inputs(lead, in_f, out_f, r, dtype=dtype, bias=bias, r_dtype=r_dtype, seed=seed)
    x, w, b, A, R, B = inputs
    fn = lambda x, R: loraxs_kernels.loraxs_linear(x, w, b, A, R, B, scaling, backend=backend)  # noqa: E731
    # Per element against common.abs_bounds (not max|expected|): random tiny shapes can cancel
    # (r = min(in, out) with R ≈ -I/s, or grad_R summing to ~0).
    y = check_against_reference(fn, inputs, scaling, dtype, f"{backend} {shape} {dtype} bias={bias} s={scaling}")
    assert y.shape == (*lead, out_f)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=600, **SETTINGS)
@given(shape=layers(), dtype=st.sampled_from([torch.float32, torch.float64]), bias=st.booleans(),
       scaling=scalings, seed=st.integers(0, 2**16))
def test_parity_fp32_fp64(backend, shape, dtype, bias, scaling, seed):
    _check(backend, shape, dtype, bias, scaling, seed=seed)


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=250, **SETTINGS)
@given(shape=layers(), bias=st.booleans(), scaling=scalings, fp32_R=st.booleans(), seed=st.integers(0, 2**16))
def test_parity_bf16(backend, shape, bias, scaling, fp32_R, seed):
    _check(backend, shape, torch.bfloat16, bias, scaling, r_dtype=torch.float32 if fp32_R else None, seed=seed)
