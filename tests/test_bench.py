"""The benchmark's logic (rprop._bench), smoke only: no timing assertions."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("variant", ["irprop-", "irprop+"])
def test_bench_rows_and_table(variant):
    from rprop import _bench

    rows = _bench.run([(3, 100)], quick=True, repeats=3, variant=variant)
    assert [r["path"] for r in rows] == list(_bench.PATHS)
    for r in rows:
        assert r["ms"] is not None and r["ms"] > 0, r
        assert r["floor_ms"] == pytest.approx(
            300 * _bench.bytes_per_param(variant) / (r["copy_gbps"] * 1e9) * 1e3)
        assert r["peak_extra_mb"] is not None
    fused = rows[-1]
    # Nothing per parameter (iRprop+ makes a few scalars: the loss, its test).
    assert fused["path"] == "rprop fused" and fused["peak_extra_mb"] * 2**20 < 1024
    table = _bench.format_table(rows)
    assert "3x100" in table and "rprop fused" in table and "GB/s" in table
