"""Builds the C++ extension loraxs_kernels._C (csrc/).

A CUDAExtension (csrc/cpu + csrc/cuda, machine code for sm_80 and sm_90 plus compute_90 PTX, which the driver
JIT-compiles on newer GPUs such as sm_100/sm_120, unless TORCH_CUDA_ARCH_LIST says otherwise)
when the installed torch has CUDA and a CUDA toolkit is found (nvcc and its headers); otherwise a CPU-only
CppExtension, with the reason printed. Set LORAXS_CPU_ONLY=1 to force the CPU-only build. The library registers its kernels with torch's
dispatcher (TORCH_LIBRARY); it has no Python bindings, and loraxs_kernels loads it with
torch.ops.load_library.
"""

import glob
import os
import shutil
import sys


def _has_cuda_headers(home):
    return bool(home) and os.path.isfile(os.path.join(home, "include", "cuda_runtime_api.h"))


# torch guesses CUDA_HOME from nvcc's path on PATH; an nvcc that is a wrapper script in /usr/local/bin (seen on
# this project's machines) makes that guess /usr/local, which holds no CUDA headers, and the CUDA build then fails
# on cuda_runtime_api.h. Point it at the toolkit the wrapper stands for, when one is installed in the usual place.
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH"):
    nvcc = shutil.which("nvcc")
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None
    if guess and not _has_cuda_headers(guess) and _has_cuda_headers("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"

from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3"]  # BuildExtension adds the -std= that this torch needs (C++20 for 2.14)
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not os.environ.get("LORAXS_CPU_ONLY")
    if with_cuda and not _has_cuda_headers(CUDA_HOME):
        print(f"setup.py: torch {torch.__version__} has CUDA but CUDA_HOME={CUDA_HOME} holds no include/cuda_runtime_api.h: "
              "building the CPU-only extension (set CUDA_HOME to a CUDA toolkit to build the CUDA kernels)", file=sys.stderr)
        with_cuda = False
    cuda_sources = rel("csrc/cuda/*.cu") + rel("csrc/cuda/*.cpp")
    if with_cuda and cuda_sources:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        nvcc += os.environ.get("LORAXS_NVCC_FLAGS", "").split()
        return CUDAExtension(
            "loraxs_kernels._C",
            sources + cuda_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("LORAXS_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    return CppExtension("loraxs_kernels._C", sources, include_dirs=[os.path.join(ROOT, "csrc")], extra_compile_args=cxx)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
