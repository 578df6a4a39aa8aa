"""``spark-ddl bench network`` in its smallest configuration: two namespace machines of one agent,
one capped link rate, the flat all-reduce with and without fp16, two short epochs. Checks the
JSON's shape and that fp16 halves the bytes that cross machines (timings are not asserted: this
machine is shared).

Needs root and iproute2 (``spark_ddl.testbed``); skipped with the exact reason elsewhere."""

from __future__ import annotations

import json

import pytest

from spark_ddl.benchmarks import network
from spark_ddl.testbed.network import missing_requirements

MISSING = missing_requirements()
pytestmark = [pytest.mark.own_session, pytest.mark.machines, pytest.mark.timeout(400),
              pytest.mark.skipif(MISSING is not None, reason=f"separate machines: {MISSING}")]


def test_the_smallest_network_benchmark_reports_rows_and_halved_fp16_bytes(sessions, tmp_path):
    out = tmp_path / "network.json"
    sessions.stop()  # the benchmark starts its own session on the machines
    try:
        code = network.main(["--agents-per-machine", "1", "--rates", "100mbit", "--strategies", "flat,fp16",
                             "--epochs", "2", "--train-rows", "512", "--compression-work", "none", "--no-warm-up",
                             "--probe-runs", "1", "--json", str(out)],
                            prog="spark-ddl bench network")
    finally:
        sessions.stop()
    assert code == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "network" and result["rates"] == ["100mbit"]
    assert {"links", "rows", "targets", "compression_seconds_per_step"} <= set(result)
    link = result["links"][0]
    assert 50e6 < link["goodput_bytes_per_s"] * 8 < 110e6  # the cap holds (TCP goodput of a 100 Mbit/s link)
    # gloo's own bandwidth, from an all-reduce of the gradient's size: under the cap, and what the model uses
    assert link["gloo_big_floats"] == 64 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10
    assert 30e6 < link["gloo_bytes_per_s"] * 8 < 110e6
    assert 30e6 < link["gloo_fp16_bytes_per_s"] * 8 < 110e6  # half floats: the wire limits them here too
    assert 30e6 < link["gloo_oneway_bytes_per_s"] * 8 < 110e6  # a broadcast, one way: the cap again
    assert len(link["gloo_probe_runs"]) == 1  # --probe-runs (3 by default: medians)
    rows = {row["strategy"]: row for row in result["rows"]}
    assert set(rows) == {"flat", "fp16"}
    for row in rows.values():
        assert {"seconds_per_epoch", "seconds_per_step", "time_to_target_s", "bytes_across_per_step",
                "link_bytes_per_step", "predicted_seconds_per_step", "measured_over_predicted"} <= set(row)
        assert row["seconds_per_step"] > 0 and row["bytes_source"] == "summary"
        # the computation measured in the same fit (outside the exchange), the exchange predicted beside it
        assert row["compute_source"] == "fit" and 0 < row["compute_seconds_per_step"] < row["seconds_per_step"]
        assert row["predicted_seconds_per_step"] == pytest.approx(
            row["compute_seconds_per_step"] + row["predicted_exchange_seconds_per_step"])
        assert row["summary"]["machines"] == [[0], [1]]
    assert rows["fp16"]["summary"]["compression"] == "fp16"
    half = rows["fp16"]["bytes_across_per_step"] / rows["flat"]["bytes_across_per_step"]
    assert 0.45 <= half <= 0.55, half
    measured = rows["fp16"]["link_bytes_per_step"] / rows["flat"]["link_bytes_per_step"]
    # what the links carried: TCP/IP headers and the fit's own traffic (the job, the weights back) on top
    assert measured < 0.75, measured
    assert "c_2x1_fp16_step_speedup" in result["targets"]
