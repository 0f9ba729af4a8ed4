"""Compile every Triton kernel of the "triton" backend, in every autotune config, for Ampere (sm_80)
and Hopper (sm_90) with no GPU, and report what the compiler made of it.

    python -m loraxs_kernels.tools.aot_report [--check] [--dtypes fp16,bf16,fp32] [--jobs N] > report.json

stdout: a JSON list, one object per compiled variant (kernel, mode, arch, dtype, r, config, num_warps,
num_stages, precision, registers, spills, stack, shared_bytes, shared_limit, uses_wgmma, uses_mma_sync,
has_dot, compile_s, problems). stderr: a per-kernel summary.

Each variant is built from the launcher's own argument builders (forward_launch_args, ... in
backends/triton/__init__.py) applied to meta tensors of the goal shapes (M = 8192 or 16,
in = out = 4096), then specialised the way triton.jit would specialise those arguments (integers
equal to 1 become constants, multiples of 16 and tensor pointers get 16-divisibility), so the cubin
is the one the GPU would run for that shape.

Registers and spills come from `cuobjdump --dump-resource-usage` (the copy in Triton's wheel) on
the cubin: REG is the register count, LOCAL the per-thread local memory in bytes, which in these
kernels (no local arrays, no calls) only spills produce. Shared memory is the compiled kernel's
metadata.

--check exits 1 on any compile error, any spill, any variant over the arch's shared memory
(sm_80: 163 KiB, sm_90: 227 KiB), and any sm_90 fp16/bf16 variant with a tl.dot whose PTX lacks
wgmma (sum_splits_kernel has no dot: it is a plain fp32 sum; variants with rows tiles under 64 carry
their reason in `wgmma_exempt`: the many-adapter per-row kernel at RP > 64 or few rows, the
segmented grad_R at r < 64).

The many-adapter kernels (backends/triton/multi.py) are compiled with the fixed configs they run
(multi_variants): x_p_per_row_q_kernel, gemm_rank_r_kernel with T_GIVEN (shown as
gemm_rank_r_kernel+T), grad_r_segments_kernel, with R a bank of 1,000 (prefill) or 10,000 (decode)
adapters.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

# The report compiles real GPU code; under the interpreter triton.jit would hand back interpreted
# functions that triton.compile cannot take.
os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from loraxs_kernels.backends import triton as tb  # noqa: E402
from loraxs_kernels.backends.triton import configs  # noqa: E402
from loraxs_kernels.backends.triton import multi  # noqa: E402
from loraxs_kernels.backends.triton.gemm_rank_r import gemm_rank_r_kernel  # noqa: E402
from loraxs_kernels.backends.triton.grad_r import sum_splits_kernel, xa_t_u_splits_kernel  # noqa: E402
from loraxs_kernels.backends.triton.grad_r_segments import grad_r_segments_kernel  # noqa: E402
from loraxs_kernels.backends.triton.low_rank_projection import x_p_kernel  # noqa: E402
from loraxs_kernels.backends.triton.per_row_r import x_p_per_row_q_kernel  # noqa: E402

ARCHS = {  # name: (compute capability, warp size, shared memory per block, bytes)
    "sm80": (80, 32, 163 * 1024),
    "sm90": (90, 64, 227 * 1024),
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
                torch.int32: "i32", torch.int64: "i64"}
KERNELS = {
    "gemm_rank_r_kernel": gemm_rank_r_kernel,
    "x_p_kernel": x_p_kernel,
    "xa_t_u_splits_kernel": xa_t_u_splits_kernel,
    "sum_splits_kernel": sum_splits_kernel,
    "x_p_per_row_q_kernel": x_p_per_row_q_kernel,
    "grad_r_segments_kernel": grad_r_segments_kernel,
}
GOAL_M = {"gemm": 8192, "decode": 16}
# Many adapters (backends/triton/multi.py): the decode goal is M = 64 rows over 64 adapters of
# 10,000 resident; prefill M = 8192 over 1,000.
MULTI_M = {"gemm": 8192, "decode": 64}
MULTI_N = {"gemm": 1000, "decode": 10000}
GOAL_IN = GOAL_OUT = 4096
RANK_OF_CLASS = {"r64": 64, "r256": 256}  # the largest padded rank of each class: the most registers
WGMMA_DTYPES = ("fp16", "bf16")


# ------------------------------------------------------------------------------------- variants
def _precisions(dt: str) -> list[str]:
    # fp32: "tf32" (the tuned path, torch.backends.cuda.matmul.allow_tf32) and "ieee" (torch's default).
    return ["tf32", "ieee"] if dt == "fp32" else ["ieee"]


def variants(dtypes: list[str]) -> list[dict]:
    """Every (kernel, mode, arch, dtype, config) the backend can launch on these archs, at the goal shapes."""
    out = []

    def add(**v):
        out.append(v)

    for arch in ARCHS:
        for dt in dtypes:
            esize = DTYPES[dt].itemsize
            for precision in _precisions(dt):
                for regime in configs.REGIMES:
                    for schedule in configs.SCHEDULES:
                        r = 64 if schedule == "fused" else 256  # the largest rank each schedule runs
                        for cfg in configs.gemm_configs(arch, regime, schedule, esize, precision):
                            for mode in ("fwd", "bwd"):
                                add(kernel="gemm_rank_r_kernel", mode=mode, schedule=schedule, arch=arch, dtype=dt,
                                    r=r, M=GOAL_M[regime], regime=regime, config=cfg.as_dict(), precision=precision)
                for rclass, r in RANK_OF_CLASS.items():
                    for cfg in configs.proj_configs(arch, rclass, esize, precision):
                        add(kernel="x_p_kernel", mode="fwd", arch=arch, dtype=dt, r=r, M=GOAL_M["gemm"],
                            config=cfg.as_dict(), precision=precision)
            precision = _precisions(dt)[0]
            first = configs.gemm_configs(arch, "gemm", "fused", esize, precision)[0].as_dict()
            # The goal rank r = 16, and an fp32 master R beside 16-bit weights.
            extra = [("fwd", 16, dt), ("bwd", 16, dt)] + ([("fwd", 64, "fp32")] if dt in WGMMA_DTYPES else [])
            for mode, r, r_dtype in extra:
                add(kernel="gemm_rank_r_kernel", mode=mode, schedule="fused", arch=arch, dtype=dt, r=r,
                    M=GOAL_M["gemm"], regime="gemm", config=first, precision=precision, r_dtype=r_dtype)
            # The projection in the backward: U = g Bᵀ.
            add(kernel="x_p_kernel", mode="bwd", arch=arch, dtype=dt, r=64, M=GOAL_M["gemm"],
                config=configs.proj_configs(arch, "r64", esize, precision)[0].as_dict(), precision=precision)
            for prec in _precisions(dt):
                for r in (16, 64, 256):
                    for final in (True, False):
                        add(kernel="xa_t_u_splits_kernel", mode="final" if final else "partials", arch=arch,
                            dtype=dt, r=r, M=GOAL_M["gemm"], precision=prec,
                            config=dict(num_warps=configs.grad_r_num_warps(esize, prec),
                                        num_stages=configs.GRAD_R_NUM_STAGES))
            add(kernel="sum_splits_kernel", mode="final", arch=arch, dtype=dt, r=64, M=GOAL_M["gemm"],
                precision="ieee", config=dict(num_warps=configs.SUM_SPLITS_NUM_WARPS, num_stages=1))
            for prec in _precisions(dt):
                out.extend(multi_variants(arch, dt, prec))
    return out


def multi_variants(arch: str, dt: str, precision: str) -> list[dict]:
    """The many-adapter launches (multi.py) with the fixed configs they run: the per-row kernel at every
    rank class (forward with a per-adapter scaling; backward, with Rᵀ's strides, at r = 64; the
    few-row tiles at the decode M), the GEMM with T_GIVEN in the first split entry of each regime,
    both directions, and the segmented grad_R at r = 16/64/256."""
    esize = DTYPES[dt].itemsize
    out = []
    base = dict(arch=arch, dtype=dt, precision=precision, multi=True)
    for mode, r, regime in (("fwd", 16, "gemm"), ("fwd", 64, "gemm"), ("fwd", 256, "gemm"), ("bwd", 64, "gemm"),
                            ("fwd", 64, "decode")):
        M = MULTI_M[regime]
        cfg = multi.per_row_config(M, tb.padded_rank(r), esize, precision, arch, interpreted=False).as_dict()
        v = dict(base, kernel="x_p_per_row_q_kernel", mode=mode, r=r, M=M, regime=regime, config=cfg)
        if cfg["block_m"] < 64:
            v["wgmma_exempt"] = ("row tiles under 64 (wgmma's minimum): RP > 64 spilled with 64-row tiles, and "
                                 "few-row launches want more programs")
        out.append(v)
    for regime in configs.REGIMES:
        cfg = multi.gemm_table_config(arch, regime, esize, precision).as_dict()
        for mode in ("fwd", "bwd"):
            out.append(dict(base, kernel="gemm_rank_r_kernel", mode=mode, schedule="t_given", r=64, M=MULTI_M[regime],
                            regime=regime, config=cfg))
    for r in (16, 64, 256):
        cfg = multi.grad_r_segments_config(tb.padded_rank(r), esize, precision)
        v = dict(base, kernel="grad_r_segments_kernel", mode="final", r=r, M=MULTI_M["gemm"],
                 config=dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"]))
        if cfg["BLOCK_I"] < 64:
            v["wgmma_exempt"] = f"r = {r}: {cfg['BLOCK_I']}-row tiles of an r×r result, under wgmma's 64"
        out.append(v)
    return out


def multi_launch_args(v: dict):
    """Arguments of the many-adapter kernels from multi.py's own builders, on meta tensors."""
    dtype = DTYPES[v["dtype"]]
    M, r = v["M"], v["r"]
    n = MULTI_N[v.get("regime", "gemm")]
    weight = _meta(GOAL_OUT, GOAL_IN, dtype=dtype)
    A, B, R = _meta(GOAL_IN, r, dtype=dtype), _meta(r, GOAL_OUT, dtype=dtype), _meta(n, r, r, dtype=dtype)
    ids, ascale = _meta(M, dtype=torch.int64), _meta(n, dtype=dtype)
    rows = lambda: _meta(M, r, dtype=dtype)  # noqa: E731
    if v["kernel"] == "x_p_per_row_q_kernel":
        fwd = v["mode"] == "fwd"
        x = _meta(M, GOAL_IN if fwd else GOAL_OUT, dtype=dtype)
        return multi.per_row_launch_args("forward" if fwd else "backward", x, weight, A, R, B, ids,
                                         ascale if fwd else None, 0.5, rows(), rows())
    if v["kernel"] == "gemm_rank_r_kernel":
        if v["mode"] == "fwd":
            return multi.multi_gemm_launch_args("forward", _meta(M, GOAL_IN, dtype=dtype), weight,
                                                _meta(GOAL_OUT, dtype=dtype), A, R, B, 0.5,
                                                _meta(M, GOAL_OUT, dtype=dtype), rows())
        return multi.multi_gemm_launch_args("backward", _meta(M, GOAL_OUT, dtype=dtype), weight, None, A, R, B, 0.5,
                                            _meta(M, GOAL_IN, dtype=dtype), rows())
    args, kwargs, _ = multi.grad_r_segments_launch_args(rows(), rows(), ids, _meta(n + 1, dtype=torch.int64), ascale,
                                                        0.5, _meta(n, r, r, dtype=dtype))
    return args, kwargs


