"""FusedLoRAXSLinear: an nn.Linear with a LoRA-XS adapter, computed by the fused op."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import backends
from ..ops.linear import linear_auto, loraxs_linear
from .svd_init import SVDBasis, svd_basis

R_INIT_STD = 1e-5  # the official code's N(0, 1e-5) start: not zeros, so R's gradient sees a non-zero R


def conv1d_type():
    """transformers' Conv1D class when transformers is already imported, else None (a model holding a
    Conv1D has imported it; importing transformers just to look costs seconds)."""
    import sys

    mod = sys.modules.get("transformers.pytorch_utils")
    if mod is None and "transformers" in sys.modules:
        try:
            import transformers.pytorch_utils as mod
        except ImportError:
            return None
    return getattr(mod, "Conv1D", None) if mod is not None else None


def base_tensors(module: nn.Module):
    """(weight as out×in, bias or None, fan_in_fan_out) of an nn.Linear or a transformers Conv1D."""
    conv1d = conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        return module.weight.t(), module.bias, True
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, False
    raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(module).__name__}")


class FusedLoRAXSLinear(nn.Module):
    """y = x Wᵀ + b + scaling·((x A) R) B, with W, b, A, B frozen and R (rank×rank) trainable.

    Attributes: `weight` (out, in) and `bias` (out,), frozen parameters as in nn.Linear; `lora_A`
    (in, rank) and `lora_B` (rank, out), frozen buffers from the SVD of Wᵀ (in the state dict);
    `lora_R` (rank, rank), the only parameter with requires_grad.

    r_dtype: R's dtype (default: the layer's). Pass torch.float32 to keep an fp32 master R beside
    bf16/fp16 weights; the op computes in the layer's dtype and returns grad_R in fp32.
    r_init: "normal" (N(0, 1e-5), the official code's choice) or "zeros" (the layer starts as W).
    backend: the op backend this layer uses ("auto" by default).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        scaling: float = 1.0,
        device=None,
        dtype=None,
        *,
        r_dtype: torch.dtype | None = None,
        r_init: str = "normal",
        backend: str = "auto",
    ):
        super().__init__()
        build_base(self, in_features, out_features, rank, bias, scaling, backend, device, dtype)
        r_dtype = r_dtype or self.weight.dtype
        self.lora_R = nn.Parameter(torch.empty(rank, rank, device=self.weight.device, dtype=r_dtype))
        init_like_linear(self)
        self.reset_adapter(r_init)

    @torch.no_grad()
    def reset_adapter(self, r_init: str = "normal"):
        """Recompute A and B from the current weight and restart R."""
        if r_init not in ("normal", "zeros"):
            raise ValueError(f"r_init must be 'normal' or 'zeros', got {r_init!r}")
        if self.weight.is_meta:
            return
        set_basis(self)
        self.reset_R(r_init)

    @torch.no_grad()
    def reset_R(self, r_init: str = "normal"):
        """Restart R alone: N(0, 1e-5) ("normal") or zeros."""
        if r_init not in ("normal", "zeros"):
            raise ValueError(f"r_init must be 'normal' or 'zeros', got {r_init!r}")
        if r_init == "normal":
            nn.init.normal_(self.lora_R, mean=0.0, std=R_INIT_STD)
        else:
            nn.init.zeros_(self.lora_R)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, rank: int, scaling: float = 1.0, *, share_weight: bool = False, basis=None, **kwargs
    ) -> "FusedLoRAXSLinear":
        """A LoRA-XS layer around `linear`'s weight and bias, frozen.

        linear: an nn.Linear, or a transformers `Conv1D` (GPT-2 style, weight stored in×out; the layer
        holds its transpose, a view, and records `fan_in_fan_out = True`).
        share_weight: False (default) copies weight and bias and leaves `linear` untouched; True makes
        the layer hold `linear`'s own tensors (no copy, so a model's memory never holds a weight
        twice) and freezes them in place: what `apply_loraxs` does.
        basis: None (A and B from the SVD of W) or an (A, B) pair of shapes (in, r) and (r, out) to use
        instead, e.g. a basis stored in an adapter file or an official LoRA-XS checkpoint.
        """
        weight, bias, _ = base_tensors(linear)
        out_features, in_features = weight.shape
        layer = cls(
            in_features, out_features, rank, bias=bias is not None, scaling=scaling,
            device="meta", dtype=weight.dtype, **kwargs,
        )
        # Built on the meta device, so the throw-away init and SVD of a fresh weight are skipped.
        layer = attach_base(layer, linear, rank, share_weight=share_weight, basis=basis)
        set_basis(layer, basis)
        layer.reset_R(kwargs.get("r_init", "normal"))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # nn.Module.__getattr__ costs 0.6-0.75 µs per parameter or buffer (measured; the op itself is
        # ~6 µs at M = 1): read the five tensors from their dicts instead, unless something (e.g.
        # torch.nn.utils.parametrize) serves them another way.
        params, buffers = self._parameters, self._buffers
        try:
            w, R, A, B = params["weight"], params["lora_R"], buffers["lora_A"], buffers["lora_B"]
        except KeyError:
            w, R, A, B = self.weight, self.lora_R, self.lora_A, self.lora_B
        bias = params["bias"] if "bias" in params else self.bias
        if self.backend == "auto":  # straight to the C++ op
            return linear_auto(x, w, bias, A, R, B, self.scaling)
        return loraxs_linear(x, w, bias, A, R, B, self.scaling, backend=self.backend)

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """A new nn.Linear holding W + scaling·(A R B)ᵀ; this layer is left unchanged."""
        return merged_linear(self, self.lora_R)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.bias is not None}, scaling={self.scaling}, backend={self.backend!r}"
        )


