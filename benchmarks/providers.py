"""The implementations compared, each built around the same input tensors of a case.

    nn_linear         a frozen nn.Linear alone (x requires grad, the weight does not): the floor
    unfused           reference.unfused_linear in plain autograd: what LoRA-XS and PEFT TinyLoRA run
    peft_lora         PEFT's LoRA layer of the same rank around the same frozen nn.Linear
    compiled_unfused  torch.compile of the unfused chain (compile time reported apart)
    torch, cpp, triton, cuda   this package's op, loraxs_linear(..., backend=name)
many-adapter cases only (preset "multi"; the single-adapter providers above run the whole batch
through one R, the yardstick of issue 11's goals):
    multi, multi_torch, multi_triton, multi_cuda   loraxs_linear_multi(..., backend=auto/name)
    multi_loop        the single-adapter op once per adapter on its rows (what a caller writes without it)
    peft_lora_mixed   PEFT LoRA with one rank-r adapter per active adapter (at most 64) and
                      `adapter_names=` (forward only: PEFT refuses adapter_names in training mode)

A provider either builds (inputs → Built) or says in one sentence why it cannot run on the device.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
from typing import Callable

import torch
from torch import nn

from loraxs_kernels import backends as lx_backends
from loraxs_kernels import loraxs_linear, loraxs_linear_multi, reference

from .cases import Case

# The official 7B recipes use scaling 1; the value does not change the work done.
SCALING = 1.0


@dataclasses.dataclass
class Inputs:
    """One case's tensors, shared by every provider so all of them read the same memory."""

    x: torch.Tensor         # (M, in), requires grad: the layer sits inside a network
    weight: torch.Tensor    # (out, in), frozen
    bias: torch.Tensor      # (out,), frozen
    A: torch.Tensor         # (in, r), frozen
    R: torch.Tensor         # (r, r), the only trainable tensor of LoRA-XS
    B: torch.Tensor         # (r, out), frozen
    grad_out: torch.Tensor  # (M, out): the upstream gradient the backward is fed
    scaling: float = SCALING
    R_bank: torch.Tensor | None = None  # many-adapter cases: (adapters, r, r), trainable
    ids: torch.Tensor | None = None     # ... and (M,) int64 adapter ids naming `active` distinct adapters


def make_inputs(case: Case, device: torch.device, seed: int = 0) -> Inputs:
    """Random tensors with the magnitudes of a real layer, so half precision neither overflows nor
    flushes to zero. A and B are not an SVD of W: the kernels' time does not depend on the values,
    and an SVD of a 14336×4096 weight would cost more than the benchmark of it."""
    torch.manual_seed(seed)
    K, N, r, M = case.in_features, case.out_features, case.rank, case.M
    kw = dict(device=device, dtype=case.torch_dtype)
    bound = 1.0 / math.sqrt(K)  # nn.Linear's initialisation range
    many = {}
    if case.adapters:
        # `active` distinct adapters drawn from the bank, each on at least one row when M allows, in a
        # random row order (serving batches interleave tenants).
        chosen = torch.randperm(case.adapters)[: case.active]
        ids = chosen[torch.arange(M) % case.active][torch.randperm(M)]
        many = dict(R_bank=(torch.randn(case.adapters, r, r, **kw) / math.sqrt(r)).requires_grad_(True),
                    ids=ids.to(device))
    return Inputs(**many,
        x=torch.randn(M, K, **kw).requires_grad_(True),
        weight=torch.empty(N, K, **kw).uniform_(-bound, bound),
        bias=torch.empty(N, **kw).uniform_(-bound, bound),
        A=torch.randn(K, r, **kw) / math.sqrt(K),   # x A ~ N(0, 1)
        R=(torch.randn(r, r, **kw) / math.sqrt(r)).requires_grad_(True),
        B=torch.randn(r, N, **kw) / math.sqrt(r),
        grad_out=torch.randn(M, N, **kw),
    )


