"""Per-token adapter ids at a layer that sees fewer leading dims than the ids (issue 18, item 4).

The rule (modules/multi.py, broadcast_ids): such a layer takes the ids of the first position. BERT's
pooler reads the first token's hidden state, x of shape (batch, hidden), so with ids (batch, seq) it
uses ids[:, 0], the adapter of the token it reads."""

from __future__ import annotations

import pytest
import torch

from hf_models import minilm, token_ids
from loraxs_kernels import apply_loraxs
from loraxs_kernels.modules.multi import MultiLoRAXSLinear, broadcast_ids, use_adapters


def _bank(n=3):
    torch.manual_seed(0)
    layer = MultiLoRAXSLinear(24, 16, 4, n)
    with torch.no_grad():
        layer.lora_R.normal_(0, 0.3)
    return layer


def test_layer_with_fewer_leading_dims_takes_the_first_position():
    layer = _bank()
    x = torch.randn(5, 24)
    ids = torch.tensor([[0, 1, 2], [2, 2, 0], [1, 0, 0], [-1, 2, 1], [2, -1, -1]])
    with torch.no_grad():
        got = layer(x, ids)
        assert torch.equal(got, layer(x, ids[:, 0]))
        # Planted fault: the last position instead gives other rows (the check can fail).
        assert not torch.equal(got, layer(x, ids[:, -1]))
    assert torch.equal(broadcast_ids(ids, (5,)), ids[:, 0])
    assert torch.equal(broadcast_ids(ids, ()), ids[0, 0])
    # Shapes that fit no rule are still refused with both shapes named.
    with pytest.raises(ValueError, match=r"adapter_ids of shape \(4, 3\) fit neither the rows of x, \(5,\)"):
        broadcast_ids(ids[:4], (5,))


def test_minilm_banks_on_dense_take_per_token_ids():
    """The issue's failure: banks on every "dense" (the pooler among them) and ids (batch, seq)."""
    model = apply_loraxs(minilm(head_seed=2), 4, ["dense"], num_adapters=3)
    assert isinstance(model.bert.pooler.dense, MultiLoRAXSLinear)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MultiLoRAXSLinear):
                m.lora_R.normal_(0, 0.2)
    ids = token_ids(4, 10)
    seq_ids = torch.tensor([0, 2, 1, -1])
    per_token = seq_ids[:, None].repeat(1, 10)
    per_token[:, 5:] = (per_token[:, 5:] + 1) % 3  # the second half of each sequence uses another adapter
    with torch.no_grad(), use_adapters(model, per_token):
        out = model(input_ids=ids, output_hidden_states=True)
    # The pooler took the first position's ids: recompute it from the last hidden state with those.
    with torch.no_grad():
        pooled = torch.tanh(model.bert.pooler.dense(out.hidden_states[-1][:, 0], per_token[:, 0]))
        assert torch.equal(model.classifier(pooled), out.logits)
    # Per-token ids constant along each sequence compute what per-sequence ids compute.
    with torch.no_grad(), use_adapters(model, seq_ids[:, None].repeat(1, 10)):
        a = model(input_ids=ids).logits
    with torch.no_grad(), use_adapters(model, seq_ids):
        b = model(input_ids=ids).logits
    assert torch.equal(a, b)