def build_base(layer: nn.Module, in_features: int, out_features: int, rank: int, bias: bool, scaling: float,
               backend: str, device, dtype) -> None:
    """What every LoRA-XS module holds besides R, checked and allocated (not initialised): in_features,
    out_features, rank, scaling, backend, fan_in_fan_out, the frozen weight and bias, and the lora_A /
    lora_B buffers."""
    if not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"rank must be between 1 and min(in_features, out_features) = {min(in_features, out_features)}, "
            f"got rank={rank} for in_features={in_features}, out_features={out_features}"
        )
    backends.check_name(backend)
    factory = {"device": device, "dtype": dtype}
    layer.in_features, layer.out_features, layer.rank = in_features, out_features, rank
    # True when the base is a transformers Conv1D (weight stored in×out): merge_loraxs gives one back.
    layer.fan_in_fan_out = False
    layer.scaling = float(scaling)
    layer.backend = backend
    layer.weight = nn.Parameter(torch.empty(out_features, in_features, **factory), requires_grad=False)
    layer.bias = nn.Parameter(torch.empty(out_features, **factory), requires_grad=False) if bias else None
    layer.register_buffer("lora_A", torch.empty(in_features, rank, **factory))
    layer.register_buffer("lora_B", torch.empty(rank, out_features, **factory))


def init_like_linear(layer: nn.Module) -> None:
    """nn.Linear's own initialisation of weight and bias, so a fresh layer behaves like a fresh nn.Linear."""
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5))
    if layer.bias is not None:
        nn.init.uniform_(layer.bias, -1 / math.sqrt(layer.in_features), 1 / math.sqrt(layer.in_features))


@torch.no_grad()
def set_basis(layer: nn.Module, basis=None) -> None:
    """lora_A and lora_B from a given basis — an SVDBasis (whose facts are kept, see remember_basis)
    or a bare (A, B) pair —, else from the SVD of the layer's weight."""
    if basis is None:
        basis = svd_basis(layer.weight, layer.rank)
    A, B = basis[0], basis[1]
    layer.lora_A.copy_(A)
    layer.lora_B.copy_(B)
    remember_basis(layer, basis if isinstance(basis, SVDBasis) else None)


