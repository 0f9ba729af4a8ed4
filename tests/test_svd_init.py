"""The truncated SVD init (modules/svd_init.py): accuracy against the full SVD on weights with a
trained-like decaying spectrum, determinism, the fallback to the full SVD, and the basis kept on the
layer so save_adapter runs no SVD and load_adapter one per layer."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraxs_kernels import apply_loraxs
from loraxs_kernels.modules import svd_init
from loraxs_kernels.modules.svd_init import svd_basis


def _weight(out_f, in_f, alpha, seed=0, dtype=torch.float32):
    """W = U diag(σ) Vᵀ with σ_i = i^-alpha: a decaying spectrum like a trained layer's."""
    g = torch.Generator().manual_seed(seed)
    k = min(out_f, in_f)
    U = torch.linalg.qr(torch.randn(out_f, k, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(in_f, k, generator=g, dtype=torch.float64))[0]
    s = torch.arange(1, k + 1, dtype=torch.float64) ** -alpha
    return ((U * s) @ V.t()).to(dtype), s


def _errors(W, basis, s, rank):
    """(sin of the largest principal angle between the kept and the true top-r subspace of W's left
    space, ‖Wᵀ − A B‖_F / optimum − 1), in fp64 against W's exact SVD."""
    W64 = W.double()
    A, B = basis.A.double(), basis.B.double()
    U_kept = A / torch.linalg.vector_norm(A, dim=0)
    U_true = torch.linalg.svd(W64.t(), full_matrices=False)[0][:, :rank]
    # ‖(I − U_true U_trueᵀ) U_kept‖₂ = sin Θ_max, without the cancellation of √(1 − cos²).
    sin = float(torch.linalg.matrix_norm(U_kept - U_true @ (U_true.t() @ U_kept), ord=2))
    opt = float(torch.linalg.vector_norm(s[rank:]))
    excess = float(torch.linalg.vector_norm(W64.t() - A @ B)) / opt - 1
    return sin, excess


def _angle_bound(W, s, rank, full_sin, tol=None):
    """What the residual stop guarantees: every kept pair has ‖Wᵀ v_i − σ_i u_i‖ ≤ tol·σ_1 (and the other
    residual is rounding), so by Wedin's theorem sin Θ ≤ √(2r)·tol·σ_1 / (σ_r − σ_{r+1}); on top of
    it fp32's own rounding, measured here as the full fp32 SVD's error full_sin (a factor 2 for the
    rounding of the truncated path's own GEMMs)."""
    tol = svd_init.RESIDUAL_TOL if tol is None else tol
    n = max(W.shape)
    scaled = tol * max(1.0, n / 4096) ** 0.5
    return 2 * full_sin + (2 * rank) ** 0.5 * scaled * float(s[0]) / float(s[rank - 1] - s[rank])


def _full_svd_errors(W, s, rank, monkeypatch):
    """The same errors for the full fp32 SVD on this machine: the accuracy the truncated one must match."""
    with monkeypatch.context() as m:
        m.setattr(svd_init, "truncated_svd", lambda *a: None)
        return _errors(W, svd_basis(W, rank), s, rank)


# The random-start path is taken above GRAM_START_MAX; these sizes keep the full-SVD reference cheap, so
# the gram start is switched off to reach it (gram=False).
@pytest.mark.parametrize("shape", [(512, 384), (384, 640)])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
@pytest.mark.parametrize("gram", [True, False])
def test_truncated_matches_the_full_svd(shape, alpha, gram, monkeypatch):
    if not gram:
        monkeypatch.setattr(svd_init, "GRAM_START_MAX", 0)
    calls = []
    real = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda M, *a, **k: calls.append(tuple(M.shape)) or real(M, *a, **k))
    W, s = _weight(*shape, alpha)
    rank = 16
    b = svd_basis(W, rank)
    assert all(c == (svd_init.sketch_width(rank),) * 2 for c in calls), f"a large SVD ran: {calls}"
    sin, excess = _errors(W, b, s, rank)
    full_sin, _ = _full_svd_errors(W, s, rank, monkeypatch)
    assert sin <= _angle_bound(W, s, rank, full_sin), (sin, full_sin)
    assert excess < 1e-3, "‖W − A B‖ must be within 1e-3 (relative) of the optimum"
    sv = b.singular_values.double()
    assert len(sv) >= rank + 1
    # Ritz values are accurate to residual²/gap, far below fp32's own rounding of σ.
    assert (sv[: rank + 1] - s[: rank + 1]).abs().max() < 1e-5 * s[0]


def test_a_loose_stop_is_caught(monkeypatch):
    """Planted fault: a stop that accepts the first iterate (no convergence test) leaves an error the
    bound above catches."""
    W, s = _weight(512, 384, 0.5)
    full_sin, _ = _full_svd_errors(W, s, 16, monkeypatch)
    bound = _angle_bound(W, s, 16, full_sin)
    monkeypatch.setattr(svd_init, "GRAM_START_MAX", 0)
    monkeypatch.setattr(svd_init, "RESIDUAL_TOL", float("inf"))
    sin, excess = _errors(W, svd_basis(W, 16), s, 16)
    assert sin > bound and excess > 1e-3


