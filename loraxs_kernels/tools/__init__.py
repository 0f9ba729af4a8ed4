"""Developer tools, run as modules or scripts; none is imported by `import loraxs_kernels`.

aot_report  `python -m loraxs_kernels.tools.aot_report [--check]`: compile every Triton kernel and
            autotune config for sm_80 and sm_90 without a GPU; registers, spills, shared memory, wgmma.
cuda_check  checks of the CUDA C++ build that need no GPU (scripts/cuda_check.sh).
tune_auto   writes the measured auto-dispatch table from a GPU benchmark run.
"""
