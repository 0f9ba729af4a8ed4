"""MultiLoRAXSLinear: one base layer, a bank of LoRA-XS adapters, a per-row choice among them.

A and B come from the base weight's SVD, so every adapter of a layer shares them and an adapter is
only its r×r R: the bank `lora_R` (n, r, r) holds n of them, and each row of a batch names its own
(loraxs_linear_multi). `use_adapters(model, ids)` sets one row-to-adapter mapping for every such
layer of a model; read_adapter_slot / write_adapter_slot / reset_adapter_slot move one adapter in
and out of every layer's bank in place.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..ops.multi import loraxs_linear_multi
from .linear import R_INIT_STD, attach_base, base_tensors, build_base, init_like_linear, merged_linear, set_basis


class MultiLoRAXSLinear(nn.Module):
    """y_i = x_i Wᵀ + b + scaling·((x_i A) R[id_i]) B, with W, b, A, B frozen and the bank R (n, r, r)
    trainable; id_i = -1 gives the base layer alone.

    Attributes as on FusedLoRAXSLinear (`weight`, `bias`, `lora_A`, `lora_B`, a float `scaling`), with
    `lora_R` of shape (num_adapters, rank, rank). r_dtype: the bank's dtype (fp32 beside half weights
    keeps master copies). r_init: how every slot starts, "normal" (N(0, 1e-5), as FusedLoRAXSLinear)
    or "zeros" (every adapter starts as the base layer). backend: the op backend (loraxs_linear_multi).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, num_adapters: int, bias: bool = True,
                 scaling: float = 1.0, device=None, dtype=None, *, r_dtype: torch.dtype | None = None,
                 r_init: str = "normal", backend: str = "auto"):
        super().__init__()
        build_base(self, in_features, out_features, rank, bias, scaling, backend, device, dtype)
        if not isinstance(num_adapters, int) or num_adapters < 1:
            raise ValueError(f"num_adapters must be an int >= 1, got {num_adapters!r}")
        self.num_adapters = num_adapters
        self.lora_R = nn.Parameter(torch.empty(num_adapters, rank, rank, device=self.weight.device,
                                               dtype=r_dtype or self.weight.dtype))
        # The row-to-adapter mapping set by use_adapters (forward's adapter_ids wins over it).
        self.active_adapter_ids: torch.Tensor | None = None
        if not self.weight.is_meta:
            init_like_linear(self)
            set_basis(self)
            for i in range(num_adapters):
                self.reset_adapter(i, r_init)

    @classmethod
    def from_linear(cls, linear: nn.Module, rank: int, num_adapters: int, scaling: float = 1.0, *,
                    share_weight: bool = False, basis=None, **kwargs) -> "MultiLoRAXSLinear":
        """A bank of num_adapters LoRA-XS adapters around `linear` (nn.Linear or transformers Conv1D),
        frozen. share_weight and basis as in FusedLoRAXSLinear.from_linear."""
        weight, bias, _ = base_tensors(linear)
        out_features, in_features = weight.shape
        layer = cls(in_features, out_features, rank, num_adapters, bias=bias is not None, scaling=scaling,
                    device="meta", dtype=weight.dtype, **kwargs)
        layer = attach_base(layer, linear, rank, share_weight=share_weight, basis=basis)
        set_basis(layer, basis)
        for i in range(num_adapters):
            layer.reset_adapter(i, kwargs.get("r_init", "normal"))
        return layer

    # ---- the bank, one slot at a time (in place: the bank is never reallocated)
    def _slot(self, index: int) -> int:
        if not isinstance(index, int) or not 0 <= index < self.num_adapters:
            raise IndexError(f"adapter index must be an int in [0, {self.num_adapters}), got {index!r}")
        return index

    def read_adapter(self, index: int) -> torch.Tensor:
        """A copy of adapter `index`'s R (rank, rank)."""
        return self.lora_R.detach()[self._slot(index)].clone()

    @torch.no_grad()
    def write_adapter(self, index: int, R: torch.Tensor) -> None:
        """Copy R (rank, rank) into slot `index`; the other slots are untouched."""
        if not isinstance(R, torch.Tensor) or tuple(R.shape) != (self.rank, self.rank):
            got = tuple(R.shape) if isinstance(R, torch.Tensor) else type(R).__name__
            raise ValueError(f"an adapter's R must have shape ({self.rank}, {self.rank}), got {got}")
        self.lora_R[self._slot(index)].copy_(R)

    @torch.no_grad()
    def reset_adapter(self, index: int, r_init: str = "normal") -> None:
        """Restart slot `index` alone: N(0, 1e-5) ("normal") or zeros (the base layer)."""
        if r_init not in ("normal", "zeros"):
            raise ValueError(f"r_init must be 'normal' or 'zeros', got {r_init!r}")
        slot = self.lora_R[self._slot(index)]
        nn.init.normal_(slot, mean=0.0, std=R_INIT_STD) if r_init == "normal" else nn.init.zeros_(slot)

    def merge(self, index: int) -> nn.Linear:
        """A new nn.Linear holding W + scaling·(A R[index] B)ᵀ, what rows with id `index` compute
        (-1: W alone); this layer is left unchanged."""
        return merged_linear(self, None if index == -1 else self.lora_R[self._slot(index)])

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """adapter_ids: of shape x.shape[:-1], or a prefix of it (e.g. (batch,) for x (batch, seq, in)),
        broadcast over the remaining dims; None takes the ids of the enclosing use_adapters."""
        ids = adapter_ids if adapter_ids is not None else self.active_adapter_ids
        if ids is None:
            raise RuntimeError(
                "MultiLoRAXSLinear needs adapter ids: call it as layer(x, adapter_ids) or run the model inside "
                "`with loraxs_kernels.use_adapters(model, adapter_ids):` (-1 selects the base layer)")
        return loraxs_linear_multi(x, self.weight, self.bias, self.lora_A, self.lora_R, self.lora_B,
                                   broadcast_ids(ids, x.shape[:-1]), self.scaling, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"num_adapters={self.num_adapters}, bias={self.bias is not None}, scaling={self.scaling}, "
                f"backend={self.backend!r}")