@dataclasses.dataclass
class Built:
    forward: Callable[[], torch.Tensor]  # y for the case's x, recording the autograd graph
    grad_inputs: list[torch.Tensor]      # what the backward differentiates: x and the trainable tensors
    owned: list[torch.Tensor]            # the layer's own parameters and buffers (not activations)


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    summary: str
    reason: Callable[[torch.device], str | None]  # None: runs on this device
    build: Callable[[Inputs], Built]
    compiles: bool = False   # the first call compiles or autotunes: report it as compile_ms
    lora_xs: bool = True     # computes the LoRA-XS layer (False: the plain linear floor)
    same_output: bool = True  # y equals reference.loraxs_linear(_multi) up to rounding
    many: bool = False       # needs a many-adapter case (preset "multi")
    forward_only: bool = False  # measured in the forward mode only

    def unavailable_reason(self, device: torch.device) -> str | None:
        try:
            return self.reason(device)
        except Exception as e:  # a broken optional dependency must not stop the run
            return f"{type(e).__name__}: {e}"


def _frozen_linear(inp: Inputs) -> nn.Linear:
    """An nn.Linear whose parameters are the case's W and b (same storage), frozen."""
    N, K = inp.weight.shape
    layer = nn.Linear(K, N, device="meta")  # meta: skip allocating and initialising weights we replace
    layer.weight = nn.Parameter(inp.weight, requires_grad=False)
    layer.bias = nn.Parameter(inp.bias, requires_grad=False)
    return layer


def _lora_xs_owned(inp: Inputs) -> list[torch.Tensor]:
    return [inp.weight, inp.bias, inp.A, inp.R, inp.B]


# ----------------------------------------------------------------------------------------- baselines
def _build_nn_linear(inp: Inputs) -> Built:
    layer = _frozen_linear(inp)
    return Built(lambda: layer(inp.x), [inp.x], [inp.weight, inp.bias])


def _build_unfused(inp: Inputs) -> Built:
    def forward():
        return reference.unfused_linear(inp.x, inp.weight, inp.bias, inp.A, inp.R, inp.B, inp.scaling)

    return Built(forward, [inp.x, inp.R], _lora_xs_owned(inp))


def _peft_reason(device: torch.device) -> str | None:
    if importlib.util.find_spec("peft") is None:
        return "peft is not installed (pip install peft)"
    return None


def _build_peft_lora(inp: Inputs) -> Built:
    # Imported here: peft pulls in transformers-adjacent modules and takes seconds to import.
    from peft import LoraConfig
    from peft.tuners.lora import Linear as LoraLinear

    r = inp.A.shape[1]
    alpha = r * inp.scaling  # PEFT's scaling is lora_alpha / r
    base = _frozen_linear(inp)
    kwargs = dict(r=r, lora_alpha=alpha)
    # Recent peft requires the config here; older releases have no such argument.
    if "config" in inspect.signature(LoraLinear.__init__).parameters:
        kwargs["config"] = LoraConfig(r=r, lora_alpha=alpha)
    layer = LoraLinear(base, "default", **kwargs)
    lora_A, lora_B = layer.lora_A["default"], layer.lora_B["default"]
    lora_A.to(device=inp.x.device, dtype=inp.x.dtype)
    lora_B.to(device=inp.x.device, dtype=inp.x.dtype)
    with torch.no_grad():
        # PEFT starts lora_B at zero; give both factors LoRA-XS's values so the work matches a trained layer.
        lora_A.weight.copy_(inp.A.t())
        lora_B.weight.copy_(inp.B.t())
    # PEFT LoRA trains both factors: r·(in+out) parameters, against r² for LoRA-XS.
    return Built(lambda: layer(inp.x), [inp.x, lora_A.weight, lora_B.weight],
                 [inp.weight, inp.bias, lora_A.weight, lora_B.weight])


def _compile_reason(device: torch.device) -> str | None:
    import torch._dynamo

    if not getattr(torch._dynamo, "is_dynamo_supported", lambda: True)():
        return "torch.compile (dynamo) is not supported on this Python/platform"
    return None