def test_deterministic_and_leaves_the_global_rng_alone(monkeypatch):
    monkeypatch.setattr(svd_init, "GRAM_START_MAX", 0)
    W, _ = _weight(384, 512, 0.5, seed=3)
    state = torch.random.get_rng_state()
    a, b = svd_basis(W, 8), svd_basis(W, 8)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a.A, b.A) and torch.equal(a.B, b.B) and torch.equal(a.pivots, b.pivots)
    # Pivots recorded by one call reproduce its signs exactly.
    flipped = svd_basis(W, 8, pivots=a.A.abs().argmin(dim=0))
    assert torch.equal(svd_basis(W, 8, pivots=flipped.pivots).A, flipped.A)


def test_flat_spectrum_falls_back_to_the_full_svd(monkeypatch):
    """A Gaussian matrix has σ_{k+1}/σ_r ≈ 1: the iteration cannot converge in MAX_ITERATIONS, and the
    full SVD is taken instead (the result is then exactly the full SVD's)."""
    monkeypatch.setattr(svd_init, "GRAM_START_MAX", 0)
    monkeypatch.setattr(svd_init, "MAX_ITERATIONS", 3)
    W = torch.randn(300, 300, generator=torch.Generator().manual_seed(1))
    assert svd_init.truncated_svd(W.t(), 8) is None
    b = svd_basis(W, 8)
    U, S, Vh = torch.linalg.svd(W.t(), full_matrices=False)
    signs = torch.sign(U[b.pivots, torch.arange(8)])
    assert torch.equal(b.B, (Vh[:8] * signs[:, None]).contiguous())
    assert len(b.singular_values) == 300


def test_small_layers_take_the_full_svd(monkeypatch):
    monkeypatch.setattr(svd_init, "truncated_svd", lambda *a: pytest.fail("the sketch is most of the matrix"))
    b = svd_basis(torch.randn(40, 60), 8)  # min dim 40 < 2·(2·8 + 16)
    assert b.A.shape == (60, 8)


def test_fp64_is_worked_in_fp64():
    W, s = _weight(384, 384, 1.0, dtype=torch.float64)
    b = svd_basis(W, 8)
    assert b.A.dtype == torch.float64 and b.singular_values.dtype == torch.float64
    sin, excess = _errors(W, b, s, 8)
    assert sin < 1e-10 and abs(excess) < 1e-10


def _count_svds(monkeypatch):
    import loraxs_kernels.adapters.files as files
    calls = []
    real = svd_init.svd_basis

    def counted(*a, **k):
        calls.append(tuple(a[0].shape))
        return real(*a, **k)

    for mod in (svd_init, files):
        monkeypatch.setattr(mod, "svd_basis", counted)
    import loraxs_kernels.modules.linear as linear
    monkeypatch.setattr(linear, "svd_basis", counted)
    return calls


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(96, 128)
        self.down = nn.Linear(128, 96)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_save_runs_no_svd_and_load_one_per_layer(tmp_path, monkeypatch):
    from loraxs_kernels import load_adapter, save_adapter

    model = apply_loraxs(Net(), 4, ["up", "down"])
    with torch.no_grad():
        for m in (model.up, model.down):
            m.lora_R.normal_(0, 0.1)
    calls = _count_svds(monkeypatch)
    x = torch.randn(5, 96)
    with torch.no_grad():
        y = model(x)
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "b")
    assert calls == [], "save_adapter recomputed an SVD"
    loaded = load_adapter(Net(), tmp_path / "a")
    assert len(calls) == 2, "load_adapter: one SVD per layer"
    with torch.no_grad():
        assert torch.equal(loaded(x), y), "the same deterministic SVD gives the same basis"
    save_adapter(loaded, tmp_path / "c")
    assert len(calls) == 2, "a loaded layer keeps its basis too"
    # An edited basis is no longer the SVD's: the next save checks it (one SVD), and stores it.
    with torch.no_grad():
        model.up.lora_A.mul_(2)
    save_adapter(model, tmp_path / "d")
    assert len(calls) == 3


def test_truncated_basis_loads_a_file_saved_with_the_full_svd(tmp_path, monkeypatch):
    """Files saved before the truncated SVD hold pivots of the full SVD's basis: loading them with the
    truncated method must give the same layer outputs, to the SVD's own accuracy."""
    from loraxs_kernels import load_adapter, save_adapter

    W, _ = _weight(384, 512, 0.5, seed=7)
    base = nn.Sequential(nn.Linear(512, 384))
    with torch.no_grad():
        base[0].weight.copy_(W)
        base[0].bias.zero_()
    with monkeypatch.context() as m:
        m.setattr(svd_init, "truncated_svd", lambda *a: None)  # the old behaviour: full SVD only
        old = apply_loraxs(nn.Sequential(nn.Linear(512, 384)), 8, ["0"])
        with torch.no_grad():
            old[0].weight.copy_(W)
            old[0].bias.zero_()
        old[0].reset_adapter()
        with torch.no_grad():
            old[0].lora_R.normal_(0, 0.1)
        save_adapter(old, tmp_path / "old")
    new = load_adapter(base, tmp_path / "old")
    x = torch.randn(6, 512)
    with torch.no_grad():
        delta_old = old(x) - x @ W.t()
        delta_new = new(x) - x @ W.t()
    rel = float((delta_new - delta_old).norm() / delta_old.norm())
    assert rel < 1e-3, f"the adapter's effect moved by {rel:.3g}"
