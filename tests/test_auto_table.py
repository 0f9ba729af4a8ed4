"""The measured table behind backend="auto" on GPUs: built from a benchmark run, read back by key."""

import json

from loraxs_kernels.backends import auto_table
from loraxs_kernels.tools import tune_auto


def _rec(provider, M, rank, ms, mode="full", dtype="bfloat16", shape=(4096, 4096)):
    return {"provider": provider, "mode": mode, "M": M, "in_features": shape[0], "out_features": shape[1],
            "rank": rank, "dtype": dtype, "median_ms": ms}


def test_buckets():
    assert [auto_table.bucket(m, auto_table.M_BUCKETS) for m in (0, 1, 2, 16, 17, 9000)] == [1, 1, 16, 16, 128, 8192]
    assert auto_table.key("H200", "bfloat16", 5, 20) == "H200|bfloat16|M<=16|r<=64"


def test_choices_follow_the_measured_times(tmp_path):
    run = {
        "environment": {"device_name": "NVIDIA H200"},
        "records": [
            _rec("triton", 16, 16, 0.050), _rec("cuda", 16, 16, 0.030),          # cuda faster at M=16
            _rec("triton", 8192, 16, 1.00), _rec("cuda", 8192, 16, 1.20),        # triton faster at M=8192
            _rec("triton", 8192, 16, 1.00, mode="forward"), _rec("cuda", 8192, 16, 0.1, mode="forward"),  # ignored
            _rec("triton", 128, 64, 0.2),                                        # no cuda measurement: no entry
        ],
    }
    got = tune_auto.choices_from_run(run)
    assert got[auto_table.key("NVIDIA H200", "bfloat16", 16, 16)]["backend"] == "cuda"
    assert got[auto_table.key("NVIDIA H200", "bfloat16", 8192, 16)]["backend"] == "triton"
    assert auto_table.key("NVIDIA H200", "bfloat16", 128, 64) not in got

    results, table = tmp_path / "results.json", tmp_path / "table.json"
    results.write_text(json.dumps(run))
    assert tune_auto.main([str(results), "--table", str(table)]) == 0
    choices = auto_table.load(str(table))
    assert choices[auto_table.key("NVIDIA H200", "bfloat16", 3, 10)] == "cuda"


def _check_table(table: dict) -> None:
    """The rules a table "auto" reads must satisfy: every choice names a real backend for a key that
    parses, and comes with the measurement that made it (same backend, at least one case, and where
    the measurement is a cuda/triton time ratio, the faster backend)."""
    from loraxs_kernels.backends import NAMES

    choices, details = table["choices"], table.get("details", {})
    for k, backend in choices.items():
        device_name, dtype, m, r = k.rsplit("|", 3)
        assert device_name and dtype and m.startswith("M<=") and r.startswith("r<="), f"malformed key {k!r}"
        assert k == auto_table.key(device_name, dtype, int(m[3:]), int(r[3:])), f"{k!r} is not a bucket key"
        assert backend in NAMES and backend != "auto", f"{k}: unknown backend {backend!r}"
        assert k in details, f"{k}: chosen without a measurement"
        d = details[k]
        assert d["backend"] == backend and d["cases"] >= 1, f"{k}: choice {backend!r} but measured {d}"
        if "cuda_over_triton" in d:
            assert backend == ("cuda" if d["cuda_over_triton"] < 1 else "triton"), f"{k}: slower backend chosen {d}"
    assert set(details) <= set(choices), f"measurements without a choice: {sorted(set(details) - set(choices))}"


def test_shipped_table_holds_only_measured_entries():
    with open(auto_table.TABLE_PATH) as f:
        _check_table(json.load(f))


def test_table_check_rejects_planted_faults(tmp_path):
    """_check_table passes a table tune_auto wrote from measurements, and fails each planted fault."""
    run = {"environment": {"device_name": "NVIDIA H200"},
           "records": [_rec("triton", 16, 16, 0.050), _rec("cuda", 16, 16, 0.030),
                       _rec("triton", 8192, 16, 1.00), _rec("cuda", 8192, 16, 1.20)]}
    results, path = tmp_path / "results.json", tmp_path / "table.json"
    results.write_text(json.dumps(run))
    assert tune_auto.main([str(results), "--table", str(path)]) == 0
    good = json.loads(path.read_text())
    _check_table(good)
    k16 = auto_table.key("NVIDIA H200", "bfloat16", 16, 16)
    k8k = auto_table.key("NVIDIA H200", "bfloat16", 8192, 16)
    faults = {
        "a guessed entry": lambda t: t["choices"].__setitem__(auto_table.key("NVIDIA H200", "float16", 1, 4), "cuda"),
        "the slower backend": lambda t: t["choices"].__setitem__(k8k, "cuda") or t["details"][k8k].update(
            backend="cuda"),
        "choice and measurement disagree": lambda t: t["choices"].__setitem__(k16, "triton"),
        "an unknown backend": lambda t: t["choices"].__setitem__(k16, "cublas") or t["details"][k16].update(
            backend="cublas"),
        "a key outside the buckets": lambda t: t["choices"].__setitem__("NVIDIA H200|bfloat16|M<=17|r<=16", "cuda"),
        "a measurement with no choice": lambda t: t["choices"].pop(k16),
    }
    for name, plant in faults.items():
        bad = json.loads(json.dumps(good))
        plant(bad)
        try:
            _check_table(bad)
        except (AssertionError, KeyError, ValueError):
            continue
        raise AssertionError(f"_check_table accepted a table with {name}: {bad}")


def test_torch_competes_when_measured():
    """cuBLAS through the ATen schedule ("torch") is a candidate: it wins a bucket where it is fastest
    on the shapes all candidates were measured on, and a backend missing from a shape is not ranked."""
    run = {"environment": {"device_name": "NVIDIA H200"},
           "records": [_rec("triton", 2048, 16, 1.0, dtype="float32"), _rec("cuda", 2048, 16, 1.5, dtype="float32"),
                       _rec("torch", 2048, 16, 0.6, dtype="float32"),
                       _rec("triton", 16, 16, 0.05), _rec("cuda", 16, 16, 0.03), _rec("torch", 16, 16, 0.04),
                       _rec("triton", 128, 16, 0.2), _rec("torch", 128, 16, 0.1),
                       _rec("triton", 128, 16, 0.2, shape=(4096, 1024)), _rec("cuda", 128, 16, 0.01, shape=(4096, 1024))]}
    got = tune_auto.choices_from_run(run)
    k = auto_table.key("NVIDIA H200", "float32", 2048, 16)
    assert got[k]["backend"] == "torch" and got[k]["over_best"] == {"triton": 1.6667, "cuda": 2.5, "torch": 1.0}
    assert "cuda_over_triton" not in got[k]
    assert got[auto_table.key("NVIDIA H200", "bfloat16", 16, 16)]["backend"] == "cuda"
    # M=128: torch was measured on one shape only, cuda on the other: only triton is on both.
    assert auto_table.key("NVIDIA H200", "bfloat16", 128, 16) not in got