def _meta(*shape, dtype):
    return torch.empty(*shape, dtype=dtype, device="meta")


def launch_args(v: dict):
    """(kernel, positional args, keyword args) for a variant, from the backend's own builders."""
    dtype = DTYPES[v["dtype"]]
    M, r = v["M"], v["r"]
    r_dtype = DTYPES[v.get("r_dtype", v["dtype"])]
    weight = _meta(GOAL_OUT, GOAL_IN, dtype=dtype)
    A, B, R = _meta(GOAL_IN, r, dtype=dtype), _meta(r, GOAL_OUT, dtype=dtype), _meta(r, r, dtype=r_dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if v.get("multi"):
        args, kwargs = multi_launch_args(v)
    elif v["kernel"] == "gemm_rank_r_kernel":
        split = v["schedule"] == "split"
        if v["mode"] == "fwd":
            x, bias = _meta(M, GOAL_IN, dtype=dtype), _meta(GOAL_OUT, dtype=dtype)
            args, kwargs = tb.forward_launch_args(x, weight, bias, A, R, B, 0.5, _meta(M, GOAL_OUT, dtype=dtype),
                                                  _meta(M, r, dtype=dtype), u_given=split)
        else:
            g = _meta(M, GOAL_OUT, dtype=dtype)
            args, kwargs = tb.backward_launch_args(g, weight, A, R, B, 0.5, _meta(M, GOAL_IN, dtype=dtype),
                                                   _meta(M, r, dtype=dtype), u_given=split)
    elif v["kernel"] == "x_p_kernel":
        x = _meta(M, GOAL_IN if v["mode"] == "fwd" else GOAL_OUT, dtype=dtype)
        args, kwargs = tb.projection_launch_args("forward" if v["mode"] == "fwd" else "backward", x, weight, A, R, B,
                                                 _meta(M, r, dtype=dtype))
    elif v["kernel"] == "xa_t_u_splits_kernel":
        splits, rows = tb.grad_r_splits(M, r)
        final = v["mode"] == "final"
        out = _meta(r, r, dtype=dtype) if final else _meta(splits, r, r, dtype=acc)
        args, kwargs = tb.grad_r_launch_args(_meta(M, r, dtype=dtype), _meta(M, r, dtype=dtype), out, rows, final, 0.5)
    else:
        args, kwargs = tb.sum_splits_launch_args(_meta(8, r, r, dtype=acc), _meta(r, r, dtype=dtype), 0.5)
    kwargs.update({k.upper(): val for k, val in v["config"].items() if k.startswith(("block", "group_n"))})
    if "PRECISION" in kwargs:
        kwargs["PRECISION"] = v["precision"]
    return KERNELS[v["kernel"]], args, kwargs


def specialise(kernel, args, kwargs):
    """(signature, constexprs, attrs) as triton.jit derives them from these argument values."""
    names = kernel.arg_names
    bound = dict(zip(names, args))
    bound.update(kwargs)
    for name, param in zip(names, kernel.params):  # constexprs with a default (T_GIVEN) take it when not passed
        default = getattr(param, "default", inspect.Parameter.empty)
        if name not in bound and default is not inspect.Parameter.empty:
            bound[name] = default
    missing = [n for n in names if n not in bound]
    if missing:
        raise TypeError(f"{kernel.__name__}: no value for {missing}")
    try:
        from triton.backends.compiler import BaseBackend
        div16 = BaseBackend.parse_attr("D")
    except (ImportError, AttributeError):
        div16 = [["tt.divisibility", 16]]
    signature, constexprs, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(names, kernel.params)):
        value = bound[name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_DTYPE[value.dtype]
            attrs[(i,)] = div16  # torch allocations are 16-byte aligned
        elif isinstance(value, bool):
            signature[name] = "u1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(i,)] = div16
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: cannot specialise {name}={value!r}")
    return signature, constexprs, attrs


# ------------------------------------------------------------------------------------ compiling
def _cuobjdump() -> str | None:
    here = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return here if os.path.exists(here) else shutil.which("cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    exe = _cuobjdump()
    if exe is None:
        return {}
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([exe, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", text)
    if not m:
        return {}
    reg, stack, shared, local = (int(g) for g in m.groups())
    # Spilled registers live in the stack frame (ptxas -v: "16 bytes stack frame, 12 bytes spill
    # stores"); these kernels make no calls and declare no local arrays, so any stack is a spill.
    return {"registers": reg, "stack": stack, "local": local, "static_shared": shared, "spills": stack + local}


def compile_variant(v: dict) -> dict:
    cc, warp, limit = ARCHS[v["arch"]]
    rec = dict(v)
    rec.update(registers=None, spills=None, shared_bytes=None, shared_limit=limit, uses_wgmma=None,
               uses_mma_sync=None, has_dot=None, error=None)
    cfg = v["config"]
    rec["num_warps"], rec["num_stages"] = cfg["num_warps"], cfg["num_stages"]
    t0 = time.perf_counter()
    try:
        kernel, args, kwargs = launch_args(v)
        signature, constexprs, attrs = specialise(kernel, args, kwargs)
        src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", cc, warp),
                                  options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
        ptx = compiled.asm["ptx"]
        rec.update(resource_usage(compiled.asm["cubin"]))
        rec["shared_bytes"] = int(compiled.metadata.shared)
        rec["uses_wgmma"] = "wgmma.mma_async" in ptx
        rec["uses_mma_sync"] = "mma.sync" in ptx
        rec["has_dot"] = "tt.dot" in compiled.asm["ttir"]
        rec["idx64"] = bool(kwargs.get("IDX64", False))
    except Exception as e:  # noqa: BLE001 - every failure is reported, --check turns it into the exit code
        rec["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
    rec["compile_s"] = round(time.perf_counter() - t0, 2)
    rec["problems"] = problems(rec)
    return rec


def problems(rec: dict) -> list[str]:
    if rec["error"]:
        return ["compile error"]
    out = []
    if rec["spills"] is None:
        out.append("no resource usage (cuobjdump missing or unreadable)")
    elif rec["spills"] > 0:
        out.append(f"spills {rec['spills']} bytes")
    if rec["shared_bytes"] > rec["shared_limit"]:
        out.append(f"shared memory {rec['shared_bytes']} > {rec['shared_limit']}")
    if (rec["arch"] == "sm90" and rec["dtype"] in WGMMA_DTYPES and rec["has_dot"] and not rec["uses_wgmma"]
            and not rec.get("wgmma_exempt")):
        out.append("sm_90 16-bit dot without wgmma")
    return out


# --------------------------------------------------------------------------------------- output
def summary(records: list[dict], seconds: float) -> str:
    lines = [f"{len(records)} variants compiled in {seconds:.0f} s"]
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        kernel = r["kernel"] + ("+T" if r.get("schedule") == "t_given" else "")  # T_GIVEN: many adapters
        groups.setdefault((kernel, r["arch"], r["dtype"], r.get("precision")), []).append(r)
    lines.append(f"{'kernel':22} {'arch':5} {'dtype':5} {'prec':5} {'n':>3} {'regs':>9} {'shared KiB':>13} "
                 f"{'wgmma':>6} {'stages':>6} problems")
    for (kernel, arch, dt, prec), rs in sorted(groups.items()):
        ok = [r for r in rs if not r["error"]]
        regs = [r["registers"] for r in ok if r["registers"] is not None]
        shared = [r["shared_bytes"] / 1024 for r in ok]
        wg = sum(bool(r["uses_wgmma"]) for r in ok)
        stages = sorted({r["num_stages"] for r in ok})
        bad = sum(bool(r["problems"]) for r in rs)
        lines.append(
            f"{kernel:22} {arch:5} {dt:5} {prec or '':5} {len(rs):>3} "
            f"{(f'{min(regs)}-{max(regs)}' if regs else '-'):>9} "
            f"{(f'{min(shared):.0f}-{max(shared):.0f}' if shared else '-'):>13} "
            f"{f'{wg}/{len(ok)}':>6} {','.join(map(str, stages)):>6} {bad}")
    for r in records:
        if r["problems"]:
            lines.append(f"PROBLEM {r['kernel']} {r['mode']} {r.get('schedule', '')} {r['arch']} {r['dtype']} "
                         f"{r['precision']} r={r['r']} {r['config']}: {'; '.join(r['problems'])} {r['error'] or ''}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="exit 1 on compile errors, spills, shared memory "
                        "over the limit, or sm_90 16-bit dots without wgmma")
    parser.add_argument("--dtypes", default="fp16,bf16,fp32,fp64", help="comma-separated subset of "
                        + ",".join(DTYPES))
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of " + ",".join(ARCHS))
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma-separated subset of " + ",".join(KERNELS))
    parser.add_argument("--multi-only", action="store_true", help="only the many-adapter launches (multi.py)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (processes)")
    args = parser.parse_args(argv)
    if tb.INTERPRETED:
        parser.error("the Triton backend was imported under TRITON_INTERPRET=1; run the report without it")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    unknown = [d for d in dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"unknown dtypes {unknown}; choose from {list(DTYPES)}")
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    kernels = [k.strip() for k in args.kernels.split(",") if k.strip()]
    bad = [a for a in archs if a not in ARCHS] + [k for k in kernels if k not in KERNELS]
    if bad:
        parser.error(f"unknown archs or kernels {bad}")
    todo = [v for v in variants(dtypes) if v["arch"] in archs and v["kernel"] in kernels
            and (v.get("multi") or not args.multi_only)]
    print(f"triton {triton.__version__}: compiling {len(todo)} variants with {args.jobs} processes", file=sys.stderr)
    t0 = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            records = list(pool.map(compile_variant, todo, chunksize=1))
    else:
        records = [compile_variant(v) for v in todo]
    seconds = time.perf_counter() - t0
    json.dump(records, sys.stdout, indent=1)
    sys.stdout.write("\n")
    print(summary(records, seconds), file=sys.stderr)
    if args.check and any(r["problems"] for r in records):
        print("aot_report --check: FAILED", file=sys.stderr)
        return 1
    if args.check:
        print("aot_report --check: OK", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
