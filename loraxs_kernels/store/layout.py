"""One adapter as one flat row: every bank layer's R (r_l × r_l), flattened and concatenated in the
model's module order. A fixed row width lets the store keep every adapter in a few packed arrays and
move one adapter, or a batch of them, with a slice per layer instead of a dict of small tensors."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..modules.multi import MultiLoRAXSLinear

STORAGE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def bank_layers(model: nn.Module) -> list[tuple[str, MultiLoRAXSLinear]]:
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, MultiLoRAXSLinear)]
    if not layers:
        raise ValueError("AdapterStore needs a model with MultiLoRAXSLinear banks: apply_loraxs(model, rank, "
                         "target_modules, num_adapters=n) makes them (n = the number of device slots)")
    return layers


class RecordLayout:
    """Where each bank layer's R lives inside an adapter's row."""

    def __init__(self, layers: list[tuple[str, MultiLoRAXSLinear]]):
        self.paths = [p for p, _ in layers]
        self.ranks = [m.rank for _, m in layers]
        self.offsets = []
        width = 0
        for r in self.ranks:
            self.offsets.append(width)
            width += r * r
        self.width = width

    def describe(self) -> list[list]:
        return [[p, r] for p, r in zip(self.paths, self.ranks)]

    def mismatch(self, described) -> str | None:
        """None when a stored layout (describe()'s list) is this one, else the first difference."""
        mine = self.describe()
        for i, (a, b) in enumerate(zip(mine, described)):
            if list(a) != list(b):
                return f"layer {i}: the model has {a[0]!r} of rank {a[1]}, the store {b[0]!r} of rank {b[1]}"
        if len(mine) != len(described):
            return f"the model has {len(mine)} bank layers, the store was made for {len(described)}"
        return None

    def pack(self, adapter, dtype: torch.dtype) -> torch.Tensor:
        """The row (width,) of `adapter` = {layer path: R (r, r)}, checked whole before anything is
        written: raises naming the first layer that is missing, unknown, mis-shaped or not finite."""
        if not isinstance(adapter, Mapping):
            raise TypeError(f"an adapter is a dict {{layer path: (r, r) tensor}} or a save_adapter folder, got "
                            f"{type(adapter).__name__}")
        for path, r in zip(self.paths, self.ranks):
            if path not in adapter:
                raise ValueError(f"the adapter has no R for bank layer {path!r} (the model's bank layers: "
                                 f"{self.paths[:4]}{' …' if len(self.paths) > 4 else ''}, {len(self.paths)} in all)")
            R = adapter[path]
            if not isinstance(R, torch.Tensor):
                raise TypeError(f"the adapter's R for {path!r} is a {type(R).__name__}, not a torch.Tensor")
            if tuple(R.shape) != (r, r):
                raise ValueError(f"the adapter's R for {path!r} has shape {tuple(R.shape)}; the model's bank "
                                 f"there has rank {r}, so ({r}, {r})")
            if not R.is_floating_point():
                raise TypeError(f"the adapter's R for {path!r} has dtype {R.dtype}; it must be a floating dtype")
            if not bool(torch.isfinite(R).all()):
                raise ValueError(f"the adapter's R for {path!r} has NaN/Inf entries")
        extra = [k for k in adapter if k not in set(self.paths)]
        if extra:
            raise ValueError(f"the adapter names {extra[0]!r}, which is not a bank layer of the model "
                             f"(bank layers: {self.paths[:4]}{' …' if len(self.paths) > 4 else ''})")
        return torch.cat([adapter[p].detach().reshape(-1).to("cpu", dtype) for p in self.paths])

    def pack_many(self, adapters: Mapping, dtype: torch.dtype) -> torch.Tensor:
        """Rows (k, width) from packed tensors {layer path: (k, r, r)}; the same checks as pack."""
        if not isinstance(adapters, Mapping) or not adapters:
            raise TypeError("put_many takes {layer path: (k, r, r) tensor}")
        k = None
        for path, r in zip(self.paths, self.ranks):
            R = adapters.get(path)
            if not isinstance(R, torch.Tensor):
                raise ValueError(f"put_many: no (k, {r}, {r}) tensor for bank layer {path!r}")
            if R.dim() != 3 or tuple(R.shape[1:]) != (r, r) or (k is not None and R.shape[0] != k):
                raise ValueError(f"put_many: {path!r} has shape {tuple(R.shape)}, expected ({k or 'k'}, {r}, {r})")
            if not R.is_floating_point() or not bool(torch.isfinite(R).all()):
                raise ValueError(f"put_many: {path!r} must be floating and finite (dtype {R.dtype})")
            k = R.shape[0]
        extra = [p for p in adapters if p not in set(self.paths)]
        if extra:
            raise ValueError(f"put_many: {extra[0]!r} is not a bank layer of the model")
        return torch.cat([adapters[p].detach().reshape(k, -1).to("cpu", dtype) for p in self.paths], dim=1)

    def unpack(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        return {p: row[o:o + r * r].reshape(r, r).clone() for p, r, o in zip(self.paths, self.ranks, self.offsets)}
