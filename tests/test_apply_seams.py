"""The seams of apply_loraxs a new user hits (issue 18, item 2): PEFT's matching rules (checked against
PEFT's own matcher on all-MiniLM-L6-v2), dead entries named, "already adapted", rank checks, an fp32 R
beside half-precision bases, merged layers frozen, and nothing half-applied by a refused call."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from hf_models import minilm
from loraxs_kernels import FusedLoRAXSLinear, apply_loraxs, merge_loraxs
from loraxs_kernels.modules.multi import MultiLoRAXSLinear


def _adapted(model) -> set[str]:
    return {p for p, m in model.named_modules() if isinstance(m, (FusedLoRAXSLinear, MultiLoRAXSLinear))}


def _peft_paths(model, target_modules, exclude_modules=None) -> set[str]:
    """The nn.Linear paths PEFT 0.21's own matcher picks for this spec (task SEQ_CLS, as the model is)."""
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

    cfg = peft.LoraConfig(r=4, target_modules=target_modules, exclude_modules=exclude_modules, task_type="SEQ_CLS")
    cfg = _maybe_include_all_linear_layers(cfg, model)
    out = set()
    for path, mod in model.named_modules():
        hit = check_target_module_exists(cfg, path)
        # _ExcludedModule is truthy-false by design in PEFT; a re.Match or True means "adapt".
        if hit and type(hit).__name__ != "_ExcludedModule" and isinstance(mod, nn.Linear):
            out.add(path)
    return out


SPECS = [
    (["query", "attention.output.dense"], None),
    (["query", "value"], None),
    (["dense"], None),
    (["bert.encoder.layer.0.attention.self.key", "pooler.dense"], None),
    (r".*\.layer\.[0-2]\..*\.(query|value)", None),
    (r".*dense", ["pooler.dense", "output.dense"]),
    ("all-linear", None),
    ("all-linear", r".*\.(key|value)"),
    (["query", "key", "value", "dense"], ["layer.5.attention.self.query", "intermediate.dense"]),
]


@pytest.mark.parametrize("target,exclude", SPECS, ids=[str(i) for i in range(len(SPECS))])
def test_same_layers_as_peft(target, exclude):
    base = minilm()
    want = _peft_paths(base, target, exclude)
    assert want, "the spec must select something for the comparison to mean anything"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = _adapted(apply_loraxs(base, 2, target, exclude_modules=exclude))
    assert got == want


def test_suffix_entries_and_all_linear_on_minilm():
    # The example: a PEFT-style suffix adapts the 6 attention output projections too.
    assert len(_adapted(apply_loraxs(minilm(), 8, ["query", "attention.output.dense"]))) == 12
    model = apply_loraxs(minilm(), 2, "all-linear", modules_to_save=["classifier"])
    got = _adapted(model)
    assert len(got) == 6 * 6 + 1 and "bert.pooler.dense" in got and "classifier" not in got
    assert type(model.classifier) is nn.Linear and model.classifier.weight.requires_grad


def test_dead_entries_are_named():
    with pytest.warns(UserWarning, match=r"'vaule' matches no module"):
        model = apply_loraxs(minilm(), 4, ["query", "vaule"])
    assert len(_adapted(model)) == 6
    with pytest.raises(ValueError, match=r"'vaule' matches no module.*'qurey' matches no module"):
        apply_loraxs(minilm(), 4, ["vaule", "qurey"])
    with pytest.raises(ValueError, match=r"'attention' matches only modules that are not an nn.Linear"):
        apply_loraxs(minilm(), 4, ["attention"])
    with pytest.raises(ValueError, match=r"'query' matches only excluded layers"):
        apply_loraxs(minilm(), 4, ["query"], exclude_modules=["query"])
    # A single string is a whole-path regular expression; the message says how to write either form.
    with pytest.raises(ValueError, match=r"\['query'\] matches it as a path suffix"):
        apply_loraxs(minilm(), 4, "query")


def test_already_adapted_is_named():
    model = apply_loraxs(minilm(), 4, ["query"])
    with pytest.raises(ValueError, match=r"'query' matches already adapted: bert\.encoder\.layer\.0\.attention\.self"
                                         r"\.query"):
        apply_loraxs(model, 4, ["query"])
    # Adapting more layers later is fine; the adapted ones are named in the warning.
    with pytest.warns(UserWarning, match="already adapted"):
        apply_loraxs(model, 4, ["query", "value"])
    assert len(_adapted(model)) == 12
    # "all-linear" on a partly adapted model adapts the rest.
    apply_loraxs(model, 2, "all-linear")
    assert len(_adapted(model)) == 37


@pytest.mark.parametrize("rank,err,msg", [
    (8.0, TypeError, "rank must be an int"), ("8", TypeError, "rank must be an int"),
    (True, TypeError, "rank must be an int"), (0, ValueError, "positive"), (-3, ValueError, "positive"),
    (385, ValueError, r"rank 385 does not fit bert\.encoder\.layer\.0\.attention\.self\.query"),
])
def test_rank_is_checked(rank, err, msg):
    model = minilm()
    snap = _snapshot(model)
    with pytest.raises(err, match=msg):
        apply_loraxs(model, rank, ["query"])
    _assert_unchanged(model, snap)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("banks", [None, 2])