def _build_compiled_unfused(inp: Inputs) -> Built:
    import torch._dynamo

    # A fresh cache per case: with dynamic=False every new shape recompiles, and after
    # recompile_limit recompiles dynamo would silently fall back to eager. Resetting also makes
    # compile_ms the cost of one shape's compile (Inductor's on-disk caches still apply).
    torch._dynamo.reset()
    compiled = torch.compile(reference.unfused_linear, dynamic=False)

    def forward():
        return compiled(inp.x, inp.weight, inp.bias, inp.A, inp.R, inp.B, inp.scaling)

    return Built(forward, [inp.x, inp.R], _lora_xs_owned(inp))


# ------------------------------------------------------------------------------- package backends
def _backend_reason(name: str) -> Callable[[torch.device], str | None]:
    def reason(device: torch.device) -> str | None:
        if name == "triton" and device.type != "cuda":
            return ("triton runs on CPU only under the interpreter (TRITON_INTERPRET=1), "
                    "a correctness tool that is not benchmarked")
        return lx_backends.unavailable_reason(name, device)

    return reason


def _backend_builder(name: str) -> Callable[[Inputs], Built]:
    def build(inp: Inputs) -> Built:
        def forward():
            return loraxs_linear(inp.x, inp.weight, inp.bias, inp.A, inp.R, inp.B, inp.scaling, backend=name)

        return Built(forward, [inp.x, inp.R], _lora_xs_owned(inp))

    return build


# ------------------------------------------------------------------------------- many adapters
def _many(inp: Inputs) -> None:
    if inp.R_bank is None:
        raise ValueError("not a many-adapter case: run these providers with --preset multi")


def _multi_builder(name: str) -> Callable[[Inputs], Built]:
    def build(inp: Inputs) -> Built:
        _many(inp)

        def forward():
            return loraxs_linear_multi(inp.x, inp.weight, inp.bias, inp.A, inp.R_bank, inp.B, inp.ids, inp.scaling,
                                       backend=name)

        return Built(forward, [inp.x, inp.R_bank], [inp.weight, inp.bias, inp.A, inp.R_bank, inp.B])

    return build


def _build_multi_loop(inp: Inputs) -> Built:
    """Rows sorted by adapter once, then one single-adapter call per adapter present. x and the bank
    are split with one op each (split, unbind), whose backwards are one cat / stack: indexing x[rows]
    per adapter instead made each backward allocate an (M×in) zero tensor per adapter (measured:
    13.9 s for forward + backward at 1,000 adapters)."""
    _many(inp)
    order = torch.argsort(inp.ids, stable=True)
    adapters, counts = torch.unique_consecutive(inp.ids[order], return_counts=True)
    adapters, counts, inverse = adapters.tolist(), counts.tolist(), torch.argsort(order)

    def forward():
        xs = inp.x.index_select(0, order).split(counts)
        Rs = inp.R_bank.unbind(0)
        outs = [loraxs_linear(xk, inp.weight, inp.bias, inp.A, Rs[k], inp.B, inp.scaling)
                for k, xk in zip(adapters, xs)]
        return torch.cat(outs).index_select(0, inverse)

    return Built(forward, [inp.x, inp.R_bank], [inp.weight, inp.bias, inp.A, inp.R_bank, inp.B])


PEFT_MIXED_MAX_ADAPTERS = 64


def _build_peft_lora_mixed(inp: Inputs) -> Built:
    """PEFT's mixed-adapter batch: one rank-r LoRA adapter per active adapter (at most 64, the
    issue's comparison; rows beyond that reuse them), rows naming theirs through adapter_names."""
    from peft import LoraConfig, get_peft_model

    _many(inp)
    r = inp.A.shape[1]
    n = min(int(inp.ids.unique().numel()), PEFT_MIXED_MAX_ADAPTERS)
    base = nn.Sequential(_frozen_linear(inp))

    def config():
        return LoraConfig(r=r, lora_alpha=r * inp.scaling, target_modules=["0"], init_lora_weights=False)

    model = get_peft_model(base, config(), adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config())
    model.to(device=inp.x.device, dtype=inp.x.dtype)
    model.eval()  # adapter_names is refused in training mode
    _, dense = torch.unique(inp.ids, return_inverse=True)
    names = [f"a{i % n}" for i in dense.tolist()]
    lora = [p for name, p in model.named_parameters() if "lora_" in name]
    return Built(lambda: model(inp.x, adapter_names=names), [inp.x], [inp.weight, inp.bias, *lora])


