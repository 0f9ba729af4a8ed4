"""Builds the C++ extension loraxs_kernels._C (csrc/).

A CUDAExtension (csrc/cpu + csrc/cuda, machine code for sm_80 and sm_90 plus compute_90 PTX, which the driver
JIT-compiles on newer GPUs such as sm_100/sm_120, unless TORCH_CUDA_ARCH_LIST says otherwise)
when the installed torch has CUDA and nvcc is found; otherwise a CPU-only CppExtension. Set
LORAXS_CPU_ONLY=1 to force the CPU-only build. The library registers its kernels with torch's
dispatcher (TORCH_LIBRARY); it has no Python bindings, and loraxs_kernels loads it with
torch.ops.load_library.
"""

import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))


def rel(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    cxx = ["-O3"]  # BuildExtension adds the -std= that this torch needs (C++20 for 2.14)
    with_cuda = torch.version.cuda is not None and CUDA_HOME is not None and not os.environ.get("LORAXS_CPU_ONLY")
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
