"""The `init` preset: what setting up and storing an adapter costs (issue 18, item 3).

- the SVD init of one layer: svd_basis (truncated: top r triplets by subspace iteration with a
  Rayleigh–Ritz stop, modules/svd_init.py) against torch.linalg.svd (the full SVD it replaced), on
  weights with a decaying spectrum (σ_i ∝ i^-½ over the first 1024, as trained layers have), with
  the accuracy of the truncated one (largest principal angle to the full SVD's subspace; ‖W − A B‖
  over the optimum ‖W − W_r‖);
- all-MiniLM-L6-v2: apply_loraxs(model, 8, "all-linear") (37 layers), save_adapter, load_adapter.

Timings are wall clock (time.perf_counter), the best of `reps` runs; each record carries the 1-minute
load average before and after it, since other jobs on a shared CPU move them.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .e2e_models import minilm

RANK = 16
SHAPES = [(1024, 1024), (4096, 4096), (4096, 14336)]
QUICK_SHAPES = [(512, 512), (1024, 1024)]
FULL_SVD_MAX_NUMEL = 4096 * 4096  # 4096×14336 with the full SVD would take minutes here: not run


def _decaying_weight(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """W = G₁ diag(σ) G₂ᵀ / √(out·in) with Gaussian G's and σ_i = i^-½ for i ≤ 1024, plus a noise floor
    of 1e-3: nearly orthogonal G's give a spectrum close to σ, with no n³ QR to build it."""
    g = torch.Generator().manual_seed(seed)
    k = min(1024, out_f, in_f)
    s = torch.arange(1, k + 1, dtype=torch.float32) ** -0.5
    G1 = torch.randn(out_f, k, generator=g) / out_f**0.5
    G2 = torch.randn(in_f, k, generator=g) / in_f**0.5
    return (G1 * s) @ G2.t() + 1e-3 * torch.randn(out_f, in_f, generator=g) / max(out_f, in_f) ** 0.5


def _best(fn, reps: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def _load() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _svd_case(shape, rank, device, reps, log) -> dict:
    from loraxs_kernels.modules.svd_init import svd_basis

    W = _decaying_weight(*shape).to(device)
    rec = {"case": "svd_init", "shape": list(shape), "rank": rank, "device": str(device), "load_before": _load()}
    t_trunc, basis = _best(lambda: svd_basis(W, rank), reps)
    rec["truncated_s"] = t_trunc
    if W.numel() <= FULL_SVD_MAX_NUMEL:
        t_full, (U, S, _) = _best(lambda: torch.linalg.svd(W.t(), full_matrices=False), 1)
        rec["full_s"] = t_full
        U_r = U[:, :rank].double()
        U_kept = (basis.A / torch.linalg.vector_norm(basis.A, dim=0)).double()
        rec["sin_angle"] = float(torch.linalg.matrix_norm(U_kept - U_r @ (U_r.t() @ U_kept), ord=2))
        opt = float(torch.linalg.vector_norm(S[rank:].double()))
        rec["excess_rel"] = float(torch.linalg.vector_norm(W.t().double() - basis.A.double() @ basis.B.double())) / opt - 1
    else:
        rec["full_s"] = None
    rec["load_after"] = _load()
    log(f"init: svd {shape} r={rank}: truncated {t_trunc:.3f} s, full "
        f"{'-' if rec['full_s'] is None else format(rec['full_s'], '.2f') + ' s'}")
    return rec


def _minilm():
    return minilm(torch.device("cpu"))


def _minilm_cases(reps, log) -> list[dict]:
    from loraxs_kernels import apply_loraxs, load_adapter, save_adapter

    base = _minilm()
    recs = []
    rec = {"case": "minilm_apply_all_linear", "rank": 8, "load_before": _load()}
    copies = [copy.deepcopy(base) for _ in range(reps)]
    t, model = _best(lambda: apply_loraxs(copies.pop(), 8, "all-linear", modules_to_save=["classifier"]), reps)
    rec.update(seconds=t, layers=sum(hasattr(m, "lora_R") for m in model.modules()), load_after=_load())
    recs.append(rec)
    log(f"init: MiniLM apply_loraxs all-linear ({rec['layers']} layers): {t:.3f} s")
    tmp = Path(tempfile.mkdtemp(prefix="loraxs-init-"))
    try:
        rec = {"case": "minilm_save_adapter", "load_before": _load()}
        try:
            rec["seconds"], _ = _best(lambda: save_adapter(model, tmp / "ad"), reps)
        except Exception as e:  # noqa: BLE001 - the record says what failed instead of losing the run
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["load_after"] = _load()
        recs.append(rec)
        rec = {"case": "minilm_load_adapter", "load_before": _load()}
        try:
            fresh = [copy.deepcopy(base) for _ in range(reps)]
            rec["seconds"], _ = _best(lambda: load_adapter(fresh.pop(), tmp / "ad"), reps)
        except Exception as e:  # noqa: BLE001
            rec["error"] = f"{type(e).__name__}: {e}"
        rec["load_after"] = _load()
        recs.append(rec)
        for r in recs[-2:]:
            log(f"init: MiniLM {r['case']}: " + (f"{r['seconds']:.3f} s" if "seconds" in r else r["error"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return recs


def _report(records, env) -> str:
    lines = ["# init: SVD initialisation, adapter save/load", "",
             f"{env['cpu']}; torch {env['torch']}, {env['threads']} threads; peft {env['peft']}; {env['when']}", "",
             "| case | shape | rank | truncated (s) | full SVD (s) | speed-up | sin angle | ‖W−AB‖/opt − 1 | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    f = lambda v, fmt: "-" if v is None else format(v, fmt)
    for r in records:
        if r["case"] == "svd_init":
            sp = r["full_s"] / r["truncated_s"] if r["full_s"] else None
            lines.append(f"| svd_basis | {r['shape'][0]}×{r['shape'][1]} | {r['rank']} | {r['truncated_s']:.3f} | "
                         f"{f(r['full_s'], '.2f')} | {f(sp, '.1f')} | {f(r.get('sin_angle'), '.1e')} | "
                         f"{f(r.get('excess_rel'), '.1e')} | {r['load_before']:.1f}→{r['load_after']:.1f} |")
    lines += ["", "| MiniLM case | seconds | note | load avg |", "|---|---:|---|---|"]
    for r in records:
        if r["case"].startswith("minilm"):
            note = f"{r['layers']} layers, rank {r['rank']}" if "layers" in r else r.get("error", "")
            lines.append(f"| {r['case']} | {f(r.get('seconds'), '.3f')} | {note} | "
                         f"{r['load_before']:.1f}→{r['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def run(device, out_dir, log=print, quick: bool = False) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    from . import __main__ as cli

    env = {"cpu": cli.device_name(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "peft": cli._version("peft"), "git_commit": cli._git_commit(), "python": platform.python_version(),
           "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    reps = 1 if quick else 3
    records = [_svd_case(shape, RANK if not quick else 8, device, reps, log)
               for shape in (QUICK_SHAPES if quick else SHAPES)]
    records += _minilm_cases(reps, log)
    for r in records:
        r["environment"] = env
    (out_dir / "init.json").write_text(json.dumps(records, indent=1))
    (out_dir / "init.md").write_text(_report(records, env))
    return records
