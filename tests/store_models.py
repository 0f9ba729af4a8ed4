"""A small model for the AdapterStore tests: two chained bank layers named query and value (the
target names the store's README uses), and its fp64 truth with per-element yardsticks.

For a chain of L linear layers, layer l's rounding error is at most (C·u + depth·u_acc) times its
own output's absolute-value bound (tests/common.py's elementwise_tolerance), and carried through the
later layers on absolute values it stays within that factor times the chain's final absolute-value
bound (each later layer maps |e| ≤ t·|y_l|_abs to ≤ t·|y_{l+1}|_abs, and adds its own). Summed over
the L layers: L·elementwise_tolerance(dtype, final bound, depth), depth = the longest inner product
of any layer (in + r)."""

from __future__ import annotations

import torch
from torch import nn

from common import elementwise_tolerance
from loraxs_kernels import apply_loraxs

WIDTH, RANK = 24, 4


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        self.query = nn.Linear(WIDTH, WIDTH)
        self.value = nn.Linear(WIDTH, WIDTH)

    def forward(self, x):
        return self.value(self.query(x))


def chain_model(slots: int, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = Chain()
    apply_loraxs(model, rank=RANK, target_modules=["query", "value"], num_adapters=slots)
    return model.eval()


def random_adapter(model, seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """R's of order one (far from the init's 1e-5), so a wrong adapter moves the output visibly."""
    g = torch.Generator().manual_seed(1000 + seed)
    return {p: (torch.randn(RANK, RANK, generator=g) * 0.5).to(dtype) for p in ("query", "value")}


def layers(model):
    return [model.query, model.value]


def truth(model, x: torch.Tensor, adapters: list) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp64 output, fp64 absolute-value bound) of each row i with adapters[i] ({path: R} or None)."""
    outs, bounds = [], []
    for i, adapter in enumerate(adapters):
        y = x[i].to(torch.float64)
        yb = y.abs()
        for path, layer in zip(("query", "value"), layers(model)):
            W, b = layer.weight.double(), layer.bias.double()
            A, B = layer.lora_A.double(), layer.lora_B.double()
            s = layer.scaling
            y_new = y @ W.t() + b
            yb_new = yb @ W.abs().t() + b.abs()
            if adapter is not None:
                R = adapter[path].double()
                y_new = y_new + s * ((y @ A) @ R) @ B
                yb_new = yb_new + abs(s) * ((yb @ A.abs()) @ R.abs()) @ B.abs()
            y, yb = y_new, yb_new
        outs.append(y)
        bounds.append(yb)
    return torch.stack(outs), torch.stack(bounds)


def chain_tolerance(dtype, bound):
    return 2 * elementwise_tolerance(dtype, bound, depth=WIDTH + RANK)


def excess(out, expected, bound, dtype=torch.float32) -> float:
    """max over elements of |out − expected| / allowance: ≤ 1 passes."""
    return float(((out.double() - expected).abs() / chain_tolerance(dtype, bound)).max())
