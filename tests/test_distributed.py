"""LoRA-XS training across 2 processes (gloo on the CPU, 127.0.0.1 only) against one process.

One spawn runs every scenario of dist_worker.py (DDP, FSDP2 per layer / whole model / with
activation checkpointing / with bf16 MixedPrecisionPolicy, torch.distributed.checkpoint and the
adapter file, DTensor tensor parallelism column-wise / row-wise / both, batch-sharded DTensors, an
unsupported layout); each test below reads one scenario's per-rank results and compares R's
gradient at every step and R after dist_worker.STEPS SGD steps with the single-process run on the
whole batch (dist_worker.reference).

Tolerance (fp32): rtol 1e-5, atol 1e-6 (gradients are up to ~0.5). The distributed runs sum the
same products in another order (half-batch partial sums, then an all-reduce or reduce-scatter);
measured differences are 1.8e-7 at most. bf16 mixed precision: max|err| ≤ 3e-2·max|ref| (bf16's
tolerance in tests/common.py; measured ~1e-2).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dist_worker as w
from loraxs_kernels.ops.linear import NATIVE_REASON

pytestmark = [
    pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                       reason="torch.distributed with gloo is not available in this torch build"),
    pytest.mark.skipif(NATIVE_REASON is not None, reason=f"the DTensor rules need the C++ op: {NATIVE_REASON}"),
]

TIMEOUT_S = 150  # the whole spawn, all scenarios; ~10 s measured on the 2-core machine
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def outdir(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed")
    seconds = w.run(list(w.SCENARIOS), out, timeout_s=TIMEOUT_S)
    print(f"\n{len(w.SCENARIOS)} distributed scenarios on {w.WORLD} processes: {seconds:.1f} s")
    return out


@pytest.fixture(scope="module")
def ref():
    return w.reference()


def results(outdir, name):
    return [w.load(outdir, name, r) for r in range(w.WORLD)]


def assert_matches(res, ref, rtol=RTOL, atol=ATOL):
    assert len(res["grads"]) == len(ref["grads"]) == w.STEPS
    for step, (got, want) in enumerate(zip(res["grads"], ref["grads"])):
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=atol, msg=lambda m: f"grad of {n}, step {step}: {m}")
    for n in ref["R"]:
        torch.testing.assert_close(res["R"][n], ref["R"][n], rtol=rtol, atol=atol,
                                   msg=lambda m: f"{n} after {w.STEPS} steps: {m}")


def test_reference_trains():
    # Guard against a vacuous comparison: R moves and the loss falls in the single-process run.
    ref = w.reference()
    assert ref["losses"][-1] < 0.8 * ref["losses"][0], ref["losses"]
    net = w.Net()
    for n, p in net.named_parameters():
        if p.requires_grad:
            assert (ref["R"][n] - p.detach()).abs().max() > 1e-2, n


def test_ddp_frozen_base(outdir, ref):
    for res in results(outdir, "ddp"):
        assert_matches(res, ref)
        # Only the R's travel: r² fp32 numbers per layer, one bucket, every step.
        assert res["trainable_numel"] == 2 * w.RANK**2
        assert res["bytes_per_step"] == [2 * w.RANK**2 * 4] * w.STEPS, res["bytes_per_step"]
        assert res["buckets_per_step"] == [1] * w.STEPS


@pytest.mark.parametrize("name", ["fsdp_layer", "fsdp_model", "fsdp_checkpoint"])
def test_fsdp2(outdir, ref, name):
    for res in results(outdir, name):
        assert_matches(res, ref)
        # R really is sharded between the ranks (FSDP2 shards dim 0 of every parameter).
        assert set(res["R_placements"].values()) == {"(Shard(dim=0),)"}, res["R_placements"]
        views = [m for m in res["warnings"] if "view tensor" in m]
        assert not views, views


def test_fsdp2_bf16_mixed_precision(outdir, ref):
    for res in results(outdir, "fsdp_bf16"):
        # FSDP2 casts parameters to bf16 but leaves buffers alone: fp32 A and B meet bf16 x.
        assert "A has dtype torch.float32 but x has dtype torch.bfloat16" in (res["fp32_buffers_error"] or ""), \
            res["fp32_buffers_error"]
        # With A and B stored in bf16, it trains; R's master copy (the sharded parameter) stays fp32.
        assert set(res["R_dtype"].values()) == {"torch.float32"}
        for step, (got, want) in enumerate(zip(res["grads"], ref["grads"])):
            for n in want:
                err = float((got[n] - want[n]).abs().max())
                assert err <= 3e-2 * float(want[n].abs().max()), (step, n, err)
        errs = [float((res["R"][n] - ref["R"][n]).abs().max()) for n in ref["R"]]
        assert max(errs) <= 3e-2 * max(float(ref["R"][n].abs().max()) for n in ref["R"]), errs
        assert max(errs) > 1e-6, "bf16 compute should not match fp32 bit for bit: did the policy apply?"


def test_fsdp2_distributed_checkpoint_and_adapter_file(outdir, ref):
    from loraxs_kernels import load_adapter

    ranks = results(outdir, "dcp")
    for res in ranks:
        assert_matches(res, ref)
        # The sharded adapter state dict holds R only, r²/2 numbers per layer on each rank.
        assert res["sharded_keys"] == ["down.lora_R", "up.lora_R"]
        assert res["shard_numel"] == {"down.lora_R": w.RANK**2 // 2, "up.lora_R": w.RANK**2 // 2}
    # dcp.save from the trained model, dcp.load into a fresh one (R zeroed), gathered to rank 0.
    gathered = ranks[0]["gathered"]
    assert ranks[1]["gathered"] is None
    assert gathered.keys() == ref["R"].keys()
    for n in ref["R"]:
        torch.testing.assert_close(gathered[n], ref["R"][n], rtol=RTOL, atol=ATOL)
    # The adapter file rank 0 wrote loads into a plain single-process model and gives the same R.
    assert ranks[0]["adapter_path"] and ranks[1]["adapter_path"] is None
    model = w.Net()
    load_adapter(model, Path(ranks[0]["adapter_path"]))
    for n in ref["R"]:
        torch.testing.assert_close(dict(model.named_parameters())[n].detach(), ref["R"][n], rtol=RTOL, atol=ATOL)


TP_PLACEMENTS = {
    "column-wise": {"weight": "(Shard(dim=0),)", "bias": "(Shard(dim=0),)", "lora_A": "(Replicate(),)",
                    "lora_R": "(Replicate(),)", "lora_B": "(Shard(dim=1),)"},
    "row-wise": {"weight": "(Shard(dim=1),)", "bias": "(Replicate(),)", "lora_A": "(Shard(dim=0),)",
                 "lora_R": "(Replicate(),)", "lora_B": "(Replicate(),)"},
    "replicated": {k: "(Replicate(),)" for k in ("weight", "bias", "lora_A", "lora_R", "lora_B")},
}


@pytest.mark.parametrize("name,up,down", [
    ("tp_mlp", "column-wise", "row-wise"),
    ("tp_colwise", "column-wise", "column-wise"),
    ("tp_rowwise", "row-wise", "row-wise"),
    ("dtensor_batch", "replicated", "replicated"),
])
def test_dtensor(outdir, ref, name, up, down):
    for res in results(outdir, name):
        assert_matches(res, ref)
        for layer, layout in (("up", up), ("down", down)):
            got = {k.split(".", 1)[1]: v for k, v in res["placements"].items() if k.startswith(layer + ".")}
            assert got == TP_PLACEMENTS[layout], (layer, got)
        # grad_R comes out as a per-rank partial sum; the optimizer's read of it all-reduces r² numbers.
        assert set(res["grad_placements"].values()) == {"(Partial(sum),)"}, res["grad_placements"]


def test_dtensor_unsupported_layout(outdir):
    for res in results(outdir, "tp_unsupported"):
        assert res["is_unsupported_layout"], res
        assert "no sharding rule for the layout weight=S(0), bias=S(0), A=R, R=R, B=R" in res["error"], res["error"]


def test_import_loraxs_kernels_stays_light():
    code = ("import sys, loraxs_kernels; print(sorted(m for m in sys.modules if m.startswith("
            "('torch.distributed.tensor', 'torch.distributed.fsdp', 'loraxs_kernels.distributed'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("strategy", ["fsdp", "ddp", "tp"])
def test_example_torchrun(tmp_path, strategy):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={w.free_port()}", "-m", "loraxs_kernels.examples.train_distributed",
           "--strategy", strategy, "--steps", "4", "--dim", "32", "--hidden", "64", "--seq", "4", "--batch", "8",
           "--rank", "4", "--out", str(tmp_path / "adapter")]
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = [line for line in out.stdout.splitlines() if line.startswith(f"{strategy} on 2 processes (gloo)")]
    assert summary, out.stdout
    first, last = (float(v) for v in summary[0].split("loss ")[1].split(" in ")[0].split(" -> "))
    assert last < first, summary[0]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
