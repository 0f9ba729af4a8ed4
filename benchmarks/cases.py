"""What is measured: layer shapes from real models, token counts, ranks, dtypes, modes and presets.

A case is one LoRA-XS layer call: M tokens through an in→out linear layer with a rank-r adapter,
in one dtype. Every provider is measured on every case in every mode, on the same input tensors.
A many-adapter case (preset "multi", issue 11) also has a bank of `adapters` R matrices of which
`active` distinct ones are named by the batch's rows.
"""

from __future__ import annotations

import dataclasses

import torch

PRESETS = ("quick", "full", "smoke", "multi")
MODES = ("forward", "backward", "full")
"""forward: the training forward (autograd records the graph, x and the adapter require grad).
backward: the backward alone, from a fresh forward that is not timed. full: forward + backward."""

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Shape:
    model: str
    layer: str
    in_features: int
    out_features: int


# Shapes read off the models' config.json files. Llama-3-8B and Mistral-7B share every projection
# shape (hidden 4096, intermediate 14336, 8 KV heads × 128 = 1024), so one row covers both; Llama-2-7B
# differs (intermediate 11008, k/v 4096→4096) and is not listed.
LLAMA = "llama3-8b/mistral-7b"
ROBERTA = "roberta-large"
SHAPES = (
    Shape(LLAMA, "q_proj/o_proj", 4096, 4096),
    Shape(LLAMA, "k_proj/v_proj", 4096, 1024),
    Shape(LLAMA, "gate_proj/up_proj", 4096, 14336),
    Shape(LLAMA, "down_proj", 14336, 4096),
    Shape(ROBERTA, "query/value/attention.output.dense", 1024, 1024),
    Shape(ROBERTA, "intermediate.dense", 1024, 4096),
    Shape(ROBERTA, "output.dense", 4096, 1024),
)
TOKENS = (1, 16, 128, 2048, 8192)
RANKS = (4, 16, 64)
TINY = Shape("tiny", "smoke", 64, 48)


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    layer: str
    in_features: int
    out_features: int
    M: int
    rank: int
    dtype: str  # a key of DTYPES
    key: bool = False  # the headline case of its preset (summarised first in results.md)
    adapters: int = 0  # many-adapter cases: adapters resident in the bank (0: a single-adapter case)
    active: int = 0    # ... and how many distinct ones the batch's rows name

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def shape_id(self) -> str:
        return f"{self.in_features}x{self.out_features}"

    @property
    def id(self) -> str:
        many = f"-n{self.adapters}a{self.active}" if self.adapters else ""
        return f"{self.shape_id}-M{self.M}-r{self.rank}-{self.dtype}{many}"

    def describe(self) -> str:
        many = f", {self.active} of {self.adapters} adapters" if self.adapters else ""
        return (f"{self.model} {self.layer}: {self.in_features}→{self.out_features}, M={self.M}, "
                f"r={self.rank}, {self.dtype}{many}")


def _case(shape: Shape, M: int, rank: int, dtype: str, key: bool = False, adapters: int = 0,
          active: int = 0) -> Case:
    return Case(shape.model, shape.layer, shape.in_features, shape.out_features, M, rank, dtype, key, adapters,
                active)


def _shape(in_features: int, out_features: int, model: str) -> Shape:
    return next(s for s in SHAPES if (s.in_features, s.out_features, s.model) == (in_features, out_features, model))


def default_dtypes(device: torch.device, preset: str) -> tuple[str, ...]:
    """fp32 on CPU (CPU half-precision GEMMs are emulation-speed, not a training target); on GPU
    bf16 for the quick preset, bf16 and fp16 for the full one."""
    if device.type != "cuda":
        return ("fp32",)
    return ("bf16", "fp16") if preset == "full" else ("bf16",)


# The issue-2 CPU target: a RoBERTa-large attention projection over 4096 tokens (e.g. 8 × 512).
CPU_KEY = dict(shape=_shape(1024, 1024, ROBERTA), M=4096, rank=16)
# The GPU headline: a Llama/Mistral q/o projection over 8192 tokens at the rank LoRAFusion reports.
GPU_KEY = dict(shape=_shape(4096, 4096, LLAMA), M=8192, rank=16)


def cases_for(preset: str, device: torch.device, dtypes: tuple[str, ...] | None = None) -> list[Case]:
    """The cases of a preset on a device, the key case first. dtypes overrides the device default."""
    dtypes = tuple(dtypes or default_dtypes(device, preset))
    gpu = device.type == "cuda"
    key = GPU_KEY if gpu else CPU_KEY
    out: list[Case] = []
    seen: set = set()

    def add(shape, M, rank, dtype):
        if (shape, M, rank, dtype) in seen:
            return
        seen.add((shape, M, rank, dtype))
        is_key = (shape, M, rank) == (key["shape"], key["M"], key["rank"]) and dtype == dtypes[0]
        out.append(_case(shape, M, rank, dtype, key=is_key))

    if preset == "multi":
        # Issue 11's goals. CPU: 4096 rows over 1,000 adapters (ids uniformly random), against the
        # single-adapter op, the per-adapter loop and PEFT's mixed batch. GPU: decode (64 rows over 64
        # distinct adapters of 10,000 resident; 16 rows, the CUDA decode kernel's range) against
        # nn.Linear, and prefill (8192 rows over 1,000) against the single-adapter op.
        for dtype in dtypes:
            if gpu:
                out.append(_case(key["shape"], 8192, 16, dtype, key=dtype == dtypes[0], adapters=1000, active=1000))
                out.append(_case(key["shape"], 64, 16, dtype, adapters=10_000, active=64))
                out.append(_case(key["shape"], 16, 16, dtype, adapters=10_000, active=16))
            else:
                out.append(_case(key["shape"], key["M"], 16, dtype, key=dtype == dtypes[0], adapters=1000,
                                 active=1000))
                out.append(_case(key["shape"], 64, 16, dtype, adapters=10_000, active=64))
        return out
    if preset == "smoke":
        # Seconds: one tiny case is enough to run every provider in every mode end to end.
        for dtype in dtypes:
            out.append(_case(TINY, 32, 8, dtype, key=dtype == dtypes[0]))
            out.append(_case(TINY, 32, 8, dtype, adapters=10, active=5))
        return out
    if preset == "quick":
        for dtype in dtypes:
            add(key["shape"], key["M"], key["rank"], dtype)
            if gpu:
                # Under 3 minutes on an H200: every Llama/Mistral projection, decode-ish to large batch.
                for shape in SHAPES[:4]:
                    for rank in (16, 64):
                        for M in (16, 2048, 8192):
                            add(shape, M, rank, dtype)
            else:
                # A few minutes on a 2-core CPU: the two square-ish RoBERTa-large shapes at r=16.
                for shape in (SHAPES[4], SHAPES[5]):
                    for M in (1, 128, 2048):
                        add(shape, M, 16, dtype)
        return out
    if preset == "full":
        for dtype in dtypes:
            add(key["shape"], key["M"], key["rank"], dtype)
            for shape in SHAPES:
                for rank in RANKS:
                    for M in TOKENS:
                        add(shape, M, rank, dtype)
        return out
    raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")

