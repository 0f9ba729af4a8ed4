"""Many adapters behind one model: `python -m benchmarks --preset store`.

all-MiniLM-L6-v2 on the CPU, rank 8 on query/value, 256 device slots (apply_loraxs(...,
num_adapters=256)), an AdapterStore of N random adapters. A request stream draws each sequence's
user from a Zipf(1.1) popularity over the N users; a batch is 16 sequences × 16 tokens. Per batch
the store's `use` (LRU lookup, the misses' copy into the slots) and the forward are timed, and
interleaved with the same batch served by one adapter in two ways: the same bank model with every
row on slot 0 (what the store adds) and a single-adapter model (FusedLoRAXSLinear, no bank). A
noisy neighbour slows both of a pair, so the ratios are per pair, and the report gives the
throughput ratio (sum over pairs) and the median of the per-pair ratios.
Also: hit rate, evictions, host bytes per adapter (the packed rows, and the resident-set growth of
the process while the store was built, which includes the key index), cold-load time per adapter
(a prefetch of one non-resident key: from RAM, and for the file-backed store from a page-cache-cold
file), a training step of 16 users (use(train=True), forward + backward + SGD) against the same step
on the single-adapter model, build and reopen times of the file-backed store.
quick=True: N = 10³ only (seconds). Full: N = 10³, 10⁵, 10⁶ in RAM and 10⁶ file-backed; N = 10⁷
file-backed too when LORAXS_STORE_BIG=<folder> names a folder with room (31 GB fp32, 15 GB with
LORAXS_STORE_BIG_DTYPE=bf16; LORAXS_STORE_ONLY_BIG=1: that case alone); it is deleted afterwards.
Each record carries the 1-minute load average before and after it: on a shared machine the absolute
times say little, the paired ratios more.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .e2e_models import minilm

SLOTS, RANK, SEQS, TOKENS, ZIPF = 256, 8, 16, 16, 1.1
TARGETS = ["query", "value"]


def _minilm():
    return minilm(torch.device("cpu"))


def _rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def _zipf_stream(n: int, count: int, seed: int) -> np.ndarray:
    """count draws of users 0 … n-1, user k with probability ∝ (k+1)^-1.1."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -ZIPF)
    cdf /= cdf[-1]
    rng = np.random.default_rng(seed)
    return np.minimum(np.searchsorted(cdf, rng.random(count)), n - 1)


