"""Adapter files check themselves (adapters/integrity.py, adapters/fingerprint.py).

- The sha256 of the tensor bytes in the safetensors header: every 4-byte XOR in the data section of a
  saved adapter is refused with AdapterError naming the file, the model unchanged; the same
  corruption in a file without the checksum loads silently (the planted fault the check exists for).
- Every fingerprint field's type, length and finiteness: a malformed stored fingerprint is an
  AdapterError, never a TypeError or a silent match; a base with NaN/Inf weights is refused at save.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from loraxs_kernels import FusedLoRAXSLinear, load_adapter, save_adapter
from loraxs_kernels.adapters import AdapterError, fingerprint, fingerprint_mismatch
from loraxs_kernels.adapters.atomic import WEIGHTS_NAME, write_adapter_dir
from loraxs_kernels.adapters.fingerprint import fingerprint_problem
from loraxs_kernels.adapters.integrity import CHECKSUM_KEY, ChecksumMismatch, load_verified
from loraxs_kernels.interop.peft_lora import export_peft_lora

CONFIG = "adapter_config.json"


def base_model(width: int = 1) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(8 * width, 6 * width), nn.GELU(), nn.Linear(6 * width, 4 * width))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


def adapted(seed=1, width: int = 1) -> nn.Module:
    model = base_model(width)
    g = torch.Generator().manual_seed(seed)
    rank = 2 * width
    for i in (0, 2):
        model[i] = FusedLoRAXSLinear.from_linear(model[i], rank, 2.0)
        with torch.no_grad():
            model[i].lora_R.copy_(torch.randn(rank, rank, generator=g))
    return model


def state(model):
    return {n: type(m) for n, m in model.named_modules()}, {k: v.clone() for k, v in model.state_dict().items()}


def assert_same_state(a, b):
    assert a[0] == b[0]
    assert a[1].keys() == b[1].keys() and all(torch.equal(a[1][k], b[1][k]) for k in a[1])


def data_start(path: Path) -> int:
    return 8 + int.from_bytes(path.read_bytes()[:8], "little")


def xor4(path: Path, offset: int) -> None:
    blob = bytearray(path.read_bytes())
    for i in range(offset, offset + 4):
        blob[i] ^= 0xA5
    path.write_bytes(bytes(blob))


# ----------------------------------------------------------------------------------------- checksum
def test_checksum_is_written_and_verified(tmp_path):
    save_adapter(adapted(), tmp_path / "ad")
    w = tmp_path / "ad" / WEIGHTS_NAME
    from safetensors import safe_open

    with safe_open(str(w), "pt") as f:
        assert len(f.metadata()[CHECKSUM_KEY]) == 64
    got = load_verified(w)
    ref = load_file(str(w))
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_every_corrupted_word_is_refused_and_the_model_is_unchanged(tmp_path):
    save_adapter(adapted(width=4), tmp_path / "ad")  # rank 8: 128 fp32 words of R
    w = tmp_path / "ad" / WEIGHTS_NAME
    pristine = w.read_bytes()
    start = data_start(w)
    refused = 0
    for offset in range(start, len(pristine) - 3, 4):  # every float of every tensor
        w.write_bytes(pristine)
        xor4(w, offset)
        for target in (base_model(4), adapted(seed=5, width=4)):  # a plain base, and one with LoRA-XS layers
            before = state(target)
            with pytest.raises(AdapterError, match="sha256") as e:
                load_adapter(target, tmp_path / "ad")
            assert str(w) in str(e.value)
            assert_same_state(state(target), before)
        refused += 1
    n_words = (len(pristine) - start) // 4
    print(f"\n{refused} corrupted files refused out of {n_words} (each 4-byte word of the data section XORed)")
    assert refused == n_words > 0


def test_the_planted_fault_passes_without_the_checksum(tmp_path):
    # The corruption the check is for: without the digest the same file loads, with R far off.
    model = adapted()
    save_adapter(model, tmp_path / "ad")
    w = tmp_path / "ad" / WEIGHTS_NAME
    tensors = load_file(str(w))
    from safetensors import safe_open

    with safe_open(str(w), "pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != CHECKSUM_KEY}
    save_file(tensors, str(w), metadata=meta)  # as a file saved before the checksum existed
    plain = load_adapter(base_model(), tmp_path / "ad")  # loads: files without the checksum still work
    for i in (0, 2):
        assert torch.equal(plain[i].lora_R, model[i].lora_R)
    xor4(w, data_start(w))
    loaded = load_adapter(base_model(), tmp_path / "ad")
    assert not torch.equal(loaded[0].lora_R, model[0].lora_R)


def test_header_bit_flips_are_refused_or_harmless(tmp_path):
    # A flip in the header may hit JSON padding or a metadata string (harmless: same tensors) or a
    # name, shape, offset, or the digest itself (refused); it must never load different tensors.
    model = adapted()
    save_adapter(model, tmp_path / "ad")
    w = tmp_path / "ad" / WEIGHTS_NAME
    pristine = w.read_bytes()
    refused = harmless = 0
    for offset in range(8, data_start(w)):
        blob = bytearray(pristine)
        blob[offset] ^= 0x01
        w.write_bytes(bytes(blob))
        try:
            loaded = load_adapter(base_model(), tmp_path / "ad")
        except AdapterError:
            refused += 1
            continue
        assert all(torch.equal(loaded[i].lora_R, model[i].lora_R) for i in (0, 2)), offset
        harmless += 1
    print(f"\nheader flips: {refused} refused, {harmless} loaded the same tensors")
    assert refused > 0


def test_peft_export_is_checksummed_too(tmp_path):
    export_peft_lora(adapted(), tmp_path / "peft")
    w = tmp_path / "peft" / WEIGHTS_NAME
    load_verified(w)
    xor4(w, data_start(w) + 4)
    with pytest.raises(ChecksumMismatch, match=str(w)):
        load_verified(w)


def test_not_a_safetensors_file(tmp_path):
    save_adapter(adapted(), tmp_path / "ad")
    w = tmp_path / "ad" / WEIGHTS_NAME
    for blob in (b"", b"\xff" * 8 + b"{}", (10).to_bytes(8, "little") + b"not json!!"):
        w.write_bytes(blob)
        with pytest.raises(AdapterError, match="not a readable safetensors file"):
            load_adapter(base_model(), tmp_path / "ad")


# ------------------------------------------------------------------------------------- fingerprints
MALFORMED = {
    "fro is a string": ("fro", "abc"),
    "fro is NaN": ("fro", float("nan")),
    "fro is Inf": ("fro", float("inf")),
    "fro is negative": ("fro", -1.0),
    "fro is a bool": ("fro", True),
    "fro is null": ("fro", None),
    "sigma is a string": ("sigma", "abc"),
    "sigma holds NaN": ("sigma", [float("nan"), 1.0]),
    "sigma holds a string": ("sigma", [1.0, "x"]),
    "sigma is too long": ("sigma", [1.0] * 7),
    "samples is a dict": ("samples", {"0": 1.0}),
    "a sample pair is short": ("samples", [[0]]),
    "a sample pair is long": ("samples", [[0, 1.0, 2.0]]),
    "a sample value is NaN": ("samples", [[0, float("nan")]]),
    "a sample index is negative": ("samples", [[-1, 0.5]]),
    "a sample index is out of range": ("samples", [[48, 0.5]]),
    "a sample index is a float": ("samples", [[1.5, 0.5]]),
    "too many samples": ("samples", [[0, 0.5]] * 33),
    "shape has three entries": ("shape", [6, 8, 1]),
    "shape holds a string": ("shape", [6, "8"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_fingerprint_is_an_adapter_error(tmp_path, case):
    key, value = MALFORMED[case]
    save_adapter(adapted(), tmp_path / "ad")
    cfg_path = tmp_path / "ad" / CONFIG
    cfg = json.loads(cfg_path.read_text())
    layer = next(iter(cfg["layers"].values()))
    assert fingerprint_problem(layer["fingerprint"]) is None
    layer["fingerprint"][key] = value
    cfg_path.write_text(json.dumps(cfg))  # json.dumps writes NaN / Infinity, as json.dump did for a NaN base
    assert fingerprint_problem(layer["fingerprint"]) is not None
    for target in (base_model(), adapted(seed=5)):
        before = state(target)
        with pytest.raises(AdapterError):
            load_adapter(target, tmp_path / "ad")
        assert_same_state(state(target), before)


def test_fingerprint_problem_names_the_field():
    fp = fingerprint(base_model()[0].weight)
    assert fingerprint_problem(fp) is None
    assert "'fro'" in fingerprint_problem({**fp, "fro": "abc"})
    assert "'sigma'[0]" in fingerprint_problem({**fp, "sigma": [math.nan]})
    assert "'samples'[0]" in fingerprint_problem({**fp, "samples": [[0]]})
    assert "no 'fro'" in fingerprint_problem({k: v for k, v in fp.items() if k != "fro"})
    assert "object" in fingerprint_problem([1, 2])
    with pytest.raises(AdapterError, match="'fro'.*'abc'"):
        fingerprint_mismatch({**fp, "fro": "abc"}, base_model()[0].weight)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_base_with_non_finite_weights_is_refused_at_save(tmp_path, bad):
    save_adapter(adapted(), tmp_path / "ad")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir() if p.is_file()}
    model = adapted()
    with torch.no_grad():
        model[2].weight[1, 3] = bad
    with pytest.raises(ValueError, match="non-finite|NaN"):
        save_adapter(model, tmp_path / "ad")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ad").iterdir() if p.is_file()} == before
    with pytest.raises(ValueError, match=r"\(4, 6\) has 1 NaN/Inf entries"):
        fingerprint(model[2].weight)


def test_writer_refuses_a_non_finite_fingerprint_naming_the_layer(tmp_path):
    # The last line of defence, whatever computed the config: nothing is written.
    fp = fingerprint(base_model()[0].weight)
    config = {"format": "loraxs-kernels-adapter", "layers": {"enc.q": {"fingerprint": {**fp, "fro": math.nan}}}}
    with pytest.raises(ValueError, match="layer enc.q: .*'fro'"):
        write_adapter_dir(tmp_path / "ad", {"enc.q.lora_R": torch.zeros(2, 2)}, config, {"format": "pt"})
    assert not (tmp_path / "ad").exists()
    good = copy.deepcopy(config)
    good["layers"]["enc.q"]["fingerprint"]["fro"] = fp["fro"]
    write_adapter_dir(tmp_path / "ad", {"enc.q.lora_R": torch.zeros(2, 2)}, good, {"format": "pt"})
    assert json.loads((tmp_path / "ad" / CONFIG).read_text()) == good
