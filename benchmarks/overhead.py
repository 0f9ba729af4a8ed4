"""The host's cost per call: `python -m benchmarks --preset overhead`.

At M = 1, in = out = 64, r = 8 the math is a few thousand FLOPs, so the time per call is what the
layers between Python and the kernels cost: the product number for eager decoding. Each provider
runs `calls` back-to-back calls per sample (one synchronize at the end on CUDA), samples of all
providers are interleaved round by round, and the report gives the median µs per call and the
median over rounds of each provider's ratio to nn.Linear in the same round (a noisy neighbour slows
a whole round, not one provider).

Modes: "inference" (forward under torch.no_grad, as in decoding) and "full" (forward + backward of
a training step: x and R require grad, grad_out of ones). On CUDA a "graph" mode replays the
inference call from a captured CUDA graph (torch.cuda.graph), where the host cost disappears.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import loraxs_kernels
from loraxs_kernels import FusedLoRAXSLinear, backends, reference

from . import measure

SCALING = 0.5


@dataclasses.dataclass(frozen=True)
class Shape:
    M: int
    in_features: int
    out_features: int
    rank: int
    dtype: torch.dtype

    @property
    def id(self) -> str:
        return f"M{self.M}-{self.in_features}x{self.out_features}-r{self.rank}-{str(self.dtype).removeprefix('torch.')}"


def shapes_for(device: torch.device) -> list[Shape]:
    if device.type == "cuda":
        return [Shape(1, 64, 64, 8, torch.float32), Shape(1, 4096, 4096, 16, torch.bfloat16),
                Shape(16, 4096, 4096, 16, torch.bfloat16)]
    # The issue-8 goals: the tiny shape (host cost only), then RoBERTa-large's projection at M = 1…16.
    return [Shape(1, 64, 64, 8, torch.float32)] + [Shape(M, 1024, 1024, 16, torch.float32) for M in (1, 4, 16)]


def _layer(s: Shape, device) -> dict:
    torch.manual_seed(0)
    kw = dict(device=device, dtype=s.dtype)
    lin = nn.Linear(s.in_features, s.out_features, **kw).requires_grad_(False)
    mod = FusedLoRAXSLinear.from_linear(lin, s.rank, SCALING)
    with torch.no_grad():
        mod.lora_R.normal_(0, 1 / math.sqrt(s.rank))
    x = torch.randn(s.M, s.in_features, **kw)
    return dict(lin=lin, mod=mod, x=x, w=mod.weight, b=mod.bias, A=mod.lora_A, R=mod.lora_R, B=mod.lora_B)


def providers(device: torch.device) -> dict[str, Callable[[dict, torch.Tensor, torch.Tensor], torch.Tensor]]:
    """name -> f(layer, x, R) -> y. nn_linear is the floor; the rest compute the LoRA-XS layer."""
    out = {
        "nn_linear": lambda L, x, R: L["lin"](x),
        "unfused": lambda L, x, R: reference.unfused_linear(x, L["w"], L["b"], L["A"], R, L["B"], SCALING),
        "auto": lambda L, x, R: loraxs_kernels.loraxs_linear(x, L["w"], L["b"], L["A"], R, L["B"], SCALING),
        "module": lambda L, x, R: L["mod"](x),
    }
    for name in ("torch", "cpp", "triton", "cuda"):
        if name == "triton" and device.type != "cuda":
            continue  # the interpreter is a correctness tool, not a speed
        if backends.unavailable_reason(name, device) is None:
            out[name] = (lambda n: lambda L, x, R: loraxs_kernels.loraxs_linear(
                x, L["w"], L["b"], L["A"], R, L["B"], SCALING, backend=n))(name)
    return out


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_us(fn: Callable[[], object], calls: int, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync(device)
    return (time.perf_counter() - t0) / calls * 1e6


def _call(name: str, f, L, mode: str, device):
    """One timed unit for a mode: a zero-argument callable."""
    if mode == "inference":
        def run():
            with torch.no_grad():
                return f(L, L["x"], L["R"])
        return run
    if mode == "full":
        x = L["x"].detach().clone().requires_grad_(True)
        # nn.Linear has no R; its training step differentiates x alone, the floor of the others.
        wants = [x] if name == "nn_linear" else [x, L["R"]]
        g = None

        def run():
            nonlocal g
            y = f(L, x, L["R"])
            if g is None:
                g = torch.ones_like(y)
            return torch.autograd.grad(y, wants, g)
        return run
    if mode == "graph":
        # Capture after a warm-up on a side stream (Triton compiles and tunes there, never in capture).
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(3):
                f(L, L["x"], L["R"])
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            f(L, L["x"], L["R"])
        return graph.replay
    raise ValueError(mode)


def run(device: torch.device, out_dir: Path, rounds: int = 7, calls: int = 400, log=print) -> list[dict]:
    modes = ["inference", "full"] + (["graph"] if device.type == "cuda" else [])
    records = []
    for s in shapes_for(device):
        L = _layer(s, device)
        provs = providers(device)
        # Fewer calls where one call is long: about the same time per sample.
        n = calls if s.in_features <= 256 else max(20, calls // 8)
        for mode in modes:
            units = {}
            for name, f in provs.items():
                if mode == "graph" and name not in ("nn_linear", "auto", "cuda", "triton"):
                    continue
                try:
                    units[name] = _call(name, f, L, mode, device)
                    for _ in range(max(3, n // 10)):  # warm-up (and Triton's first compile)
                        units[name]()
                except Exception as e:  # a provider that fails is reported, the others go on
                    log(f"overhead: {name} {mode} {s.id}: {type(e).__name__}: {e}")
                    units.pop(name, None)
            times = {name: [] for name in units}
            for order in measure.round_orders(list(units), rounds):
                for name in order:
                    times[name].append(_sample_us(units[name], n, device))
            base = times.get("nn_linear")
            for name, ts in times.items():
                ratio = statistics.median(a / b for a, b in zip(ts, base)) if base else None
                records.append(dict(shape=s.id, M=s.M, in_features=s.in_features, out_features=s.out_features,
                                    rank=s.rank, dtype=str(s.dtype).removeprefix("torch."), mode=mode,
                                    provider=name, median_us=statistics.median(ts), min_us=min(ts),
                                    vs_nn_linear=ratio, rounds=rounds, calls_per_round=n))
            log(f"overhead {s.id} {mode}: " + ", ".join(
                f"{r['provider']} {r['median_us']:.1f} µs" for r in records if r["shape"] == s.id and r["mode"] == mode))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "overhead.json").write_text(json.dumps(records, indent=1))
    (out_dir / "overhead.md").write_text(markdown(records, device))
    return records


def markdown(records: list[dict], device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# Host cost per call ({name}, torch {torch.__version__}, {torch.get_num_threads()} thread(s))", "",
             "Median µs per call over interleaved rounds; `vs nn_linear`: median over rounds of the ratio "
             "to nn.Linear in the same round (lower is better, 1.00× is the floor).", "",
             "| shape | mode | provider | µs / call | vs nn_linear |", "|---|---|---|---|---|"]
    for r in records:
        ratio = f"{r['vs_nn_linear']:.2f}×" if r["vs_nn_linear"] is not None else "—"
        lines.append(f"| {r['shape']} | {r['mode']} | {r['provider']} | {r['median_us']:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"