def test_half_base_gets_an_fp32_R(dtype, banks):
    model = apply_loraxs(minilm().to(dtype), 4, ["query"], num_adapters=banks)
    layer = model.bert.encoder.layer[0].attention.self.query
    assert layer.weight.dtype == dtype and layer.lora_A.dtype == dtype
    assert layer.lora_R.dtype == torch.float32
    override = apply_loraxs(minilm().to(dtype), 4, ["query"], num_adapters=banks, r_dtype=dtype)
    assert override.bert.encoder.layer[0].attention.self.query.lora_R.dtype == dtype
    # fp32 bases keep an fp32 R and fp64 an fp64 one (the weight's dtype).
    assert apply_loraxs(nn.Sequential(nn.Linear(8, 8).double()), 2, ["0"])[0].lora_R.dtype == torch.float64


def test_bf16_base_trains_with_the_fp32_R():
    """The reason for the default: one AdamW step at lr 1e-4 must move every entry of R."""
    model = apply_loraxs(minilm().to(torch.bfloat16), 4, ["query"])
    layer = model.bert.encoder.layer[0].attention.self.query
    before = layer.lora_R.detach().clone()
    opt = torch.optim.AdamW([layer.lora_R], lr=1e-4)
    x = torch.randn(3, 5, 384, dtype=torch.bfloat16)
    layer(x).float().square().sum().backward()
    opt.step()
    moved = (layer.lora_R.detach() != before).float().mean().item()
    assert moved == 1.0, f"only {moved:.1%} of R's entries moved"


def test_merge_leaves_the_model_frozen():
    model = minilm()
    apply_loraxs(model, 8, ["query", "value"], modules_to_save=["classifier"])
    head = sum(p.numel() for p in model.classifier.parameters())
    trainable = lambda: sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable() == 12 * 8 * 8 + head == 1538  # the count before the merge
    merge_loraxs(model)
    assert not _adapted(model)
    assert trainable() == head == 770  # was 1,774,850: the merged layers came back trainable
    bank_model = apply_loraxs(minilm(), 4, ["query"], num_adapters=2)
    merge_loraxs(bank_model, adapter=1)
    assert sum(p.numel() for p in bank_model.parameters() if p.requires_grad) == 0


def _snapshot(model):
    return ({p: type(m) for p, m in model.named_modules()},
            {k: (v, v.detach().clone(), v.requires_grad) for k, v in model.named_parameters()},
            {k: v.clone() for k, v in model.named_buffers()},
            model.__dict__.get("loraxs_modules_to_save", "absent"))


def _assert_unchanged(model, snap):
    types, params, buffers, mts = snap
    assert {p: type(m) for p, m in model.named_modules()} == types
    now = dict(model.named_parameters())
    assert set(now) == set(params)
    for k, (obj, val, flag) in params.items():
        assert now[k] is obj and torch.equal(now[k], val) and now[k].requires_grad == flag, k
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())
    assert model.__dict__.get("loraxs_modules_to_save", "absent") == mts


@pytest.mark.parametrize("call,err", [
    (lambda m: apply_loraxs(m, 4, ["nope"]), ValueError),
    (lambda m: apply_loraxs(m, 4, []), ValueError),
    (lambda m: apply_loraxs(m, 4, "[unclosed"), ValueError),
    (lambda m: apply_loraxs(m, 4, ["query", 3]), TypeError),
    (lambda m: apply_loraxs(m, 4, ["query"], modules_to_save=["nope"]), ValueError),
    (lambda m: apply_loraxs(m, 4, ["query"], num_adapters=0), ValueError),
    (lambda m: apply_loraxs(m, 4, ["query"], num_adapters=2.0), ValueError),
    (lambda m: apply_loraxs(m, 4, ["query"], r_init="ones"), ValueError),
    (lambda m: apply_loraxs(m, 4, ["query"], backend="nope"), ValueError),
    (lambda m: apply_loraxs(m, 384, ["query", "intermediate.dense", "classifier"]), ValueError),
], ids=["no match", "empty", "bad regex", "non-string entry", "bad modules_to_save", "zero banks",
        "float banks", "bad r_init", "bad backend", "rank fits some"])
def test_refused_call_leaves_the_model_unchanged(call, err):
    model = minilm()
    apply_loraxs(model, 2, ["key"], modules_to_save=["classifier"])  # a model with a previous adapter
    snap = _snapshot(model)
    with pytest.raises(err):
        call(model)
    _assert_unchanged(model, snap)


def test_the_snapshot_sees_a_change():
    """The unchanged-check above catches each kind of edit a half-applied call could leave."""
    for edit in (lambda m: setattr(m.bert.pooler, "dense", nn.Linear(384, 384)),
                 lambda m: m.classifier.weight.requires_grad_(False),
                 lambda m: m.classifier.bias.data.add_(1e-3),
                 lambda m: m.__dict__.__setitem__("loraxs_modules_to_save", [])):
        model = minilm()
        apply_loraxs(model, 2, ["key"], modules_to_save=["classifier"])
        snap = _snapshot(model)
        edit(model)
        with pytest.raises(AssertionError):
            _assert_unchanged(model, snap)


def test_regex_in_a_list_still_works_with_a_warning():
    """The old form (a list entry as a regular expression) keeps working where PEFT's rule selects
    nothing for it, with a FutureWarning that names it and says to pass a single string."""
    spec = r".*\.layer\.[0-1]\.attention\.self\.(query|key)"
    with pytest.warns(FutureWarning, match=r"regular expressions inside a list"):
        got = _adapted(apply_loraxs(minilm(), 2, [spec]))
    assert got == _adapted(apply_loraxs(minilm(), 2, spec)) and len(got) == 4
