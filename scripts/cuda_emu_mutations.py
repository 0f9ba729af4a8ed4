"""Does `make cuda-emu` catch real faults? Delete one synchronisation or bound check at a time from a
scratch copy of csrc/cuda, rebuild the emulation from it, run the tests that exercise that kernel,
and record which check fired. Not part of CI (about a minute per mutation on 2 cores).

    .venv/bin/python scripts/cuda_emu_mutations.py [--only SUBSTRING] [--out build/cuda-emu/mutations.md]

Mutations: every `__syncthreads();` and every `cp_async_wait<N>();` in csrc/cuda/kernels/*.cuh
(found by scanning, so new ones are included automatically), and the bound checks listed in BOUNDS
(each condition replaced by `true`, or the guarded statement made unconditional).
Checks, as tests/test_cuda_emu.py reports them: memcheck (ASan, alignment, the PTX twins' checks),
racecheck (TSan), sync (barrier / warp-op misuse, cp.async never retired), stale data (NaN from
never-written shared memory or workspace) and wrong result (outside the rounding bound).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA = ROOT / "csrc" / "cuda"
PY = os.environ.get("PYTHON", str(ROOT / ".venv" / "bin" / "python"))

# Tests per kernel file (pytest -k over tests/test_cuda_emu.py ids).
TESTS = {
    "gemm_mma.cuh": "test_gemm and f16 or test_racecheck and tiled and (float16 or bfloat16) or large_tile",
    "gemm_simt.cuh": "test_gemm and (f32 or f64) or test_racecheck and tiled and (float32 or float64)",
    "decode.cuh": "test_decode_every_split_count or test_racecheck and decode or test_layer_decode and (-M1_ or -M9_ or -M16_)",
    "grad_r.cuh": "test_grad_r_splits or test_racecheck_grad_r or test_racecheck and tiled and float32",
}

# (file, text, replacement, occurrence): bound checks removed.
BOUNDS = [
    ("gemm_mma.cuh", "if (gr < nrows && gk < K) {", "if (true) {", 0),                      # 16-byte P/Q copy, k-contig
    ("gemm_mma.cuh", "sm[r * LD + k] = (gr < nrows && gk < K) ?", "sm[r * LD + k] = true ?", 0),  # element copy, k-contig
    ("gemm_mma.cuh", "if (gk < K && gr < nrows) {", "if (true) {", 0),                      # 16-byte Q copy, n-contig
    ("gemm_mma.cuh", "sm[k * LD + r] = (gr < nrows && gk < K) ?", "sm[k * LD + r] = true ?", 0),  # element copy, n-contig
    ("gemm_mma.cuh", "if (n >= a.N) continue;", "", 0),                                     # epilogue columns
    ("gemm_mma.cuh", "if (m >= a.M) continue;", "", 0),                                     # epilogue rows
    ("gemm_mma.cuh", "if (has1) dst[a.s_cn] = v1;", "dst[a.s_cn] = v1;", 0),                # odd last column
    ("decode.cuh", "if (n < a.N) {", "if (true) {", 0),                                     # W rows, full chunk
    ("decode.cuh", "const uint32_t lo = k < k_left ? chunk_row[k] : 0u;", "const uint32_t lo = chunk_row[k];", 0),  # K tail
    ("decode.cuh", "if (m < M && n < a.N) {", "if (true) {", 0),                            # part_y store
    ("decode.cuh", "av[e] = (col_ok && k < k_end) ?", "av[e] = (k < k_end) ?", 0),          # A columns >= r
    ("decode.cuh", "if (n >= a.N) continue;", "", 0),                                       # epilogue columns
    ("gemm_simt.cuh", "s[k][r] = (gr < nrows && gk < K) ?", "s[k][r] = true ?", 0),         # tile copy
    ("gemm_simt.cuh", "if (m < a.M) C[", "C[", 0),                                          # epilogue rows
    ("grad_r.cuh", "sx[mm][cc] = (row_ok && i0 + cc < a.r) ?", "sx[mm][cc] = (i0 + cc < a.r) ?", 0),  # rows past the split
    ("grad_r.cuh", "if (i < a.r && jj < a.r) ws[", "ws[", 0),                               # partial store
    ("grad_r.cuh", "if (e >= rr) return;", "", 0),                                          # reduce tail
    # Not a bound check: the epilogue's griddepcontrol.wait (PDL), to show the worst-order launch.
    ("decode.cuh", "pdl_wait_primary();", "", 0),
]

CLASSES = [("memcheck", "cuda-emu memcheck"), ("racecheck", "cuda-emu racecheck"), ("sync", "cuda-emu sync"),
           ("stale data", "stale data"), ("wrong result", "wrong result"), ("runner", "cuda-emu runner")]


def mutations(only: str | None):
    out = []
    for f in sorted((CUDA / "kernels").glob("*.cuh")):
        text = f.read_text()
        for pat, label in ((r"__syncthreads\(\);", "delete __syncthreads"), (r"cp_async_wait<[^>;]+>\(\);", "delete cp_async_wait")):
            for m in re.finditer(pat, text):
                i = text.count(m.group(0), 0, m.start())  # occurrence of this exact text
                line = text.count("\n", 0, m.start()) + 1
                out.append((f.name, m.group(0), "", i, f"{label} ({m.group(0)}) at {f.name}:{line}"))
    for f, old, new, i in BOUNDS:
        text = (CUDA / "kernels" / f).read_text()
        starts = [m.start() for m in re.finditer(re.escape(old), text)]
        if len(starts) <= i:
            raise SystemExit(f"mutation target not found (kernel changed?): {f}: {old!r}")
        line = text.count("\n", 0, starts[i]) + 1
        what = "delete" if old.startswith("pdl_wait") else "remove bound check"
        out.append((f, old, new, i, f"{what} `{old}` at {f}:{line}"))
    return [m for m in out if not only or only in m[4]]


def apply(dst: Path, f: str, old: str, new: str, i: int) -> None:
    p = dst / "kernels" / f
    text = p.read_text()
    starts = [m.start() for m in re.finditer(re.escape(old), text)]
    s = starts[i]
    p.write_text(text[:s] + new + text[s + len(old):])


def classify(output: str) -> tuple[dict, int, int]:
    fired = {}
    failed = passed = 0
    for line in output.splitlines():
        if line.startswith("FAILED"):
            failed += 1
            for name, needle in CLASSES:
                if needle in line:
                    fired[name] = fired.get(name, 0) + 1
                    break
            else:
                fired["other"] = fired.get("other", 0) + 1
    m = re.search(r"(\d+) passed", output)
    passed = int(m.group(1)) if m else 0
    return fired, failed, passed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="run only mutations whose description contains this")
    ap.add_argument("--out", default=str(ROOT / "build" / "cuda-emu" / "mutations.md"))
    ap.add_argument("--start", type=int, default=0, help="resume: skip the baseline and the first START mutations")
    args = ap.parse_args()
    rows = []
    env = dict(os.environ, LORAXS_CUDA_EMU_TESTS="1", LORAXS_EMU_TIMEOUT="30", COLUMNS="2000")
    # The unmutated sources first: every selected test must pass, or the table means nothing.
    muts = [("", "", "", 0, "none (baseline)")] + mutations(args.only)
    if args.start:
        muts = muts[1 + args.start:]
    for f, old, new, i, desc in muts:
        scratch = Path(tempfile.mkdtemp(prefix="cuda-emu-mut-"))
        try:
            shutil.copytree(CUDA, scratch / "cuda", ignore=shutil.ignore_patterns("*.cpp"))
            if f:
                apply(scratch / "cuda", f, old, new, i)
            sel = TESTS[f] if f else " or ".join(f"({v})" for v in TESTS.values())
            t0 = time.time()
            r = subprocess.run(
                [PY, "-m", "pytest", "tests/test_cuda_emu.py", "-q", "-rf", "-p", "no:cacheprovider", "-k", sel],
                cwd=ROOT, env=dict(env, LORAXS_CUDA_EMU_KERNELS=str(scratch / "cuda" / "kernels")),
                capture_output=True, text=True, timeout=1800,
            )
            fired, failed, passed = classify(r.stdout + r.stderr)
            if r.returncode not in (0, 1):
                fired = {"pytest error": 1}
                print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
            if "other" in fired:
                print(next(x for x in r.stdout.splitlines() if x.startswith("FAILED"))[:600], file=sys.stderr)
            verdict = ", ".join(f"{k} ({v})" for k, v in fired.items()) or "NOT DETECTED"
            rows.append((desc, verdict, failed, passed, time.time() - t0))
            print(f"{desc}: {verdict}; {failed} failed, {passed} passed, {time.time() - t0:.0f} s", flush=True)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    lines = ["| mutation | checks that fired (failing tests) | failed | passed | s |", "|---|---|---|---|---|"]
    lines += [f"| {d} | {v} | {fl} | {p} | {t:.0f} |" for d, v, fl, p, t in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    base = rows[0] if not args.start else ("none (baseline)", "NOT DETECTED")
    missed = [d for d, v, *_ in rows if v == "NOT DETECTED" and d != "none (baseline)"]
    if base[1] != "NOT DETECTED":
        print("baseline failed: the unmutated kernels do not pass the selected tests", file=sys.stderr)
        return 1
    if missed:
        print("not detected:\n  " + "\n  ".join(missed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
