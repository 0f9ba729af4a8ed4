"""from_peft_tinylora: PEFT's tinylora layers as FusedLoRAXSLinear layers (the fused kernels).

PEFT's tinylora (peft/tuners/tinylora/layer.py, read from PEFT 0.21.2) keeps per layer the frozen
buffers tinylora_A (r×in) = √Σ_r V_rᵀ and tinylora_B (out×r) = U_r √Σ_r from an fp32 SVD of W
(out×in; a Conv1D's transpose), fixed random P (u×r×r), and a trainable vector v (u,) that layers in
one `weight_tying` group share; R_t = Σᵢ vᵢ Pᵢ, and its Linear forward is

    base(x) + F.linear(F.linear(F.linear(dropout(x), tinylora_A), R_t), tinylora_B)
            = base(x) + ((x tinylora_Aᵀ) R_tᵀ) tinylora_Bᵀ          (no scaling)

which is this package's layer with A = tinylora_Aᵀ, R = R_tᵀ, B = tinylora_Bᵀ, scaling = 1, whatever
the √Σ split (the buffers are taken as they are, not recomputed).
"""

from __future__ import annotations

import torch
from torch import nn

from ..modules.linear import FusedLoRAXSLinear
from ..modules.model import MODULES_TO_SAVE_ATTR, Transaction, mark_trainable, named_slots


def _peft_tinylora():
    try:
        import peft
    except ImportError as e:
        raise ImportError("from_peft_tinylora needs the peft package (pip install peft)") from e
    try:
        from peft.tuners.tinylora.layer import Linear as TinyLinear
        from peft.tuners.tinylora.layer import TinyLoraLayer
    except ImportError as e:
        raise ImportError(
            f"the installed PEFT ({peft.__version__}) has no tinylora tuner (peft.tuners.tinylora.layer); "
            "it was written against PEFT 0.21.2's"
        ) from e
    from peft.utils.other import ModulesToSaveWrapper

    return peft, TinyLinear, TinyLoraLayer, ModulesToSaveWrapper


def from_peft_tinylora(peft_model: nn.Module, **layer_kwargs) -> nn.Module:
    """Replace every PEFT tinylora Linear layer in `peft_model` by a FusedLoRAXSLinear computing the
    same output, unwrap PEFT's modules_to_save wrappers into their trained copies, and return the
    underlying base model (peft_model.get_base_model() for a PeftModel), changed in place.

    What trains afterwards: each layer's full r×r R (initialised to the tinylora R_tᵀ), r² numbers
    per layer, no longer tinylora's u-vector v shared through fixed random projections: the P
    tensors, the weight tying between layers and the projection seed are gone (export the trained
    tinylora state first if you need it), plus the unwrapped modules_to_save. A and B stay frozen.
    Dropout is not carried over (tinylora_dropout > 0 is refused: the outputs would differ in
    training). layer_kwargs go to FusedLoRAXSLinear (backend, r_dtype).
    """
    peft, TinyLinear, TinyLoraLayer, ModulesToSaveWrapper = _peft_tinylora()
    model = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else peft_model
    slots = named_slots(model)
    plans = []
    for path, parent, name, child in slots:
        if isinstance(child, TinyLoraLayer) and not isinstance(child, TinyLinear):
            raise ValueError(f"{path}: a tinylora {type(child).__name__} layer; only tinylora Linear layers convert")
        if not isinstance(child, TinyLinear):
            continue
        active = [a for a in child.active_adapters if a in child.tinylora_A]
        if len(active) != 1:
            raise ValueError(f"{path}: {len(active)} active tinylora adapters ({active}); exactly one converts")
        if child.merged:
            raise ValueError(f"{path}: the tinylora adapter is merged into the base weight; unmerge it first")
        if child.disable_adapters:
            raise ValueError(f"{path}: adapters are disabled on this layer")
        adapter = active[0]
        drop = child.tinylora_dropout[adapter]
        if isinstance(drop, nn.Dropout) and drop.p > 0:
            raise ValueError(f"{path}: tinylora_dropout = {drop.p} > 0; the fused layer has no dropout")
        with torch.no_grad():
            A_t = child.tinylora_A[adapter]  # (r, in)
            B_t = child.tinylora_B[adapter]  # (out, r)
            R_t = child._compute_R(adapter)  # (r, r), Σᵢ vᵢ Pᵢ, in v's dtype
        plans.append((path, parent, name, child, A_t, B_t, R_t))
    if not plans:
        raise ValueError("no PEFT tinylora Linear layers were found in the model")

    wrappers = [(path, parent, name, child) for path, parent, name, child in slots if isinstance(child, ModulesToSaveWrapper)]
    previous = list(getattr(model, MODULES_TO_SAVE_ATTR, None) or [])
    with Transaction(model) as tx:
        made: dict[int, nn.Module] = {}
        for path, parent, name, child, A_t, B_t, R_t in plans:
            if id(child) not in made:
                base = child.get_base_layer()
                w_dtype = base.weight.dtype
                kwargs = dict(layer_kwargs)
                kwargs.pop("r_init", None)
                kwargs.setdefault("r_dtype", R_t.dtype if R_t.dtype in (w_dtype, torch.float32) else w_dtype)
                layer = FusedLoRAXSLinear.from_linear(
                    base, A_t.shape[0], 1.0, share_weight=True,
                    basis=(A_t.t().to(w_dtype), B_t.t().to(w_dtype)), r_init="zeros", **kwargs,
                )
                with torch.no_grad():
                    layer.lora_R.copy_(R_t.t())
                made[id(child)] = layer
            tx.setattr(parent, name, made[id(child)])
        saved = []
        for path, parent, name, child in wrappers:
            tx.setattr(parent, name, child.modules_to_save[child.active_adapters[0]])
            saved.append(path)
        mark_trainable(model, previous + [p for p in saved if p not in previous])
    return model
