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


def test_shipped_table_holds_only_measured_entries():
    with open(auto_table.TABLE_PATH) as f:
        shipped = json.load(f)
    # Every choice must come with the measurement that made it.
    assert set(shipped["choices"]) == set(shipped.get("details", {}))
