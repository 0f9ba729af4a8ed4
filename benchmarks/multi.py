"""Many adapters in one batch (issue 11) on the CPU: `python -m benchmarks.multi`.

Case: fp32, x (M = 4096, 1024), a 1024×1024 layer with bias, r = 16, a bank of 1,000 adapters, ids
uniformly random in [0, 1000). Providers, timed interleaved (round i runs each once, in a rotated
order, so a burst of background load lands on all of them) and reported as medians:
  fused            the single-adapter op, loraxs_linear (the whole batch through one R): the goal's yardstick
  multi            loraxs_linear_multi: x Wᵀ and x A once, one small GEMM per adapter group
  loop             the single-adapter op run once per adapter on that adapter's rows
  peft_lora_mixed  PEFT LoRA (rank 16, 64 adapters) with `adapter_names=` (forward only: PEFT refuses
                   adapter_names in training mode)
Modes: forward (under no_grad) and forward+backward (x and R require grad, backward of a random
grad_out). `--memory` prints the bank's memory for 10,000 adapters of a 4096² layer instead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import loraxs_kernels
from loraxs_kernels.modules.svd_init import svd_factors


def build(M, d, r, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(d, d, generator=g) * 2 - 1) / d**0.5
    b = torch.rand(d, generator=g) * 2 - 1
    A, B = svd_factors(w, r)
    x = torch.randn(M, d, generator=g)
    R = torch.randn(n, r, r, generator=g) / r**0.5
    ids = torch.randint(0, n, (M,), generator=g)
    return x, w, b, A.contiguous(), R, B.contiguous(), ids


def loop(x, w, b, A, R, B, ids):
    """What a careful caller without the multi op writes: rows sorted by adapter once, then one
    single-adapter call per adapter present. x and R are split with one op each (split, unbind),
    whose backwards are one cat / stack: indexing x[rows] per adapter instead made each backward
    allocate an (M×in) zero tensor per adapter (measured: 13.9 s for fwd+bwd at 1,000 adapters)."""
    order = torch.argsort(ids, stable=True)
    adapters, counts = torch.unique_consecutive(ids[order], return_counts=True)
    xs = x.index_select(0, order).split(counts.tolist())
    Rs = R.unbind(0)
    outs = [loraxs_kernels.loraxs_linear(xk, w, b, A, Rs[k], B) for k, xk in zip(adapters.tolist(), xs)]
    return torch.cat(outs).index_select(0, torch.argsort(order))


def peft_mixed(x, w, b, n_adapters, r, seed=0):
    """A PEFT LoRA model over the same base layer with n_adapters rank-r adapters; returns a call."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(w.shape[1], w.shape[0]))
    with torch.no_grad():
        base[0].weight.copy_(w)
        base[0].bias.copy_(b)
    cfg = lambda: LoraConfig(r=r, lora_alpha=r, target_modules=["0"], init_lora_weights=False)  # noqa: E731
    model = get_peft_model(base, cfg(), adapter_name="a0")
    for i in range(1, n_adapters):
        model.add_adapter(f"a{i}", cfg())
    model.eval()
    g = torch.Generator().manual_seed(seed + 1)
    names = [f"a{i}" for i in torch.randint(0, n_adapters, (x.shape[0],), generator=g).tolist()]
    return lambda: model(x, adapter_names=names)


def measure(calls: dict, rounds: int) -> dict:
    for f in calls.values():  # warm-up, untimed
        f()
    times = {name: [] for name in calls}
    names = list(calls)
    for i in range(rounds):
        for name in names[i % len(names):] + names[: i % len(names)]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def run(M, d, r, n, peft_adapters, rounds):
    x, w, b, A, R, B, ids = build(M, d, r, n)
    R0 = R[0].clone()
    g = torch.randn(M, d, generator=torch.Generator().manual_seed(5))
    results = {}

    def fwd(name, f):
        def call():
            with torch.no_grad():
                return f(x, R0 if name == "fused" else R)
        return call

    def fwd_bwd(name, f):
        def call():
            xg, Rg = x.detach().requires_grad_(), (R0 if name == "fused" else R).detach().requires_grad_()
            f(xg, Rg).backward(g)
        return call

    makers = {
        "fused": lambda x, R: loraxs_kernels.loraxs_linear(x, w, b, A, R, B),
        "multi": lambda x, R: loraxs_kernels.loraxs_linear_multi(x, w, b, A, R, B, ids),
        "loop": lambda x, R: loop(x, w, b, A, R, B, ids),
    }
    calls = {k: fwd(k, f) for k, f in makers.items()}
    if peft_adapters:
        calls["peft_lora_mixed"] = peft_mixed(x, w, b, peft_adapters, r)
    results["forward"] = measure(calls, rounds)
    results["forward+backward"] = measure({k: fwd_bwd(k, f) for k, f in makers.items()}, rounds)
    return results


def memory_table(n=10_000, d=4096, ranks=(16, 64)):
    """Bytes of a bank of n adapters (n·r² numbers) beside the shared A, B (2·d·r) and the layer's weight
    (d²), in bf16 (2 bytes) and fp32 (4); and what n rank-r LoRA adapters (2·d·r numbers each) take."""
    rows = []
    for r in ranks:
        for name, size in (("bf16", 2), ("fp32", 4)):
            rows.append({"r": r, "dtype": name, "bank_MiB": n * r * r * size / 2**20,
                         "shared_A_B_MiB": 2 * d * r * size / 2**20, "weight_MiB": d * d * size / 2**20,
                         "lora_same_count_MiB": n * 2 * d * r * size / 2**20})
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--M", type=int, default=4096)
    p.add_argument("--features", type=int, default=1024)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--adapters", type=int, default=1000)
    p.add_argument("--peft-adapters", type=int, default=64, help="0 skips PEFT")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round: checks that it runs")
    p.add_argument("--memory", action="store_true", help="print the bank memory table and exit")
    p.add_argument("--out", default=None, help="write the raw times as JSON here")
    a = p.parse_args(argv)
    if a.memory:
        print(f"{'r':>3} {'dtype':>5} {'bank of 10,000':>15} {'shared A,B':>11} {'W 4096²':>8} {'10,000 LoRA':>12}")
        for row in memory_table():
            print(f"{row['r']:>3} {row['dtype']:>5} {row['bank_MiB']:>11.2f} MiB {row['shared_A_B_MiB']:>7.2f} MiB "
                  f"{row['weight_MiB']:>4.0f} MiB {row['lora_same_count_MiB']:>8.0f} MiB")
        return 0
    if a.smoke:
        a.M, a.features, a.rank, a.adapters, a.peft_adapters, a.rounds = 64, 32, 4, 10, 2, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    res = run(a.M, a.features, a.rank, a.adapters, a.peft_adapters, a.rounds)
    print(f"M={a.M} in=out={a.features} r={a.rank} adapters={a.adapters} fp32 CPU, {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.2f}, {a.rounds} rounds")
    for mode, times in res.items():
        print(f"{mode}:")
        for name, ts in times.items():
            per_round = [t / f for t, f in zip(ts, times["fused"])]
            print(f"  {name:<16} median {1e3 * statistics.median(ts):9.2f} ms   "
                  f"× fused (median of per-round ratios) {statistics.median(per_round):6.3f}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"args": vars(a), "times_s": res}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
