"""A roofline model of one LoRA-XS layer, and the one table of device peaks.

Work (FLOPs, a multiply-add = 2) for M tokens, K = in, N = out, rank r, with the layer's math
y = x Wᵀ + b + s·((x A) R) B and u = g Bᵀ:
    forward   2MKN (x Wᵀ) + 2MKr (x A) + 2Mr² (·R) + 2MrN (·B)
    backward  2MNK (g W) + 2MNr (u) + 2Mr² (u Rᵀ) + 2MrK (·Aᵀ) + 2Mr² (grad_R = (xA)ᵀ u)
    full      forward + backward
Minimum bytes: every tensor the mode must touch, read or written once (element size of the dtype):
    forward   read x, W, b, A, R, B; write y and x A (M×r, kept for the backward)
    backward  read g, x A, W, A, R, B; write grad_x and grad_R
    full      forward + backward (x A crosses between them through memory)
Element-wise adds and the scaling are not counted as FLOPs. The nn_linear floor is modelled as the
plain linear layer (r = 0, no x A); every other provider as the LoRA-XS layer, so achieved TFLOP/s
and GB/s compare on the same useful work (PEFT LoRA's extra A and B gradients are not counted).
A schedule that folds s·(A R B)ᵀ into W does a slightly different amount of arithmetic.

roofline_frac = max(FLOPs / peak FLOP/s, bytes / peak bandwidth) / measured time: 1.0 means the
call ran as fast as the device's peak compute or bandwidth allows for this work.
"""

from __future__ import annotations

import dataclasses
import re
import time

import torch

ELEMENT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def flops(M: int, K: int, N: int, r: int, mode: str, lora_xs: bool = True) -> int:
    fwd = 2 * M * K * N
    bwd = 2 * M * N * K
    if lora_xs:
        fwd += 2 * M * K * r + 2 * M * r * r + 2 * M * r * N
        bwd += 2 * M * N * r + 2 * M * r * r + 2 * M * r * K + 2 * M * r * r
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


def min_bytes(M: int, K: int, N: int, r: int, mode: str, dtype: str, lora_xs: bool = True) -> int:
    e = ELEMENT_BYTES[dtype]
    weights = K * N + N  # W and b
    adapter = (K * r + r * r + r * N) if lora_xs else 0
    xa = M * r if lora_xs else 0
    fwd = (M * K + weights + adapter + M * N + xa) * e
    bwd = (M * N + xa + K * N + adapter + M * K + (r * r if lora_xs else 0)) * e
    return {"forward": fwd, "backward": bwd, "full": fwd + bwd}[mode]


@dataclasses.dataclass(frozen=True)
class Peak:
    name: str
    tflops: dict  # dtype -> dense TFLOP/s (no 2:4 sparsity)
    gbps: float   # memory bandwidth, GB/s (10^9 bytes)
    source: str
    tokens: tuple = ()    # every one of these must appear in torch.cuda.get_device_name()
    exclude: tuple = ()   # none of these may (variants with other clocks or memory)

    def roofline_frac(self, n_flops: int, n_bytes: int, dtype: str, time_ms: float) -> float | None:
        peak_flops = self.tflops.get(dtype)
        if not peak_flops or not self.gbps or time_ms <= 0:
            return None
        best_s = max(n_flops / (peak_flops * 1e12), n_bytes / (self.gbps * 1e9))
        return best_s / (time_ms * 1e-3)


# The one table of peaks. Dense figures: NVIDIA's datasheets list tensor-core numbers "with
# sparsity", which are twice the dense rate. fp32 is the non-tensor-core rate (PyTorch does not use
# TF32 for fp32 matmuls unless allow_tf32 is set).
GPU_PEAKS = (
    Peak("NVIDIA H200 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}, 4800.0,
         "NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column (BF16/FP16 1,979 TFLOPS with sparsity, "
         "FP32 67 TFLOPS, 4.8 TB/s HBM3e)", tokens=("H200",), exclude=("NVL",)),
    Peak("NVIDIA H100 SXM", {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9}, 3350.0,
         "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column (BF16/FP16 1,979 TFLOPS with sparsity, "
         "FP32 67 TFLOPS, 3.35 TB/s HBM3)", tokens=("H100",), exclude=("PCIE", "NVL")),
    Peak("NVIDIA A100 80GB SXM", {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}, 2039.0,
         "NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column (BF16/FP16 312 TFLOPS dense, "
         "FP32 19.5 TFLOPS, 2,039 GB/s HBM2e)", tokens=("A100", "80GB"), exclude=("PCIE",)),
    Peak("NVIDIA L4", {"bf16": 121.0, "fp16": 121.0, "fp32": 30.3}, 300.0,
         "NVIDIA L4 Tensor Core GPU datasheet (BF16/FP16 242 TFLOPS with sparsity, FP32 30.3 TFLOPS, "
         "300 GB/s GDDR6)", tokens=("L4",)),
)


def gpu_peak(device_name: str) -> Peak | None:
    """The table entry for a CUDA device name such as 'NVIDIA H100 80GB HBM3', or None."""
    words = set(re.split(r"[\s\-_]+", device_name.upper()))
    for peak in GPU_PEAKS:
        if all(t in words for t in peak.tokens) and not any(x in words for x in peak.exclude):
            return peak
    return None


def measure_cpu_peak(quick: bool = False) -> Peak:
    """CPU peaks are not in the table: the machine is unknown (a shared CI box). Measured instead
    as the best of a few fp32 torch.mm and tensor copies: attainable rates, not datasheet peaks,
    and as noisy as the machine is busy."""
    n = 512 if quick else 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    src = torch.empty((8 if quick else 32) * 2**20)  # floats: 32 or 128 MiB, past any L3
    dst = torch.empty_like(src)
    best_mm = best_copy = float("inf")
    torch.mm(a, b)
    dst.copy_(src)
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best_mm = min(best_mm, time.perf_counter() - t0)
        t0 = time.perf_counter()
        dst.copy_(src)
        best_copy = min(best_copy, time.perf_counter() - t0)
    tflops = 2 * n**3 / best_mm / 1e12
    gbps = 2 * src.numel() * src.element_size() / best_copy / 1e9  # a copy reads and writes
    return Peak("CPU (measured)", {"fp32": tflops}, gbps,
                f"measured on this machine at start-up, {torch.get_num_threads()} threads: best of 5 fp32 "
                f"torch.mm {n}³ and {src.numel() * 4 // 2**20} MiB copies. Rough: an attainable rate, "
                f"not a datasheet peak, and lower when other jobs share the CPU")


def best_of(a: Peak, b: Peak) -> Peak:
    """Two measured CPU peaks (start and end of a run) as one: the higher rate of each kind."""
    tflops = {d: max(a.tflops.get(d, 0.0), b.tflops.get(d, 0.0)) for d in {**a.tflops, **b.tflops}}
    return dataclasses.replace(a, tflops=tflops, gbps=max(a.gbps, b.gbps),
                               source=a.source.replace("at start-up", "at the start and the end of the run "
                                                       "(the higher of the two)"))


def peak_for(device: torch.device, quick: bool = False) -> Peak | None:
    if device.type == "cuda":
        return gpu_peak(torch.cuda.get_device_name(device))
    if device.type == "cpu":
        return measure_cpu_peak(quick)
    return None
