"""Does `make cuda-emu` catch real faults? Delete one synchronisation or bound check at a time from a
scratch copy of csrc/cuda, rebuild the emulation from it, run the tests that exercise that kernel,
and record which check fired. Not part of CI (about a minute per mutation on 2 cores).

    .venv/bin/python scripts/cuda_emu_mutations.py [--only SUBSTRING] [--out build/cuda-emu/mutations.md]

Mutations: every `__syncthreads();` and every `cp_async_wait<N>();` in csrc/cuda/kernels/*.cuh
(found by scanning, so new ones are included automatically), the bound checks listed in BOUNDS
(each condition replaced by `true`, or the guarded statement made unconditional), and the planted
semantic faults in FAULTS (the many-adapter kernels: a row reading its neighbour's R, the transpose
flag ignored, a segment's last row dropped from grad_R, ...). tests/test_cuda_emu.py runs for the
files in TESTS, tests/test_cuda_emu_multi.py for those in MULTI_TESTS.
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
# The many-adapter kernels (issue 11): pytest -k over tests/test_cuda_emu_multi.py ids. A mutation in a
# file listed in both runs both selections.
MULTI_TESTS = {
    "multi.cuh": "test_multi_tiled or test_multi_racecheck or test_multi_no_adapter or test_multi_grad_r"
                 " or out_of_range or whatever_its_scaling",
    "adapters.cuh": "test_multi_tiled and (i32 or n300) or test_multi_decode",
    "decode.cuh": "test_multi_decode or test_multi_racecheck and decode",
}
TEST_FILES = [("tests/test_cuda_emu.py", TESTS), ("tests/test_cuda_emu_multi.py", MULTI_TESTS)]

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
    # Many adapters (multi.cuh, the decoding epilogue's per-row R).
    ("multi.cuh", "const bool row_ok = row < a.M;", "const bool row_ok = true;", 0),        # rows past M
    ("multi.cuh", "if (j < r) out[j] =", "out[j] =", 0),                                    # columns past r
    ("multi.cuh", "const bool row_ok = p < p_end;", "const bool row_ok = true;", 0),        # rows past a segment
    ("multi.cuh", "if (i < a.r && j < a.r)", "if (true)", 0),                              # grad_R tile edge
    ("multi.cuh", "const int64_t id = raw < a.n ? raw : -1;", "const int64_t id = raw;", 0),  # ids past the bank
]

# Planted semantic faults: (file, text, replacement, occurrence, what it models).
FAULTS = [
    ("multi.cuh", "const RT* Rk = static_cast<const RT*>(a.R) + id * a.s_rn;",
     "const RT* Rk = static_cast<const RT*>(a.R) + (row == 3 && id + 1 < a.n ? id + 1 : id) * a.s_rn;", 0,
     "the neighbouring adapter's R for row 3 (tiled t / v)"),
    ("multi.cuh", "const bool transposed = a.transpose_R;", "const bool transposed = false;", 0,
     "the transpose flag ignored (v = s·u R instead of s·u Rᵀ in the backward)"),
    ("multi.cuh", "p_end = a.seg[k + 1];", "p_end = a.seg[k + 1] - 1;", 0,
     "grad_R drops the last row of every adapter's segment"),
    ("multi.cuh", "adapter_scaling_of(a.scaling, a.adapter_scale, id)", "a.scaling", 0,
     "the per-adapter scaling ignored in t / v"),
    ("multi.cuh", "adapter_scaling_of(a.scaling, a.adapter_scale, k)", "a.scaling", 0,
     "the per-adapter scaling ignored in grad_R"),
    ("multi.cuh", "if (id < 0) {", "if (false) {", 0, "rows with id -1 not zeroed in t / v"),
    ("multi.cuh", "const Acc s = p_end > p_begin ? static_cast<Acc>(adapter_scaling_of(a.scaling, a.adapter_scale, k)) : Acc(0);",
     "const Acc s = static_cast<Acc>(adapter_scaling_of(a.scaling, a.adapter_scale, k));", 0,
     "an unused adapter's grad_R scaled by its (inf/NaN) scaling"),
    ("adapters.cuh", "return type == IndexType::kInt64 ?", "return true ?", 0, "int32 ids read as int64"),
    ("decode.cuh", "const RT* R = static_cast<const RT*>(a.R) + id * a.s_rn;",
     "const RT* R = static_cast<const RT*>(a.R) + (m == 0 ? id ^ 1 : id) * a.s_rn;", 0,
     "decoding epilogue: another adapter's R for row 0"),
    ("decode.cuh", "if (s_id[m] >= 0) {", "if (true) {", 0, "decoding epilogue: rows with id -1 get a low-rank term"),
    ("decode.cuh", "adapter_scaling_of(a.scaling, a.adapter_scale, id)", "a.scaling", 0,
     "decoding epilogue: the per-adapter scaling ignored"),
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
    for f, old, new, i, label in FAULTS:
        text = (CUDA / "kernels" / f).read_text()
        starts = [m.start() for m in re.finditer(re.escape(old), text)]
        if len(starts) <= i:
            raise SystemExit(f"mutation target not found (kernel changed?): {f}: {old!r}")
        line = text.count("\n", 0, starts[i]) + 1
        out.append((f, old, new, i, f"fault: {label} at {f}:{line}"))
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
            t0 = time.time()
            fired, failed, passed = {}, 0, 0
            for test_file, table in TEST_FILES:
                if f and f not in table:
                    continue
                sel = table[f] if f else " or ".join(f"({v})" for v in table.values())
                r = subprocess.run(
                    [PY, "-m", "pytest", test_file, "-q", "-rf", "-p", "no:cacheprovider", "-k", sel],
                    cwd=ROOT, env=dict(env, LORAXS_CUDA_EMU_KERNELS=str(scratch / "cuda" / "kernels")),
                    capture_output=True, text=True, timeout=1800,
                )
                fired_1, failed_1, passed_1 = classify(r.stdout + r.stderr)
                if r.returncode not in (0, 1):
                    fired_1 = {"pytest error": 1}
                    print(r.stdout[-3000:], r.stderr[-3000:], file=sys.stderr)
                if "other" in fired_1:
                    print(next(x for x in r.stdout.splitlines() if x.startswith("FAILED"))[:600], file=sys.stderr)
                for k, v in fired_1.items():
                    fired[k] = fired.get(k, 0) + v
                failed, passed = failed + failed_1, passed + passed_1
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
