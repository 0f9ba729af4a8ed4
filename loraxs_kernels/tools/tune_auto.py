"""Write the table that "auto" uses to choose between the Triton and CUDA C++ backends on a GPU.

    python -m loraxs_kernels.tools.tune_auto benchmarks/results/<run>/results.json [--table PATH]

Reads a benchmark run (python -m benchmarks) made on a GPU with both backends, and for each
(GPU, dtype, M bucket, rank bucket) records the backend with the lower geometric-mean `full`-mode
(forward + backward) median time over the layer shapes measured in that bucket. Entries for other
GPUs already in the table are kept. Prints each choice with the measured ratio.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict

from ..backends import auto_table

CANDIDATES = ("triton", "cuda")


def choices_from_run(run: dict) -> dict[str, dict]:
    """{table key: {"backend": name, "cuda_over_triton": geometric-mean time ratio, "cases": n}}."""
    device_name = run["environment"]["device_name"]
    # (bucket key, layer shape) -> {backend: median_ms}
    times: dict[tuple, dict[str, float]] = defaultdict(dict)
    for rec in run["records"]:
        if rec["mode"] != "full" or rec["provider"] not in CANDIDATES or rec.get("median_ms") is None:
            continue
        k = auto_table.key(device_name, rec["dtype"], rec["M"], rec["rank"])
        times[(k, rec["M"], rec["in_features"], rec["out_features"], rec["rank"])][rec["provider"]] = rec["median_ms"]
    log_ratios: dict[str, list[float]] = defaultdict(list)
    for (k, *_), by_backend in times.items():
        if all(b in by_backend for b in CANDIDATES):  # only shapes measured with both backends
            log_ratios[k].append(math.log(by_backend["cuda"] / by_backend["triton"]))
    out = {}
    for k, logs in sorted(log_ratios.items()):
        ratio = math.exp(sum(logs) / len(logs))
        out[k] = {"backend": "cuda" if ratio < 1 else "triton", "cuda_over_triton": round(ratio, 4), "cases": len(logs)}
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
        print("no shape was measured with both 'triton' and 'cuda' in full mode: table left unchanged")
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
        print(f"{k}: {v['backend']}  (cuda/triton time {v['cuda_over_triton']:.3f} over {v['cases']} shape(s))")
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
