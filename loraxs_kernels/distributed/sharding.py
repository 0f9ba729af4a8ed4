"""How loraxs::linear_fwd and linear_bwd run on DTensors (registered on import of this module).

    y = x Wᵀ + b + s·((x A) R) B,   xa = x A (M×r, kept for the backward)
    grad_x = g W + s·((g Bᵀ) Rᵀ) Aᵀ,   grad_R = s·xaᵀ (g Bᵀ)

The layout is read from the layer's tensors (W, b, A, R, B); x and the incoming gradient are
redistributed to what that layout needs. Per mesh dimension:

    layout        W         b         A         R    B         x          y          xa         grad_x     grad_R
    column-wise   Shard(0)  Shard(0)  Replicate Rep  Shard(1)  Replicate  Shard(-1)  Replicate  Partial    Partial
    row-wise      Shard(1)  Replicate Shard(0)  Rep  Replicate Shard(-1)  Partial    Partial    Shard(-1)  Partial
    replicated    Rep       Rep       Rep       Rep  Rep       Replicate  Replicate  Replicate  Replicate  Replicate
    batch         Rep       Rep       Rep       Rep  Rep       Shard(0)   Shard(0)   Shard(0)   Shard(0)   Partial

Column-wise: every rank holds a slice of the output features (W's rows, B's columns) and computes
x A and (x A) R whole, redundantly (M×r: small); its grad_x and grad_R each miss the other ranks'
output features, so both are Partial (sums over ranks). Row-wise: every rank holds a slice of the
input features (W's columns, A's rows), so x A is a partial sum, and so is y; the bias is added on
one rank only (b enters as Partial). grad_R = s·xaᵀ(g Bᵀ) is linear in xa, so its per-rank terms
from the partial xa sum to the true gradient: grad_R is Partial in every sharded layout, and the
reduction happens when R's gradient is used (r² numbers per layer). R itself is never sharded.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.experimental import register_sharding

from ..ops.linear import NATIVE_REASON

if NATIVE_REASON is not None:
    raise ImportError(
        f"loraxs_kernels.distributed needs the C++ op (torch.ops.loraxs.linear_fwd) for its DTensor rules: {NATIVE_REASON}"
    )


class UnsupportedLayout(ValueError):
    """A DTensor layout of the layer's tensors that the op has no sharding rule for."""


_REP = Replicate()
# (W, b, A, R, B) placements of each supported layout, b given for a layer with a bias.
_LAYOUTS = {
    "column-wise": (Shard(0), Shard(0), _REP, _REP, Shard(1)),
    "row-wise": (Shard(1), _REP, Shard(0), _REP, _REP),
    "replicated": (_REP, _REP, _REP, _REP, _REP),
}


def _placements(spec) -> tuple:
    return tuple(spec.placements) if spec is not None and hasattr(spec, "placements") else None


def _ndim(spec) -> int:
    return len(spec.tensor_meta.shape)


def _layout_of(op_name: str, named: dict) -> list[str]:
    """The layout of each mesh dimension, or UnsupportedLayout naming the tensors' placements."""
    names = [n for n in ("weight", "bias", "A", "R", "B") if named.get(n) is not None]
    per_tensor = {n: _placements(named[n]) for n in names}
    mesh_ndim = len(next(iter(per_tensor.values())))
    layouts = []
    for d in range(mesh_ndim):
        got = tuple(per_tensor[n][d] if per_tensor[n] is not None else _REP for n in names)
        for layout, want in _LAYOUTS.items():
            want = tuple(p for n, p in zip(("weight", "bias", "A", "R", "B"), want) if n in names)
            if got == want:
                layouts.append(layout)
                break
        else:
            desc = ", ".join(f"{n}={p}" for n, p in zip(names, got))
            supported = "; ".join(
                f"{k}: " + ", ".join(f"{n}={p}" for n, p in zip(("weight", "bias", "A", "R", "B"), v))
                for k, v in _LAYOUTS.items()
            )
            raise UnsupportedLayout(
                f"{op_name}: no sharding rule for the layout {desc} (mesh dimension {d}); "
                f"R is never sharded, and W, b, A, B must follow one of {supported}. "
                "LoRAXSColwiseParallel / LoRAXSRowwiseParallel (loraxs_kernels.distributed) produce these."
            )
    return layouts


