"""Write the table that "auto" uses to choose between the GPU backends (Triton, CUDA C++, and "torch":
cuBLAS through the ATen schedule).

    python -m loraxs_kernels.tools.tune_auto benchmarks/results/<run>/results.json [--table PATH]

Reads a benchmark run (python -m benchmarks) made on a GPU, and for each (GPU, dtype, M bucket, rank
bucket) records the backend with the lowest geometric-mean `full`-mode (forward + backward) median
time over the layer shapes of that bucket measured with the same backends (at least two). Entries for other
GPUs already in the table are kept. Prints each choice with the measured ratio.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

from ..backends import auto_table

CANDIDATES = ("triton", "cuda", "torch")


def choices_from_run(run: dict) -> dict[str, dict]:
    """{table key: {"backend": name, "over_best": {backend: geometric-mean time / the best's}, "cases": n}}
    (plus "cuda_over_triton" where only those two were measured)."""
    device_name = run["environment"]["device_name"]
    # (bucket key, layer shape) -> {backend: median_ms}
    times: dict[tuple, dict[str, float]] = defaultdict(dict)
    for rec in run["records"]:
        if rec["mode"] != "full" or rec["provider"] not in CANDIDATES or rec.get("median_ms") is None:
            continue
        k = auto_table.key(device_name, rec["dtype"], rec["M"], rec["rank"])
        times[(k, rec["M"], rec["in_features"], rec["out_features"], rec["rank"])][rec["provider"]] = rec["median_ms"]
    by_bucket: dict[str, list[dict[str, float]]] = defaultdict(list)
    for (k, *_), by_backend in times.items():
        if len(by_backend) >= 2:  # a shape measured with one backend decides nothing
            by_bucket[k].append(by_backend)
    out = {}
    for k, shapes in sorted(by_bucket.items()):
        # Only backends measured on every shape of the bucket compete, on equal terms.
        common = [b for b in CANDIDATES if all(b in s for s in shapes)]
        if len(common) < 2:
            continue
        log_mean = {b: sum(math.log(s[b]) for s in shapes) / len(shapes) for b in common}
        best = min(common, key=log_mean.__getitem__)
        entry = {"backend": best, "over_best": {b: round(math.exp(log_mean[b] - log_mean[best]), 4) for b in common},
                 "cases": len(shapes)}
        if set(common) == {"triton", "cuda"}:
            entry["cuda_over_triton"] = round(math.exp(log_mean["cuda"] - log_mean["triton"]), 4)
        out[k] = entry
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", help="results.json of a GPU benchmark run")
    ap.add_argument("--table", default=auto_table.TABLE_PATH, help="the table to update (default: the package's)")
    args = ap.parse_args(argv)
    with open(args.results) as f:
        run = json.load(f)
    measured = choices_from_run(run)
    if not measured:
        print("no shape was measured with two or more of 'triton', 'cuda', 'torch' in full mode: table left unchanged")
        return 1
    try:
        with open(args.table) as f:
            table = json.load(f)
    except FileNotFoundError:
        table = {}
    choices = {k: v for k, v in table.get("choices", {}).items() if not k.startswith(run["environment"]["device_name"] + "|")}
    details = table.get("details", {})
    for k, v in measured.items():
        choices[k] = v["backend"]
        details[k] = v
        ratios = ", ".join(f"{b} {r:.3f}×" for b, r in v["over_best"].items())
        print(f"{k}: {v['backend']}  (time / best: {ratios}; {v['cases']} shape(s))")
    table = {
        "source": f"python -m loraxs_kernels.tools.tune_auto {args.results}",
        "choices": dict(sorted(choices.items())),
        "details": dict(sorted(details.items())),
    }
    with open(args.table, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