def broadcast_ids(ids: torch.Tensor, lead) -> torch.Tensor:
    """The ids for x's rows (x.shape[:-1] = lead):
    - ids of shape lead: as they are;
    - ids of a prefix of lead (one id per sequence): expanded over the rest;
    - ids with more dims than lead whose leading dims are lead — per-token ids (batch, seq) at a layer
      that sees one row per sequence, such as BERT's pooler (it reads the first token's hidden state,
      x of shape (batch, hidden)): the ids of the first position, ids[:, 0], the token that row comes
      from. This is the one rule for such layers; a layer that pools all positions (a mean) also takes
      the first position's id, so give each sequence one adapter there (ids constant along seq), or
      keep the layer out of the banks with exclude_modules.
    """
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"adapter_ids must be a torch.Tensor, got {type(ids).__name__}")
    lead = tuple(lead)
    if tuple(ids.shape) == lead:
        return ids
    if ids.dim() < len(lead) and tuple(ids.shape) == lead[: ids.dim()]:
        return ids.reshape(*ids.shape, *([1] * (len(lead) - ids.dim()))).expand(lead)
    if ids.dim() > len(lead) and tuple(ids.shape[: len(lead)]) == lead:
        return ids[(slice(None),) * len(lead) + (0,) * (ids.dim() - len(lead))]
    raise ValueError(f"adapter_ids of shape {tuple(ids.shape)} fit neither the rows of x, {lead}, nor a prefix of "
                     f"them (one id per sequence)")


def multi_layers(model: nn.Module) -> list[tuple[str, MultiLoRAXSLinear]]:
    layers = [(p, m) for p, m in model.named_modules() if isinstance(m, MultiLoRAXSLinear)]
    if not layers:
        raise ValueError("the model has no MultiLoRAXSLinear layer; apply_loraxs(..., num_adapters=n) makes them")
    return layers


@contextlib.contextmanager
def use_adapters(model: nn.Module, adapter_ids: torch.Tensor):
    """Inside the block, every MultiLoRAXSLinear of `model` maps its rows to adapters by adapter_ids:
    shape (batch,) (one adapter per sequence, broadcast over the sequence) or (batch, seq); -1 means
    the base layer. The forward saves the ids it used, so a backward after the block sees the same.
    Nested blocks restore the outer ids on exit."""
    if not isinstance(adapter_ids, torch.Tensor) or adapter_ids.dtype not in (torch.int32, torch.int64):
        got = adapter_ids.dtype if isinstance(adapter_ids, torch.Tensor) else type(adapter_ids).__name__
        raise TypeError(f"adapter_ids must be an int32 or int64 tensor, got {got}")
    if adapter_ids.dim() not in (1, 2):
        raise ValueError(f"adapter_ids must have shape (batch,) or (batch, seq), got {tuple(adapter_ids.shape)}")
    layers = multi_layers(model)
    for path, layer in layers:
        if adapter_ids.numel() and int(adapter_ids.max()) >= layer.num_adapters:
            raise ValueError(f"adapter_ids reach {int(adapter_ids.max())} but {path} holds {layer.num_adapters} "
                             "adapters")
    previous = [layer.active_adapter_ids for _, layer in layers]
    for _, layer in layers:
        layer.active_adapter_ids = adapter_ids
    try:
        yield model
    finally:
        for (_, layer), ids in zip(layers, previous):
            layer.active_adapter_ids = ids


def read_adapter_slot(model: nn.Module, index: int) -> dict[str, torch.Tensor]:
    """Adapter `index` of every MultiLoRAXSLinear: {layer path: R copy (rank, rank)}."""
    return {path: layer.read_adapter(index) for path, layer in multi_layers(model)}


def write_adapter_slot(model: nn.Module, index: int, Rs: dict[str, torch.Tensor]) -> None:
    """Write adapter `index` of every MultiLoRAXSLinear from {layer path: R}, in place; the other
    slots are untouched. Every layer must be named, and nothing else (checked before any write)."""
    layers = dict(multi_layers(model))
    missing, extra = sorted(set(layers) - set(Rs)), sorted(set(Rs) - set(layers))
    if missing or extra:
        raise ValueError(f"write_adapter_slot needs one R per MultiLoRAXSLinear: missing {missing}, unknown {extra}")
    for path, layer in layers.items():
        layer._slot(index)
        if tuple(Rs[path].shape) != (layer.rank, layer.rank):
            raise ValueError(f"{path}: an adapter's R must have shape ({layer.rank}, {layer.rank}), "
                             f"got {tuple(Rs[path].shape)}")
    for path, layer in layers.items():
        layer.write_adapter(index, Rs[path])


def reset_adapter_slot(model: nn.Module, index: int, r_init: str = "zeros") -> None:
    """Restart adapter `index` in every MultiLoRAXSLinear (zeros by default: the slot serves the base)."""
    for _, layer in multi_layers(model):
        layer.reset_adapter(index, r_init)