def _fwd_strategies(layout: str, x_ndim: int, x_placement, has_bias: bool):
    """[(outputs (y, xa), inputs (x, W, b, A, R, B, scaling, backend))] for one mesh dimension."""
    last = Shard(x_ndim - 1)
    bias = lambda p: p if has_bias else None  # noqa: E731
    if layout == "column-wise":
        return [([last, _REP], [_REP, Shard(0), bias(Shard(0)), _REP, _REP, Shard(1), None, None])]
    if layout == "row-wise":
        return [([Partial(), Partial()], [last, Shard(1), bias(Partial()), Shard(0), _REP, _REP, None, None])]
    replicated = ([_REP, _REP], [_REP, _REP, bias(_REP), _REP, _REP, _REP, None, None])
    if x_ndim >= 2 and x_placement == Shard(0):
        # Rows of x split over ranks: x A flattened to (M, r) stays split by rows.
        return [([Shard(0), Shard(0)], [Shard(0), _REP, bias(_REP), _REP, _REP, _REP, None, None])]
    return [replicated]


def _bwd_strategies(layout: str, g_ndim: int, g_placement, need_x: bool):
    """[(outputs (grad_x, grad_R), inputs (g, xa, W, A, R, B, scaling, need_x, need_R, backend))]."""
    last = Shard(g_ndim - 1)
    gx = lambda p: p if need_x else _REP  # noqa: E731  (grad_x is an empty (0,) tensor then)
    tail = [None, None, None, None]
    if layout == "column-wise":
        return [([gx(Partial()), Partial()], [last, _REP, Shard(0), _REP, _REP, Shard(1), *tail])]
    if layout == "row-wise":
        return [([gx(last), Partial()], [_REP, Partial(), Shard(1), Shard(0), _REP, _REP, *tail])]
    if g_ndim >= 2 and g_placement == Shard(0):
        return [([gx(Shard(0)), Partial()], [Shard(0), Shard(0), _REP, _REP, _REP, _REP, *tail])]
    return [([gx(_REP), _REP], [_REP, _REP, _REP, _REP, _REP, _REP, *tail])]


def _one_mesh_dim(layouts: list[str], op_name: str):
    if len(layouts) != 1:
        # expand_to_full_mesh_op_strategy applies one per-dimension list to every mesh dimension.
        raise UnsupportedLayout(
            f"{op_name}: the layer's tensors are on a {len(layouts)}-D device mesh; the sharding rule covers "
            "a 1-D mesh (one tensor-parallel dimension). Apply FSDP2 or DDP over the other dimension."
        )
    return layouts[0]


@register_sharding(torch.ops.loraxs.linear_fwd.default)
def linear_fwd_sharding(x, weight, bias, A, R, B, scaling, backend):
    named = {"weight": weight, "bias": bias, "A": A, "R": R, "B": B}
    layout = _one_mesh_dim(_layout_of("loraxs::linear_fwd", named), "loraxs::linear_fwd")
    return _fwd_strategies(layout, _ndim(x), _placements(x)[0], bias is not None)


@register_sharding(torch.ops.loraxs.linear_bwd.default)
def linear_bwd_sharding(grad_out, xa, weight, A, R, B, scaling, need_x, need_R, backend):
    named = {"weight": weight, "A": A, "R": R, "B": B}
    layout = _one_mesh_dim(_layout_of("loraxs::linear_bwd", named), "loraxs::linear_bwd")
    return _bwd_strategies(layout, _ndim(grad_out), _placements(grad_out)[0], need_x)
