"""``spark-ddl bench network``'s traffic model: the bytes each strategy puts on the busiest link
direction for a placement of ranks on machines, which of them travel one way only, and the
predicted exchange. Checked against the messages of gloo's algorithms counted by hand."""

from __future__ import annotations

import pytest

from spark_ddl.benchmarks.network_model import (bandwidth_key, model_bytes, one_way, predict_exchange,
                                                reduce_broadcast_bytes, ring_all_reduce_bytes)

S = 1_000_000.0


def test_a_ring_over_ranks_that_alternate_machines_crosses_machines_on_every_edge():
    # ranks {0, 2} on machine 0 and {1, 3} on machine 1: every edge r -> r + 1 crosses, 2 · 3/4 · S each way
    assert ring_all_reduce_bytes(S, [0, 1, 0, 1]) == pytest.approx(2 * 2 * 0.75 * S)
    # contiguous: only 1 -> 2 and 3 -> 0 cross, one edge per direction
    assert ring_all_reduce_bytes(S, [0, 0, 1, 1]) == pytest.approx(2 * 0.75 * S)
    assert ring_all_reduce_bytes(S, [0, 0]) == 0.0  # one machine: nothing crosses


def test_gathers_and_broadcasts_use_the_links_one_way_and_rings_both():
    assert one_way([(1, 0, S)], [0, 1])  # a gather to rank 0
    assert not one_way([(0, 1, S), (1, 0, S)], [0, 1])  # a two-member ring step
    assert one_way([(0, 2, S), (1, 3, S)], [0, 0, 1, 1])  # a broadcast round: machine 0 sends, 1 receives
    assert one_way([(0, 1, S)], [0, 0])  # nothing crosses


def test_parameter_server_puts_its_gather_and_broadcast_one_way():
    # two machines of one agent: ring reduce-scatter S/2 each way, gather S/2 to rank 0, broadcast S back
    total, one_way_bytes = reduce_broadcast_bytes(S, [0, 1])
    assert (total, one_way_bytes) == (pytest.approx(2 * S), pytest.approx(1.5 * S))
    # 2 × 2 placed {0, 2}, {1, 3}: reduce-scatter 1.5 S each way; gather of two quarters; broadcast 0 -> 1
    total, one_way_bytes = reduce_broadcast_bytes(S, [0, 1, 0, 1])
    assert (total, one_way_bytes) == (pytest.approx(3 * S), pytest.approx(1.5 * S))
    wire, source, _, reported_one_way = model_bytes("ps", int(S), [0, 1], None)
    assert (wire, source, reported_one_way) == (pytest.approx(2 * S), "model", pytest.approx(1.5 * S))


def test_the_flat_exchange_reports_its_own_bytes_and_all_reduces_both_ways():
    wire, source, messages, one_way_bytes = model_bytes("flat", int(S), [0, 1, 0, 1],
                                                        {"bytes_across_machines_per_step": 12345})
    assert (wire, source, messages, one_way_bytes) == (12345.0, "summary", 2, 0.0)
    wire, source, messages, _ = model_bytes("local_sgd", int(S), [0, 1], {"bytes_across_machines_per_step": S / 8})
    assert (wire, source, messages) == (S / 8, "summary", 2 / 8)
    # fp16 local SGD without a summary: half the model per average, at gloo's float16 bandwidth
    wire, source, messages, _ = model_bytes("local_sgd_fp16", int(S), [0, 1], None)
    assert (wire, source, messages) == (pytest.approx(S / 2 / 8), "model", 2 / 8)
    assert bandwidth_key("local_sgd_fp16") == bandwidth_key("fp16") == "gloo_fp16_bytes_per_s"


def test_the_predicted_exchange_puts_one_way_bytes_at_the_one_way_bandwidth():
    link = {"gloo_bytes_per_s": 1e6, "gloo_oneway_bytes_per_s": 4e6, "alpha_s": 1e-4}
    assert predict_exchange(2e6, 4, link, 0.01, one_way_bytes=1.5e6) == pytest.approx(
        0.01 + 0.5e6 / 1e6 + 1.5e6 / 4e6 + 4 * 1e-4)
    assert predict_exchange(2e6, 4, link) == pytest.approx(2.0 + 4e-4)
    assert predict_exchange(float("nan"), 0, link) is None  # async: no lock-step


def test_agents_that_outnumber_the_hosts_cores_stretch_the_exchanges_cpu_work():
    import argparse

    from spark_ddl.benchmarks.network import host_sharing, parameter_count, predicted_row

    assert (host_sharing(4, 2), host_sharing(2, 2), host_sharing(1, 8)) == (2.0, 1.0, 1.0)
    args = argparse.Namespace(hidden=[8], machines=2)
    size = 4 * parameter_count(args)
    capped = {"rate": "100mbit", "gloo_bytes_per_s": 1e6, "gloo_oneway_bytes_per_s": 1e6, "alpha_s": 1e-4,
              "goodput_bytes_per_s": 1.1e6}
    unlimited = {"rate": "unlimited", "gloo_bytes_per_s": 1e8, "gloo_oneway_bytes_per_s": 1e8, "alpha_s": 1e-5}
    row = {"summary": {"machines": None, "bytes_across_machines_per_step": size}, "compute_seconds_per_step": 0.01,
           "seconds_per_step": 0.02}
    predicted_row(row, "flat", args, 2, capped, {}, None, None, unlimited)
    alone = 0.01 + size / 1e6 + 2 * 1e-4  # compute + the wire at the capped bandwidth + two messages
    assert row["predicted_seconds_per_step_host_alone"] == pytest.approx(alone)
    # four agents: the wire's CPU work (its bytes at the unlimited bandwidth) once more per extra share
    assert row["predicted_seconds_per_step"] == pytest.approx(alone + size / 1e8 * (host_sharing(4) - 1))
    assert row["host_sharing"] == host_sharing(4)