# The attribute a LoRA-XS layer keeps its basis facts in: (key, pivots, top singular values), valid
# while `basis_key(layer)` equals key, i.e. while W, A and B are the tensors (and in-place versions)
# that the SVD gave. save_adapter reads them instead of recomputing an SVD (0.03-0.4 s per MiniLM
# layer, 51 s for a 4096×4096 one with the full SVD).
BASIS_FACTS_ATTR = "_loraxs_svd_facts"


def basis_key(layer: nn.Module) -> tuple:
    return tuple((t.data_ptr(), t._version, tuple(t.shape), t.dtype, t.device)
                 for t in (layer.weight, layer.lora_A, layer.lora_B))


def remember_basis(layer: nn.Module, basis: "SVDBasis | None") -> None:
    """Record that the layer's A and B are the SVD basis `basis` of its current W (None: forget)."""
    if basis is None:
        layer.__dict__.pop(BASIS_FACTS_ATTR, None)
        return
    layer.__dict__[BASIS_FACTS_ATTR] = (basis_key(layer), basis.pivots.cpu(), basis.singular_values.detach().cpu())


def remembered_basis(layer: nn.Module):
    """(pivots, top singular values) when the layer's A and B are still the SVD basis recorded by
    remember_basis, else None."""
    facts = layer.__dict__.get(BASIS_FACTS_ATTR)
    if facts is None or facts[0] != basis_key(layer):
        return None
    return facts[1], facts[2]


@torch.no_grad()
def merged_linear(layer: nn.Module, R: torch.Tensor | None) -> nn.Linear:
    """A new nn.Linear holding W + layer.scaling·(A R B)ᵀ (R None: W alone), from a LoRA-XS layer's
    weight, bias, lora_A and lora_B. Computed in fp32 (fp64 for fp64 weights) and rounded once to the
    weight's dtype."""
    w = layer.weight
    merged = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=w.device,
                       dtype=w.dtype)
    if R is None:
        merged.weight.copy_(w)
    else:
        work = torch.float64 if w.dtype == torch.float64 else torch.float32
        delta = layer.lora_A.to(work) @ R.to(work) @ layer.lora_B.to(work)
        merged.weight.copy_((w.to(work) + layer.scaling * delta.t()).to(w.dtype))
    if layer.bias is not None:
        merged.bias.copy_(layer.bias)
    return merged


def attach_base(layer: nn.Module, linear: nn.Module, rank: int, *, share_weight: bool, basis) -> nn.Module:
    """Give a LoRA-XS layer built on the meta device `linear`'s weight and bias (its own tensors,
    frozen in place, when share_weight; else copies) and real storage for A, B and R (R of the
    layer's own shape: (r, r), or a bank). Checks a given (A, B) basis's shapes. Returns the layer."""
    weight, bias, fan_in_fan_out = base_tensors(linear)
    out_features, in_features = weight.shape
    if basis is not None:
        A, B = basis[0], basis[1]  # a pair, or an SVDBasis
        if tuple(A.shape) != (in_features, rank) or tuple(B.shape) != (rank, out_features):
            raise ValueError(
                f"basis must be A ({in_features}, {rank}) and B ({rank}, {out_features}) for "
                f"{type(linear).__name__}(in={in_features}, out={out_features}) at rank {rank}, "
                f"got A {tuple(A.shape)} and B {tuple(B.shape)}"
            )
    device = weight.device
    if share_weight:
        layer.weight = linear.weight if not fan_in_fan_out else nn.Parameter(weight.detach(), requires_grad=False)
        layer.weight.requires_grad_(False)
        if bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        layer.lora_A = torch.empty(in_features, rank, device=device, dtype=weight.dtype)
        layer.lora_B = torch.empty(rank, out_features, device=device, dtype=weight.dtype)
        layer.lora_R = nn.Parameter(torch.empty(layer.lora_R.shape, device=device, dtype=layer.lora_R.dtype))
    else:
        layer = layer.to_empty(device=device)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
    layer.fan_in_fan_out = fan_in_fan_out
    return layer