def _fill(store, layout_paths, n: int, log, block: int = 1 << 16) -> float:
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for start in range(0, n, block):
        k = min(block, n - start)
        store.put_many(range(start, start + k),
                       {p: torch.randn(k, RANK, RANK, generator=g) * 0.01 for p in layout_paths})
        if n >= 10**6 and (start // block) % 16 == 0:
            log(f"store: put {start + k:,}/{n:,} ({time.perf_counter() - t0:.0f} s)")
    return time.perf_counter() - t0


def _evict_page_cache(folder: Path) -> bool:
    ok = True
    for f in folder.glob("data-*.bin"):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            ok = False
        finally:
            os.close(fd)
    return ok


def _cold_load_ms(store, n: int, samples: int, seed: int) -> float:
    """Median ms of prefetch(key) for keys not resident (one adapter into its slot in every layer)."""
    rng = np.random.default_rng(seed)
    times = []
    for k in rng.choice(n, size=min(samples, n), replace=False).tolist():
        if k in store.slots.lru:
            continue
        t0 = time.perf_counter()
        store.prefetch([k])
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3 if times else float("nan")


def _serve(model, single, store, n, batches, warm, seed, log) -> dict:
    from loraxs_kernels import use_adapters
    users = _zipf_stream(n, (warm + batches) * SEQS, seed).reshape(-1, SEQS)
    g = torch.Generator().manual_seed(seed)
    one = torch.zeros(SEQS, dtype=torch.long)
    t_store, t_bank1, t_single = [], [], []
    with torch.no_grad():
        for b in range(warm + batches):
            ids = torch.randint(1000, 20000, (SEQS, TOKENS), generator=g)
            keys = users[b].tolist()
            if b == warm:
                s0 = dict(store.stats())
            t0 = time.perf_counter()
            with store.use(keys):
                model(input_ids=ids)
            t1 = time.perf_counter()
            with use_adapters(model, one):
                model(input_ids=ids)
            t2 = time.perf_counter()
            single(input_ids=ids)
            t3 = time.perf_counter()
            if b >= warm:
                t_store.append(t1 - t0)
                t_bank1.append(t2 - t1)
                t_single.append(t3 - t2)
    s1 = store.stats()
    hits, misses = s1["hits"] - s0["hits"], s1["misses"] - s0["misses"]
    # the time of use()'s placement step in batches with misses (lookup, eviction, the batched copy), per miss
    batched_cold = (s1["cold_load_s"] - s0["cold_load_s"]) / misses * 1e3 if misses else None
    ms = lambda xs, q: float(np.quantile(np.array(xs), q) * 1e3)  # noqa: E731
    return {
        "batches": batches, "hit_rate": hits / max(1, hits + misses), "misses_per_batch": misses / batches,
        "cold_load_ms_per_miss_in_batch": batched_cold,
        "evictions": s1["evictions"] - s0["evictions"],
        "p50_ms": ms(t_store, 0.5), "p99_ms": ms(t_store, 0.99),
        "p50_ms_one_adapter_bank": ms(t_bank1, 0.5), "p99_ms_one_adapter_bank": ms(t_bank1, 0.99),
        "p50_ms_single_model": ms(t_single, 0.5), "p99_ms_single_model": ms(t_single, 0.99),
        "seq_per_s": SEQS * batches / sum(t_store),
        "throughput_vs_bank1": sum(t_bank1) / sum(t_store), "throughput_vs_single": sum(t_single) / sum(t_store),
        "median_pair_ratio_vs_single": statistics.median(s / t for s, t in zip(t_single, t_store)),
    }


def _train(model, single, store, n, steps, seed) -> dict:
    users = _zipf_stream(n, steps * SEQS, seed + 7).reshape(-1, SEQS)
    g = torch.Generator().manual_seed(seed)
    single_params = [p for p in single.parameters() if p.requires_grad]
    t_store, t_single = [], []
    for b in range(steps + 2):
        ids = torch.randint(1000, 20000, (SEQS, TOKENS), generator=g)
        labels = torch.randint(0, 2, (SEQS,), generator=g)
        keys = users[b % steps].tolist()
        t0 = time.perf_counter()
        with store.use(keys, train=True) as batch:
            model(input_ids=ids, labels=labels).loss.backward()
            with torch.no_grad():
                for p in batch.parameters():
                    p -= 1e-3 * p.grad
        t1 = time.perf_counter()
        single(input_ids=ids, labels=labels).loss.backward()
        with torch.no_grad():
            for p in single_params:
                p -= 1e-3 * p.grad
                p.grad = None
        t2 = time.perf_counter()
        if b >= 2:
            t_store.append(t1 - t0)
            t_single.append(t2 - t1)
    return {"train_steps": steps, "train_ms_store": statistics.median(t_store) * 1e3,
            "train_ms_single": statistics.median(t_single) * 1e3,
            "train_cost_vs_single": sum(t_store) / sum(t_single)}


_FRESH = """
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch
torch.set_num_threads(1)
from benchmarks.store import _minilm, _rss, _zipf_stream, RANK, SLOTS, TARGETS
from loraxs_kernels import apply_loraxs
from loraxs_kernels.store import AdapterStore
model = _minilm()
apply_loraxs(model, rank=RANK, target_modules=TARGETS, num_adapters=SLOTS)
rss0 = _rss()
t0 = time.perf_counter()
store = AdapterStore.open(model, {folder!r})
reopen = time.perf_counter() - t0
rss1 = _rss()
for k in _zipf_stream({n}, 4096, 21).tolist():
    store.prefetch([k])
print(json.dumps({{"reopen_s": reopen, "rss_model": rss0, "rss_after_open": rss1, "rss_after_4096_loads": _rss(),
                  "adapters": len(store)}}))
"""


def _fresh_reopen(folder: Path, n: int) -> dict:
    """Reopen in a new process (what a server restart sees): time, and resident memory before and after
    the open and after 4,096 Zipf cold loads; the building process's freed Python objects do not count."""
    import subprocess
    import sys
    root = str(Path(__file__).resolve().parent.parent)
    out = subprocess.run([sys.executable, "-c", _FRESH.format(root=root, folder=str(folder), n=n)],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if out.returncode != 0:
        return {"fresh_error": out.stderr[-500:]}
    return {f"fresh_{k}": v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}


def _case(n: int, folder: Path | None, dtype, base, log, batches: int, warm: int) -> dict:
    import copy
    from loraxs_kernels import apply_loraxs
    from loraxs_kernels.store import AdapterStore
    model = copy.deepcopy(base)
    apply_loraxs(model, rank=RANK, target_modules=TARGETS, num_adapters=SLOTS)
    single = copy.deepcopy(base)
    apply_loraxs(single, rank=RANK, target_modules=TARGETS)
    gc.collect()
    rss0 = _rss()
    store = AdapterStore(model, path=folder, dtype=dtype)
    paths = store.layout.paths
    build_s = _fill(store, paths, n, log)
    if folder is not None:
        t0 = time.perf_counter()
        store.flush()
        build_s += time.perf_counter() - t0
    rss_built = _rss()
    rec = {"N": n, "file_backed": folder is not None, "dtype": str(dtype).replace("torch.", ""),
           "layers": len(paths), "slots": SLOTS, "build_s": build_s,
           "row_bytes": store.rows.row_bytes, "rss_growth_per_adapter": (rss_built - rss0) / n}
    if folder is not None:
        store.close()
        del store
        gc.collect()
        _evict_page_cache(folder)
        rec.update(_fresh_reopen(folder, n))
        cold_cache = _evict_page_cache(folder)
        t0 = time.perf_counter()
        store = AdapterStore.open(model, folder)
        rec["reopen_s"] = time.perf_counter() - t0
        rec["rss_after_reopen"] = _rss()
        rec["page_cache_evicted"] = cold_cache
        rec["cold_load_ms_disk"] = _cold_load_ms(store, n, 64, seed=3)
    else:
        rec["cold_load_ms_ram"] = _cold_load_ms(store, n, 64, seed=3)
    log(f"store: N={n:,} {'file' if folder else 'RAM'} built in {build_s:.1f} s; serving {batches} batches")
    rec.update(_serve(model, single, store, n, batches, warm, seed=11, log=log))
    rec.update(_train(model, single, store, n, steps=max(4, batches // 12), seed=5))
    st = store.stats()
    rec.update({"adapters": st["adapters"], "host_bytes": st["bytes"], "host_bytes_per_adapter": st["bytes"] / n,
                "rss_after": _rss()})
    store.close()
    del store, model, single
    gc.collect()
    log("store: " + json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}))
    return rec


def _fmt(v, nd=2):
    return "–" if v is None else (f"{v:,.{nd}f}" if isinstance(v, float) else f"{v:,}")


def _report(records, threads) -> str:
    lines = ["# store: many adapters behind one model (MiniLM, CPU)", "",
             f"rank {RANK} on {TARGETS}, {SLOTS} slots, Zipf({ZIPF}) users, batches of {SEQS}×{TOKENS} tokens, "
             f"torch threads {threads}. Throughput ratio = time of the same batches with one adapter / with the "
             "store (> 1: the store is faster); bank1 = the bank model with every row on slot 0, single = a "
             "FusedLoRAXSLinear model.", "",
             "| N | backing | hit rate | misses/batch | evictions | p50 ms (store / single) | p99 ms (store / single) "
             "| thr. vs single | thr. vs bank1 | cold load ms (one / per miss in batch) | host B/adapter (row / arrays / RSS growth) | train vs single "
             "| build s | reopen s | load avg |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        cold = r.get("cold_load_ms_disk", r.get("cold_load_ms_ram"))
        lines.append(
            f"| {r['N']:,} | {'file' if r['file_backed'] else 'RAM'} {r['dtype']} | {r['hit_rate']:.3f} | "
            f"{r['misses_per_batch']:.2f} | {r['evictions']:,} | {r['p50_ms']:.1f} / {r['p50_ms_single_model']:.1f} | "
            f"{r['p99_ms']:.1f} / {r['p99_ms_single_model']:.1f} | {r['throughput_vs_single']:.3f} | "
            f"{r['throughput_vs_bank1']:.3f} | {_fmt(cold, 3)} / {_fmt(r.get('cold_load_ms_per_miss_in_batch'), 3)} | {r['row_bytes']:,} / {r['host_bytes_per_adapter']:,.0f} / "
            f"{r['rss_growth_per_adapter']:,.0f} | {r['train_cost_vs_single']:.3f} | {r['build_s']:.1f} | "
            f"{_fmt(r.get('reopen_s'), 3)} | {r['loadavg_1min'][0]:.1f}→{r['loadavg_1min'][1]:.1f} |")
    for r in records:
        if "fresh_reopen_s" in r:
            lines += ["", f"N={r['N']:,} file-backed, reopened in a fresh process: {r['fresh_reopen_s']:.3f} s; resident "
                      f"set {r['fresh_rss_model'] / 2**30:.2f} GiB with the model, "
                      f"{r['fresh_rss_after_open'] / 2**30:.2f} GiB after the open, "
                      f"{r['fresh_rss_after_4096_loads'] / 2**30:.2f} GiB after 4,096 Zipf cold loads."]
    lines += ["", "Resident set: " + "; ".join(
        f"N={r['N']:,} {'file' if r['file_backed'] else 'RAM'}: {r['rss_after'] / 2**30:.2f} GiB at the end"
        + (f", {r['rss_after_reopen'] / 2**30:.2f} GiB after the reopen" if 'rss_after_reopen' in r else "")
        for r in records) + "."]
    lines += ["", "Cold load: median of prefetch(one non-resident key) — RAM rows, or for a file-backed store the "
              "rows after posix_fadvise(DONTNEED) on its files (page cache dropped when the kernel honours it)."]
    return "\n".join(lines) + "\n"


def run(device, out_dir, log=print, quick: bool = False) -> list[dict]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if torch.device(device).type != "cpu":
        log("store: the store preset measures MiniLM on the CPU; running it there")
    base = _minilm()
    cases = [(10**3, False, torch.float32)]
    if not quick:
        cases += [(10**5, False, torch.float32), (10**6, False, torch.float32), (10**6, True, torch.float32)]
    big = os.environ.get("LORAXS_STORE_BIG")
    if big and not quick:
        if os.environ.get("LORAXS_STORE_ONLY_BIG"):
            cases = []
        cases.append((10**7, True, torch.bfloat16 if os.environ.get("LORAXS_STORE_BIG_DTYPE") == "bf16"
                      else torch.float32))
    records = []
    for n, file_backed, dtype in cases:
        root = Path(big) if (file_backed and n >= 10**7) else None
        tmp = Path(tempfile.mkdtemp(prefix="loraxs-store-", dir=root)) if file_backed else None
        try:
            load_before = os.getloadavg()[0]
            records.append(_case(n, tmp / "users.lxs" if tmp else None, dtype, base, log,
                                 batches=20 if quick else 150, warm=5 if quick else 50))
            records[-1]["loadavg_1min"] = [load_before, os.getloadavg()[0]]
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    (out_dir / "store.json").write_text(json.dumps(records, indent=1))
    (out_dir / "store.md").write_text(_report(records, torch.get_num_threads()))
    return records