_ALL = [
    Provider("nn_linear", "frozen nn.Linear alone (the floor: no adapter)", lambda d: None, _build_nn_linear,
             lora_xs=False, same_output=False),
    Provider("unfused", "reference.unfused_linear, plain autograd (official LoRA-XS / PEFT TinyLoRA chain)",
             lambda d: None, _build_unfused),
    Provider("peft_lora", "PEFT LoRA layer, same rank, trains A and B", _peft_reason, _build_peft_lora,
             same_output=False),
    Provider("compiled_unfused", "torch.compile(reference.unfused_linear, dynamic=False)", _compile_reason,
             _build_compiled_unfused, compiles=True),
    Provider("torch", "loraxs_linear(backend='torch'): ATen calls", _backend_reason("torch"),
             _backend_builder("torch")),
    Provider("cpp", "loraxs_linear(backend='cpp'): the C++ CPU kernel", _backend_reason("cpp"),
             _backend_builder("cpp")),
    # The first call JIT-compiles and autotunes: reported as compile_ms, excluded from the timings.
    Provider("triton", "loraxs_linear(backend='triton'): Triton kernels", _backend_reason("triton"),
             _backend_builder("triton"), compiles=True),
    Provider("cuda", "loraxs_linear(backend='cuda'): the C++/CUDA kernel", _backend_reason("cuda"),
             _backend_builder("cuda")),
    Provider("multi", "loraxs_linear_multi(backend='auto'): per-row R from a bank", lambda d: None,
             _multi_builder("auto"), many=True),
    Provider("multi_torch", "loraxs_linear_multi(backend='torch'): the grouped ATen schedule",
             _backend_reason("torch"), _multi_builder("torch"), many=True),
    Provider("multi_triton", "loraxs_linear_multi(backend='triton'): Triton kernels", _backend_reason("triton"),
             _multi_builder("triton"), compiles=True, many=True),
    Provider("multi_cuda", "loraxs_linear_multi(backend='cuda'): the C++/CUDA kernels", _backend_reason("cuda"),
             _multi_builder("cuda"), many=True),
    Provider("multi_loop", "the single-adapter op once per adapter on its rows", lambda d: None, _build_multi_loop,
             many=True),
    Provider("peft_lora_mixed", "PEFT LoRA, one adapter per active adapter (≤ 64), adapter_names=", _peft_reason,
             _build_peft_lora_mixed, many=True, same_output=False, forward_only=True),
]
PROVIDERS: dict[str, Provider] = {p.name: p for p in _ALL}
FUSED = ("torch", "cpp", "triton", "cuda")  # this package's backends
MULTI = ("multi", "multi_torch", "multi_triton", "multi_cuda")  # ... for many adapters
# The multi preset's default: the floor, the single-adapter op (the goals' yardstick), and the
# many-adapter providers; the unfused chain and single-adapter PEFT say nothing about many adapters.
MULTI_DEFAULT = ("nn_linear", "cpp", "triton", "cuda", "multi", "multi_triton", "multi_cuda", "multi_loop",
                 "peft_lora_mixed")


def select(names: list[str] | None, preset: str | None = None) -> list[Provider]:
    """Providers by name, in the canonical order; without names, the preset's default: every
    single-adapter provider, plus (smoke) or only (multi: MULTI_DEFAULT) the many-adapter ones."""
    if not names:
        if preset == "multi":
            return [p for p in _ALL if p.name in MULTI_DEFAULT]
        return [p for p in _ALL if not p.many or preset == "smoke"]
    unknown = [n for n in names if n not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}")
    return [p for p in _ALL if p.name in names]
