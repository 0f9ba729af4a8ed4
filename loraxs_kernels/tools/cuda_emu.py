"""Build and drive the host emulation of the CUDA C++ kernels (csrc/emu; docs/cuda.md, "Host emulation").

    python -m loraxs_kernels.tools.cuda_emu build [--flavour memcheck|racecheck] [--kernels DIR]

The kernel sources (csrc/cuda/kernels/*.cuh and the csrc/cuda/*.cu instantiation files) are copied
into build/cuda-emu with three mechanical rewrites, then compiled by g++ with LORAXS_CUDA_EMU:
  k<<<grid, block[, smem[, stream]]>>>(args)  ->  ::loraxs_emu::launcher(k, grid, block, ...)(args)
  cudaLaunchKernelEx(                         ->  ::loraxs_emu::launch_ex(
  __shared__ [__align__(n)] T name[d]..;      ->  auto& name = ::loraxs_emu::shared<T[d]..>("name");
Everything else, and every kernel body, is compiled as written. Two flavours of the runner:
  memcheck   AddressSanitizer + UBSan alignment + the PTX twins' own checks
  racecheck  ThreadSanitizer
Each request runs in its own process (the sanitizers must own the process); torch tensors go in
and out through a file, every storage as one exact-size allocation.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
EMU_DIR = ROOT / "csrc" / "emu"
KERNELS_DIR = ROOT / "csrc" / "cuda" / "kernels"
BUILD_DIR = ROOT / "build" / "cuda-emu"
UNITS = ["decode.cu", "gemm_half.cu", "gemm_bfloat16.cu", "gemm_simt.cu", "grad_r.cu", "multi.cu"]

FLAGS = {
    "memcheck": ["-fsanitize=address,alignment", "-fno-sanitize-recover=all"],
    "racecheck": ["-fsanitize=thread"],
}
# Exit codes: the emulation's own reports (emu.cpp: 10 memcheck, 12 sync), ASan/UBSan 10, TSan 11.
ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:exitcode=10:halt_on_error=1:abort_on_error=0",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1:exitcode=10",
    "TSAN_OPTIONS": "exitcode=11:halt_on_error=1:second_deadlock_stack=0:report_signal_unsafe=0",
}
CHECKER_BY_RC = {10: "memcheck", 11: "racecheck", 12: "sync"}

# By report text first: two threads faulting at once can end the process with SIGABRT while ASan
# is still printing the first report (seen with a deleted bound check), so the exit code alone lies.
REPORT_MARKERS = [("ERROR: AddressSanitizer", "memcheck"), ("runtime error:", "memcheck"), ("EMU memcheck", "memcheck"),
                  ("WARNING: ThreadSanitizer", "racecheck"), ("EMU sync", "sync")]


def checker_of(rc: int, stderr: str) -> str:
    for marker, checker in REPORT_MARKERS:
        if marker in stderr:
            return checker
    return CHECKER_BY_RC.get(rc, "runner")


# launch.h's DType and IndexType
DTYPE_CODE = {"float16": 0, "bfloat16": 1, "float32": 2, "float64": 3}
INDEX_CODE = {"int32": 0, "int64": 1}


class EmuError(RuntimeError):
    """A checker fired (memcheck / racecheck / sync) or the runner refused the request."""

    def __init__(self, checker: str, rc: int, output: str):
        self.checker, self.rc, self.output = checker, rc, output
        super().__init__(f"cuda-emu {checker} (exit {rc}):\n{output[-6000:]}")


# ------------------------------------------------------------------------------------ sources
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^;{}<>]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)
_SHARED = re.compile(r"__shared__\s+(?:__align__\(\s*\d+\s*\)\s+)?([\w:<>, ]+?)\s+(\w+)\s*((?:\[[^\]]+\]\s*)+);")


def rewrite(text: str, name: str) -> str:
    """The three rewrites of the module docstring; fails if any construct is left over."""
    text, n_launch = _LAUNCH.subn(lambda m: f"::loraxs_emu::launcher({m.group(1)}, {m.group(2)})(", text)
    text = text.replace("cudaLaunchKernelEx(", "::loraxs_emu::launch_ex(")
    text, n_shared = _SHARED.subn(
        lambda m: f'auto& {m.group(2)} = ::loraxs_emu::shared<{m.group(1)}{m.group(3).strip()}>("{m.group(2)}");',
        text,
    )
    code = re.sub(r"//[^\n]*", "", text)  # comments may mention the constructs
    for left in ("<<<", "__shared__"):
        if left in code:
            raise RuntimeError(f"cuda_emu: {name} still has '{left}' after the rewrite; extend rewrite()")
    return text


def prepare_sources(kernels_dir: Path, out: Path) -> None:
    """out/kernels/* (rewritten kernels) and out/*.cu (rewritten instantiations, from kernels_dir/..)."""
    (out / "kernels").mkdir(parents=True, exist_ok=True)
    for f in sorted(kernels_dir.iterdir()):
        if f.suffix in (".cuh", ".h"):
            (out / "kernels" / f.name).write_text(rewrite(f.read_text(), f.name))
    for u in UNITS:
        src = kernels_dir.parent / u
        (out / u).write_text(rewrite(src.read_text(), u))


# ------------------------------------------------------------------------------------ build
def cuda_include() -> Path:
    cands = []
    if os.environ.get("CUDA_HOME"):
        cands.append(Path(os.environ["CUDA_HOME"]))
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(Path(nvcc).resolve().parent.parent)
    cands.append(Path("/usr/local/cuda"))
    for c in cands:
        if (c / "include" / "cuda_fp16.h").exists():
            return c / "include"
    raise RuntimeError(f"cuda_emu: no CUDA toolkit headers (cuda_fp16.h) under {[str(c) for c in cands]}; set CUDA_HOME")


def default_kernels_dir() -> Path:
    """csrc/cuda/kernels, or LORAXS_CUDA_EMU_KERNELS (scripts/cuda_emu_mutations.py points it at a
    mutated copy; the .cu instantiation files are taken from its parent folder)."""
    return Path(os.environ.get("LORAXS_CUDA_EMU_KERNELS") or KERNELS_DIR).resolve()


def _local_includes(path: Path, bases: list, seen: set) -> None:
    for m in re.finditer(r'#include "([^"]+)"', path.read_text()):
        for base in [path.parent, *bases]:
            dep = (base / m.group(1)).resolve()
            if dep.is_file():
                if dep not in seen:
                    seen.add(dep)
                    _local_includes(dep, bases, seen)
                break


def _unit_key(src: Path, bases: list, common: list) -> str:
    """Content hash of a unit, the local headers it includes (rewritten copies included) and the flags."""
    deps = {src.resolve()}
    _local_includes(src, bases, deps)
    h = hashlib.sha256(" ".join(common).encode())
    for dep in sorted(deps):
        h.update(str(dep.name).encode())
        h.update(dep.read_bytes())
    return h.hexdigest()[:20]


def build(flavour: str = "memcheck", kernels_dir: Path | str | None = None, jobs: int | None = None,
          verbose: bool = False) -> Path:
    """Compile the runner for `flavour` from kernels_dir (default: default_kernels_dir()). Objects are
    cached by content in build/cuda-emu/obj, so a changed kernel header recompiles only its units."""
    if flavour not in FLAGS:
        raise ValueError(f"cuda_emu: flavour must be one of {sorted(FLAGS)}, got {flavour!r}")
    kernels_dir = Path(kernels_dir).resolve() if kernels_dir else default_kernels_dir()
    BUILD_DIR.mkdir(parents=True, exist_ok=True)
    gen = Path(tempfile.mkdtemp(prefix="src-", dir=BUILD_DIR))
    try:
        src = gen / "cuda"
        prepare_sources(kernels_dir, src)
        cxx = os.environ.get("CXX", "g++")
        # -I order: the rewritten kernels, then csrc/emu, then the toolkit (cuda_fp16.h, cuda_bf16.h).
        includes = [f"-I{src}", f"-I{EMU_DIR}", f"-I{cuda_include()}"]
        common = ["-std=c++20", "-O2", "-g1", "-fno-omit-frame-pointer", "-pthread", "-DLORAXS_CUDA_EMU", "-w",
                  *FLAGS[flavour]]
        units = [EMU_DIR / "emu.cpp", EMU_DIR / "runner.cpp"] + [src / u for u in UNITS]
        objdir = BUILD_DIR / "obj"
        objdir.mkdir(exist_ok=True)
        objs = [objdir / f"{flavour}-{u.name}-{_unit_key(u, [src, EMU_DIR], [cxx] + common)}.o" for u in units]
        exe = BUILD_DIR / f"emu_runner-{flavour}-{hashlib.sha256(''.join(o.name for o in objs).encode()).hexdigest()[:16]}"
        if exe.exists():
            return exe

        def compile_one(pair):
            u, o = pair
            if o.exists():
                return
            tmp_o = o.with_suffix(f".{os.getpid()}.tmp")
            cmd = [cxx, *common, *includes, "-x", "c++", "-c", str(u), "-o", str(tmp_o)]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                raise RuntimeError(f"cuda_emu: compile failed: {' '.join(cmd)}\n{r.stderr[-8000:]}")
            tmp_o.replace(o)
            if verbose:
                print(f"compiled {u.name} ({flavour})", file=sys.stderr)

        with ThreadPoolExecutor(jobs or os.cpu_count() or 2) as ex:
            list(ex.map(compile_one, zip(units, objs)))
        tmp_exe = exe.with_suffix(f".{os.getpid()}.tmp")
        link = [cxx, *FLAGS[flavour], "-pthread", "-rdynamic", *map(str, objs), "-o", str(tmp_exe), "-ldl"]
        r = subprocess.run(link, capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"cuda_emu: link failed: {' '.join(link)}\n{r.stderr[-8000:]}")
        tmp_exe.replace(exe)
        return exe
    finally:
        shutil.rmtree(gen, ignore_errors=True)


# ------------------------------------------------------------------------------------ requests
class Request:
    """A sequence of launch-API calls over torch tensors' storages; run() executes them in one process."""

    def __init__(self):
        self.buffers = []   # (nbytes, kind, bytes or None)
        self._by_ptr = {}   # storage data_ptr -> buffer index
        self.outputs = []   # (buffer index, tensor to fill)
        self.calls = []
        # Every tensor handed to ptr() stays alive until the request is dropped: buffers are keyed by
        # storage address, and a freed temporary's address reused by a later output would alias it
        # (seen: "an output tensor shares its storage with an input" from a test's R.to(dtype) copy).
        self._keep = []

    def _storage(self, t, out: bool) -> int:
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in self._by_ptr:
            idx = self._by_ptr[key]
            if out and self.buffers[idx][1] != "out":
                raise ValueError("cuda_emu: an output tensor shares its storage with an input")
            return idx
        idx = len(self.buffers)
        if out:
            self.buffers.append((st.nbytes(), "out", None))
            self.outputs.append((idx, t))
        else:
            import torch

            raw = torch.empty(0, dtype=torch.uint8).set_(st)
            self.buffers.append((st.nbytes(), "in", raw.numpy().tobytes()))
        self._by_ptr[key] = idx
        return idx

    def ptr(self, t, out: bool = False) -> str:
        if t is None:
            return "null"
        if t.device.type != "cpu":
            raise ValueError(f"cuda_emu: tensors must be on the CPU, got {t.device}")
        self._keep.append(t)
        return f"b{self._storage(t, out)}+{t.storage_offset() * t.element_size()}"

    def call(self, name: str, **kv) -> None:
        self.calls.append((name, kv))

    def run(self, flavour: str = "memcheck", kernels_dir=None, timeout: float = 600) -> list[dict]:
        """Runs the calls; fills the output tensors; returns each call's info (e.g. splits)."""
        import torch

        exe = build(flavour, kernels_dir)
        with tempfile.TemporaryDirectory(prefix="cuda-emu-") as d:
            req, res = Path(d) / "request", Path(d) / "result"
            with open(req, "wb") as f:
                for n, kind, _ in self.buffers:
                    f.write(f"buffer {n} {kind}\n".encode())
                for name, kv in self.calls:
                    f.write(("call " + name + "".join(f" {k}={v}" for k, v in kv.items()) + "\n").encode())
                f.write(b"data\n")
                for _, kind, data in self.buffers:
                    if kind == "in":
                        f.write(data)
            env = dict(os.environ, **ENV)
            p = subprocess.run([str(exe), str(req), str(res)], capture_output=True, text=True, env=env, timeout=timeout)
            if p.returncode != 0:
                raise EmuError(checker_of(p.returncode, p.stderr), p.returncode, p.stdout + p.stderr)
            blob = res.read_bytes()
        pos = 0
        for idx, t in self.outputs:
            n = self.buffers[idx][0]
            st = torch.frombuffer(bytearray(blob[pos:pos + n]), dtype=torch.uint8)
            t.untyped_storage().copy_(st.untyped_storage())
            pos += n
        infos = []
        for line in p.stdout.splitlines():
            if line.startswith("info "):
                parts = line.split()[1:]
                infos.append({"call": parts[0], **{k: int(v) for k, v in (x.split("=") for x in parts[1:])}})
        return infos


def dtype_code(dtype) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in DTYPE_CODE:
        raise ValueError(f"cuda_emu: the CUDA kernels take float16, bfloat16, float32, float64; got {dtype}")
    return DTYPE_CODE[name]


def _operand(req: Request, name: str, t) -> dict:
    """A 2-D view seen as rows × k (launch.h's Operand): its own strides, no copy."""
    if t.dim() != 2:
        raise ValueError(f"cuda_emu: operand {name} must be 2-D (rows × k), got shape {tuple(t.shape)}")
    return {name: req.ptr(t), f"{name}.s_row": t.stride(0), f"{name}.s_k": t.stride(1)}


def gemm_call(req: Request, C, P1, Q1, P2=None, Q2=None, bias=None, alpha=1.0, order=0, num_sms=132) -> None:
    """C (M×N) = alpha·(P1 Q1ᵀ + P2 Q2ᵀ) + bias through loraxs::cuda::gemm (launch.h); order is QOrder."""
    M, N = C.shape
    K1 = P1.shape[1]
    if P1.shape[0] != M or Q1.shape != (N, K1):
        raise ValueError(f"cuda_emu.gemm: C {tuple(C.shape)}, P1 {tuple(P1.shape)}, Q1 {tuple(Q1.shape)} do not match")
    kv = dict(dtype=dtype_code(C.dtype), order=order, num_sms=num_sms, M=M, N=N, K1=K1, K2=0)
    kv.update(_operand(req, "P1", P1))
    kv.update(_operand(req, "Q1", Q1))
    if P2 is not None:
        K2 = P2.shape[1]
        if P2.shape[0] != M or Q2.shape != (N, K2):
            raise ValueError(f"cuda_emu.gemm: P2 {tuple(P2.shape)}, Q2 {tuple(Q2.shape)} do not match C {tuple(C.shape)}")
        kv["K2"] = K2
        kv.update(_operand(req, "P2", P2))
        kv.update(_operand(req, "Q2", Q2))
    kv.update(C=req.ptr(C, out=True), s_cm=C.stride(0), s_cn=C.stride(1), bias=req.ptr(bias), alpha=repr(float(alpha)))
    req.call("gemm", **kv)


def index_code(dtype) -> int:
    name = str(dtype).replace("torch.", "")
    if name not in INDEX_CODE:
        raise ValueError(f"cuda_emu: adapter ids must be int32 or int64, got {dtype}")
    return INDEX_CODE[name]


def _check_adapter_scale(adapter_scale) -> None:
    if adapter_scale is not None and (str(adapter_scale.dtype) != "torch.float64" or not adapter_scale.is_contiguous()):
        raise ValueError("cuda_emu: adapter_scale must be a contiguous float64 tensor (the binding converts it)")


def _ids(req: Request, ids, adapter_scale, M: int) -> dict:
    """Many-adapter arguments: ids (M,) contiguous int32/int64, adapter_scale (n,) contiguous float64 or None."""
    if ids.shape != (M,) or not ids.is_contiguous():
        raise ValueError(f"cuda_emu: ids must be a contiguous ({M},) tensor, got {tuple(ids.shape)}")
    _check_adapter_scale(adapter_scale)
    return dict(ids=req.ptr(ids), ids_type=index_code(ids.dtype), adapter_scale=req.ptr(adapter_scale))


def decode_call(req: Request, y, xa, x, W, A, R, B, bias, scaling, num_sms=132, pdl=True, query_only=False,
                ids=None, adapter_scale=None) -> None:
    """The decoding kernels (decode_forward_partial + decode_forward_epilogue) with decode_splits(num_sms).
    ids (M,): many adapters, R a bank (n, r, r) (DecodeArgs::ids, s_rn, adapter_scale)."""
    M, K = x.shape
    N, r = W.shape[0], A.shape[1]
    if x.stride(1) != 1 or W.stride(1) != 1:
        raise ValueError("cuda_emu.decode: x and W need unit k stride")
    Rm = R if ids is None else R[0]
    kv = dict(dtype=dtype_code(x.dtype), num_sms=num_sms, pdl=int(pdl), M=M, N=N, K=K, r=r,
              x=req.ptr(x), s_x=x.stride(0), W=req.ptr(W), s_w=W.stride(0),
              A=req.ptr(A), s_a0=A.stride(0), s_a1=A.stride(1),
              R=req.ptr(R), s_r0=Rm.stride(0), s_r1=Rm.stride(1), r_dtype=dtype_code(R.dtype),
              B=req.ptr(B), s_b0=B.stride(0), s_b1=B.stride(1), bias=req.ptr(bias), scaling=repr(float(scaling)))
    if ids is not None:
        if R.dim() != 3:
            raise ValueError(f"cuda_emu.decode: with ids R must be a bank (n, r, r), got {tuple(R.shape)}")
        kv.update(_ids(req, ids, adapter_scale, M), s_rn=R.stride(0))
    if query_only:
        kv.update(y="null", xa="null")
        req.call("decode_splits", **kv)
        return
    if not (y.is_contiguous() and xa.is_contiguous()):
        raise ValueError("cuda_emu.decode: y and xa must be contiguous")
    kv.update(y=req.ptr(y, out=True), xa=req.ptr(xa, out=True))
    req.call("decode", **kv)


def grad_r_call(req: Request, out, xa, u, scaling) -> None:
    """grad_R = s·xaᵀ u through grad_r_partial + grad_r_reduce with grad_r_splits(M, r)."""
    M, r = xa.shape
    if not out.is_contiguous() or out.shape != (r, r):
        raise ValueError(f"cuda_emu.grad_r: out must be a contiguous ({r}, {r}) tensor, got {tuple(out.shape)}")
    req.call("grad_r", dtype=dtype_code(xa.dtype), M=M, r=r, xa=req.ptr(xa), s_xa0=xa.stride(0), s_xa1=xa.stride(1),
             u=req.ptr(u), s_u0=u.stride(0), s_u1=u.stride(1), scaling=repr(float(scaling)),
             out=req.ptr(out, out=True), out_dtype=dtype_code(out.dtype))


def multi_rows_call(req: Request, out, inp, R, ids, scaling, adapter_scale=None, transpose_R=False) -> None:
    """out_i = s_i·inp_i R[id_i] (transpose_R: R[id_i]ᵀ), zero rows for id -1, through multi_rows (launch.h)."""
    M, r = inp.shape
    n = R.shape[0]
    if R.dim() != 3 or R.shape[1:] != (r, r):
        raise ValueError(f"cuda_emu.multi_rows: R must be ({n}, {r}, {r}), got {tuple(R.shape)}")
    if not out.is_contiguous() or out.shape != (M, r):
        raise ValueError(f"cuda_emu.multi_rows: out must be a contiguous ({M}, {r}) tensor, got {tuple(out.shape)}")
    req.call("multi_rows", dtype=dtype_code(inp.dtype), M=M, r=r, n=n, **{"in": req.ptr(inp)},
             s_in0=inp.stride(0), s_in1=inp.stride(1), R=req.ptr(R), s_rn=R.stride(0), s_r0=R.stride(1),
             s_r1=R.stride(2), r_dtype=dtype_code(R.dtype), transpose_R=int(transpose_R),
             **_ids(req, ids, adapter_scale, M), scaling=repr(float(scaling)), out=req.ptr(out, out=True))


def multi_grad_r_call(req: Request, out, xa, u, perm, seg, scaling, adapter_scale=None) -> None:
    """grad_R[k] = s_k·Σ_{p in seg[k]..seg[k+1]} xa[perm[p]]ᵀ u[perm[p]] through multi_grad_r (launch.h)."""
    M, r = xa.shape
    n = out.shape[0]
    if not out.is_contiguous() or out.shape != (n, r, r):
        raise ValueError(f"cuda_emu.multi_grad_r: out must be a contiguous (n, {r}, {r}) tensor, "
                         f"got {tuple(out.shape)}")
    if perm.shape != (M,) or seg.shape != (n + 1,) or perm.dtype != seg.dtype or str(seg.dtype) != "torch.int64":
        raise ValueError(f"cuda_emu.multi_grad_r: perm ({M},) and seg ({n + 1},) int64, got {tuple(perm.shape)}, "
                         f"{tuple(seg.shape)} {perm.dtype}/{seg.dtype}")
    _check_adapter_scale(adapter_scale)
    req.call("multi_grad_r", dtype=dtype_code(xa.dtype), r=r, n=n, xa=req.ptr(xa), s_xa0=xa.stride(0),
             s_xa1=xa.stride(1), u=req.ptr(u), s_u0=u.stride(0), s_u1=u.stride(1), perm=req.ptr(perm),
             seg=req.ptr(seg), adapter_scale=req.ptr(adapter_scale), scaling=repr(float(scaling)),
             out=req.ptr(out, out=True), out_dtype=dtype_code(out.dtype))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--flavour", choices=sorted(FLAGS), action="append")
    b.add_argument("--kernels", default=None)
    args = ap.parse_args(argv)
    flavours = args.flavour or sorted(FLAGS)
    # Both flavours at once keeps the 2 cores busy (7 units each).
    with ThreadPoolExecutor(len(flavours)) as ex:
        for exe in ex.map(lambda fl: build(fl, args.kernels, jobs=1, verbose=True), flavours):
            print(exe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
