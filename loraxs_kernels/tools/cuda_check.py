"""Checks of the CUDA build that need no GPU (scripts/cuda_check.sh runs this with the CUDA torch).

    python loraxs_kernels/tools/cuda_check.py resources --log build/cuda-check/build.log [--so LIB] [--cuobjdump BIN]
    python loraxs_kernels/tools/cuda_check.py load LIB

`resources` reads the `ptxas -v` lines of a build log, prints one row per (kernel, arch) and fails
on any spill, on static shared memory over 48 KiB (the most a kernel gets without an opt-in) or over
the architecture's maximum, on a kernel family or architecture missing from the log (a build that
compiled nothing would otherwise pass), and, given the library and cuobjdump, on a kernel whose
registers or shared memory in the shipped binary differ from the log, or that the binary lacks.
`load` loads the library into this torch and checks that both native ops have a CUDA and a CPU kernel.
Runs as a script (not `-m`) so that it never imports loraxs_kernels, whose CPU build may sit in the tree.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

ARCHS = ("sm_80", "sm_90")
# Static shared memory: 48 KiB without cudaFuncSetAttribute; the per-block maximum with it.
STATIC_SMEM_LIMIT = 48 * 1024
ARCH_SMEM_MAX = {"sm_80": 163 * 1024, "sm_90": 227 * 1024}
MAX_REGISTERS = 255
# Every kernel family the library must contain (csrc/cuda/kernels/*.cuh).
KERNEL_FAMILIES = (
    "gemm_mma_kernel",
    "gemm_simt_kernel",
    "decode_partial_kernel",
    "decode_epilogue_kernel",
    "grad_r_partial_kernel",
    "grad_r_reduce_kernel",
    "multi_rows_kernel",
    "multi_grad_r_kernel",
)


@dataclass
class Kernel:
    mangled: str
    arch: str
    registers: int = -1
    smem: int = 0
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    name: str = ""


ENTRY = re.compile(r"ptxas info\s*: Compiling entry function '([^']+)' for '(sm_\d+a?)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"ptxas info\s*: Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(text: str) -> list[Kernel]:
    """The entries of a `ptxas -v` log, in order. A properties/usage line belongs to the last entry."""
    kernels: list[Kernel] = []
    current: Kernel | None = None
    for line in text.splitlines():
        if m := ENTRY.search(line):
            current = Kernel(m.group(1), m.group(2))
            kernels.append(current)
        elif current is not None and (m := PROPS.search(line)):
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif current is not None and (m := USED.search(line)):
            current.registers = int(m.group(1))
            current.smem = int(m.group(2) or 0)
            current = None  # "Used" closes an entry
    return kernels


def demangle(names: list[str]) -> dict[str, str]:
    """Mangled → readable (c++filt when present), shortened: no namespaces, no parameter list."""
    readable = dict(zip(names, names))
    tool = shutil.which("c++filt")
    if tool and names:
        out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
        lines = out.splitlines()
        if len(lines) == len(names):
            readable = dict(zip(names, lines))
    short = {}
    for mangled, name in readable.items():
        name = name.replace("loraxs::cuda::", "").replace("__nv_bfloat16", "bf16").replace("__half", "half")
        name = re.sub(r"^void ", "", name)
        name = re.sub(r"MmaCfg<(\d+), (\d+), \d+, \d+, (\d+)>", r"\1x\2x\3st", name)
        name = re.sub(r"\((?:[^()]|\([^()]*\))*\)$", "", name)  # drop the parameter list
        short[mangled] = name
    return short


def cuobjdump_usage(cuobjdump: str, lib: str) -> dict[tuple[str, str], tuple[int, int]]:
    """(mangled, arch) → (registers, shared bytes) from the SASS inside the library."""
    out = subprocess.run([cuobjdump, "--dump-resource-usage", lib], capture_output=True, text=True, check=True).stdout
    usage = {}
    arch = None
    func = None
    for line in out.splitlines():
        if m := re.search(r"arch = (sm_\d+a?)", line):
            arch = m.group(1)
        elif m := re.search(r"Function (\S+):", line):
            func = m.group(1)
        elif func and arch and (m := re.search(r"REG:(\d+).*?SHARED:(\d+)", line)):
            usage[(func, arch)] = (int(m.group(1)), int(m.group(2)))
            func = None
    return usage


def check_resources(log: str, lib: str | None, cuobjdump: str | None) -> int:
    with open(log, encoding="utf-8", errors="replace") as f:
        kernels = parse_ptxas(f.read())
    problems: list[str] = []
    if not kernels:
        problems.append(f"no 'ptxas info : Compiling entry function' lines in {log} (was -Xptxas -v passed, was anything compiled?)")
    names = demangle(sorted({k.mangled for k in kernels}))
    for k in kernels:
        k.name = names[k.mangled]

    for arch in ARCHS:
        in_arch = {k.name for k in kernels if k.arch == arch}
        for family in KERNEL_FAMILIES:
            if not any(family in n for n in in_arch):
                problems.append(f"{family}: no {arch} build in the log")
    by_arch = {arch: {k.mangled for k in kernels if k.arch == arch} for arch in ARCHS}
    if by_arch[ARCHS[0]] != by_arch[ARCHS[1]]:
        problems.append(f"the kernels built for {ARCHS[0]} and {ARCHS[1]} differ")

    for k in kernels:
        where = f"{k.name} [{k.arch}]"
        if k.registers < 0:
            problems.append(f"{where}: no 'Used N registers' line")
        if k.spill_stores or k.spill_loads:
            problems.append(f"{where}: spills ({k.spill_stores} B stored, {k.spill_loads} B loaded)")
        if k.registers > MAX_REGISTERS:
            problems.append(f"{where}: {k.registers} registers > {MAX_REGISTERS}")
        if k.smem > STATIC_SMEM_LIMIT:
            problems.append(f"{where}: {k.smem} B static shared memory > {STATIC_SMEM_LIMIT} B (needs an opt-in)")
        limit = ARCH_SMEM_MAX.get(k.arch.rstrip("a"))
        if limit is not None and k.smem > limit:
            problems.append(f"{where}: {k.smem} B shared memory > the {k.arch} maximum {limit} B")

    binary_note = "not checked (no library or cuobjdump given)"
    if lib and cuobjdump:
        usage = cuobjdump_usage(cuobjdump, lib)
        missing = [k for k in kernels if (k.mangled, k.arch) not in usage]
        # The SASS of a kernel that uses shared memory counts, on sm_90, the 1 KiB per CTA the
        # hardware reserves for itself (measured here: every sm_90 kernel with smem shows +1024).
        differ = [
            k
            for k in kernels
            if (k.mangled, k.arch) in usage
            and (usage[(k.mangled, k.arch)][0] != k.registers
                 or usage[(k.mangled, k.arch)][1] - k.smem not in ((0, 1024) if k.smem else (0,)))
        ]
        for k in missing:
            problems.append(f"{k.name} [{k.arch}]: in the build log but not in {lib}")
        for k in differ:
            problems.append(
                f"{k.name} [{k.arch}]: the library says {usage[(k.mangled, k.arch)]} (regs, smem), the log {(k.registers, k.smem)}"
            )
        binary_note = (
            f"{len(kernels) - len(missing) - len(differ)}/{len(kernels)} (kernel, arch) pairs found in the library "
            "with the same registers and shared memory (+1 KiB system reserve allowed)"
        )

    width = max((len(k.name) for k in kernels), default=6)
    print(f"{'kernel':<{width}}  arch   regs  smem(B)  stack  spill st/ld")
    for k in sorted(kernels, key=lambda k: (k.name, k.arch)):
        print(f"{k.name:<{width}}  {k.arch:<5}  {k.registers:>4}  {k.smem:>7}  {k.stack:>5}  {k.spill_stores}/{k.spill_loads}")
    print(f"{len(kernels)} kernel builds; cuobjdump cross-check: {binary_note}")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


def check_load(lib: str) -> int:
    import torch

    problems = []
    try:
        torch.ops.load_library(lib)
    except (OSError, RuntimeError) as e:
        print(f"FAIL: {lib} does not load: {e}", file=sys.stderr)
        return 1
    for op in ("linear_fwd", "linear_bwd", "linear_multi_fwd", "linear_multi_bwd"):
        for key in ("CUDA", "CPU", "Autograd"):
            ok = torch._C._dispatch_has_kernel_for_dispatch_key(f"loraxs::{op}", key)
            print(f"loraxs::{op} has a {key} kernel: {ok}")
            if not ok:
                problems.append(f"loraxs::{op} has no {key} kernel")
    # The CPU kernel of this same library still computes the layer (a build that registered the
    # CUDA kernels but broke the CPU ones would pass the key checks above).
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(5, 12, generator=g), torch.randn(10, 12, generator=g), torch.randn(10, generator=g)
    A, R, B = torch.randn(12, 3, generator=g), torch.randn(3, 3, generator=g), torch.randn(3, 10, generator=g)
    y, xa = torch.ops.loraxs.linear_fwd(x, w, b, A, R, B, 0.5, "cpp")
    y_ref = x @ w.t() + b + 0.5 * (x @ A @ R @ B)
    err = (y - y_ref).abs().max().item()
    print(f"CPU kernel of this library vs a direct formula: max error {err:.2e}")
    if not torch.allclose(y, y_ref, rtol=1e-4, atol=1e-4) or not torch.allclose(xa, x @ A, rtol=1e-4, atol=1e-4):
        problems.append(f"the CPU kernel of {lib} disagrees with the formula (max error {err:.2e})")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), GPU present: {torch.cuda.is_available()}")
    for p in problems:
        print(f"FAIL: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("resources", help="parse ptxas -v output and check registers, spills, shared memory")
    r.add_argument("--log", required=True)
    r.add_argument("--so", default=None, help="the built library, to cross-check with cuobjdump")
    r.add_argument("--cuobjdump", default=None)
    ld = sub.add_parser("load", help="load the library and check the registered kernels")
    ld.add_argument("lib")
    args = parser.parse_args(argv)
    if args.cmd == "resources":
        return check_resources(args.log, args.so, args.cuobjdump)
    return check_load(args.lib)


if __name__ == "__main__":
    sys.exit(main())
