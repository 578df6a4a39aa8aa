"""``spark-ddl bench network``'s table and the issue's targets, from the rows ``network`` measured."""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

from spark_ddl.benchmarks.network_model import describe_link, rate_bits

HEADER = (f"{'agents':<6} {'rate':<9} {'strategy':<27} {'s/epoch':>7} {'ms/step':>8} {'compute':>8} "
          f"{'exch':>7} {'exch pr':>7} {'predict':>8} {'meas/pred':>9} {'wire B/step':>19} {'link B/step':>11} "
          f"{'to target':>14} {'training':>8}")

LEGEND = ("compute: ms/step the slowest agent spent outside the exchange, measured in the same fits (history's "
          "compute_seconds; ddp, whose exchange runs inside backward: flat's at the same rate, marked *); exch: "
          "ms/step measured − compute; exch pr: the leader's compression work + wire ÷ gloo's bandwidth (for "
          "float16: its own) + messages × α (both measured per rate with gloo all-reduces of the gradient's size "
          "and of one float) + where the agents outnumber the host's cores, the exchange's CPU work (its bytes "
          "at the unlimited link's bandwidth) × (agents ÷ cores − 1); "
          "predict = compute + exch pr; wire: bytes per step on one link's critical path "
          "(from the summary, or (model)); link: the busiest link direction's byte counter over the whole fit ÷ "
          "steps; to target: the fit's wall time less the epochs after the first at the target (launch included); "
          "training: the epochs' own seconds up to it")


def _ms(value: float | None, width: int = 8) -> str:
    return f"{value * 1e3:{width}.2f}" if value is not None else f"{'–':>{width}}"


def format_row(row: dict[str, Any]) -> str:
    ratio = row.get("measured_over_predicted")
    source = " (model)" if row["bytes_source"] == "model" else ""
    across = f"{row['bytes_across_per_step']:,.0f}{source}" if math.isfinite(row["bytes_across_per_step"]) else "–"
    link = f"{row['link_bytes_per_step']:,.0f}" if row.get("link_bytes_per_step") is not None else "–"
    reached = (f"{row['time_to_target_s']:.1f} s (ep {row['target_epoch']:.0f})"
               if row.get("time_to_target_s") is not None else "not reached")
    training = f"{row['training_seconds_to_target']:.2f}" if row.get("training_seconds_to_target") else "–"
    compute = _ms(row.get("compute_seconds_per_step"), 7) + ("*" if row.get("compute_source") == "flat" else " ")
    return (f"{row['agents']:<6} {row['rate']:<9} {row['label']:<27} {row['seconds_per_epoch']:7.3f} "
            f"{_ms(row['seconds_per_step'])} {compute} {_ms(row.get('measured_exchange_seconds_per_step'), 7)} "
            f"{_ms(row.get('predicted_exchange_seconds_per_step'), 7)} {_ms(row.get('predicted_seconds_per_step'))} "
            f"{f'{ratio:.2f}' if ratio else '–':>9} {across:>19} {link:>11} {reached:>14} {training:>8}")


def _within(ratios: list[float]) -> str:
    return f"{sum(0.75 <= x <= 1.25 for x in ratios)}/{len(ratios)}"


def prediction_targets(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """(a): every synchronous row's measured ÷ predicted step within ±25 %, in all and per rate; and
    the network part alone (measured exchange ÷ predicted exchange), for what it says about the model."""
    out: dict[str, Any] = {}
    sync = [r for r in rows if r["synchronous"] and r.get("measured_over_predicted")]
    ratios = [r["measured_over_predicted"] for r in sync]
    if not ratios:
        return out
    out["a_every_sync_row_within_25pct"] = all(0.75 <= x <= 1.25 for x in ratios)
    out["a_ratios_range"] = [min(ratios), max(ratios)]
    out["a_rows_within"] = _within(ratios)
    out["a_rows_within_by_rate"] = {rate: _within([r["measured_over_predicted"] for r in sync if r["rate"] == rate])
                                    for rate in dict.fromkeys(r["rate"] for r in sync)}
    alone = [r["seconds_per_step"] / r["predicted_seconds_per_step_host_alone"] for r in sync
             if r.get("predicted_seconds_per_step_host_alone")]
    if alone:  # the same model without the host-sharing term (as if every machine had its own cores)
        out["a_rows_within_without_host_sharing"] = _within(alone)
    tcp = [r["seconds_per_step"] / r["predicted_seconds_per_step_tcp"] for r in sync
           if r.get("predicted_seconds_per_step_tcp")]
    if tcp:  # the same model with a bulk TCP send's goodput as the bandwidth (the model until 2026-12-05)
        out["a_rows_within_tcp_goodput_model"] = _within(tcp)
    exchange = [r["exchange_measured_over_predicted"] for r in sync if r.get("exchange_measured_over_predicted")]
    if exchange:
        out["a_exchange_ratios_range"] = [min(exchange), max(exchange)]
        out["a_exchange_within_25pct"] = _within(exchange)
    return out


def targets(rows: list[dict[str, Any]], slow: str) -> dict[str, Any]:
    """The issue's three targets, as far as the rows measured allow."""
    out = prediction_targets(rows)
    for per_machine in sorted({r["agents_per_machine"] for r in rows}):
        group = {r["strategy"]: r for r in rows if r["rate"] == slow and r["agents_per_machine"] == per_machine}
        flat = group.get("flat")
        key = f"{rows[0]['machines']}x{per_machine}"
        if flat and flat["time_to_target_s"]:
            reached = [r for r in group.values() if r["time_to_target_s"] is not None]
            best = min(reached, key=lambda r: r["time_to_target_s"])
            speedup = flat["time_to_target_s"] / best["time_to_target_s"]
            out[f"b_{key}_best_to_target"] = {"strategy": best["strategy"], "speedup": speedup, "met": speedup >= 5,
                                              "epoch": best["target_epoch"], "flat_epoch": flat["target_epoch"]}
            trained = [r for r in reached if r["training_seconds_to_target"]]
            fastest = min(trained, key=lambda r: r["training_seconds_to_target"])
            speedup = flat["training_seconds_to_target"] / fastest["training_seconds_to_target"]
            out[f"b_{key}_best_training_to_target"] = {"strategy": fastest["strategy"], "speedup": speedup,
                                                       "met": speedup >= 5, "epoch": fastest["target_epoch"]}
        if flat and group.get("fp16"):
            speedup = flat["seconds_per_step"] / group["fp16"]["seconds_per_step"]
            # the repeats ran interleaved (flat, fp16, flat, fp16, ...): the ratios of neighbours too
            paired = sorted(a["seconds_per_step"] / b["seconds_per_step"]
                            for a, b in zip(flat["repeats"], group["fp16"]["repeats"])
                            if a["seconds_per_step"] and b["seconds_per_step"])
            out[f"c_{key}_fp16_step_speedup"] = {"speedup": speedup, "met": speedup >= 1.8, "paired": paired}
    return out


def median_row(fits: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over repeats (time to target: over the repeats that reached it, if most did)."""
    def med(key):
        values = [f[key] for f in fits if f[key] is not None]
        return statistics.median(values) if values and len(values) * 2 > len(fits) else None

    row = {key: med(key) for key in ("fit_seconds", "seconds_per_epoch", "seconds_per_step", "steps_per_epoch",
                                      "compute_seconds_per_step", "slowest_total_compute_seconds_per_step",
                                      "time_to_target_s", "training_seconds_to_target",
                                      "target_epoch", "link_bytes_per_step")}
    row["val_accuracy"] = fits[-1]["val_accuracy"]
    row["summary"] = fits[-1]["summary"]
    row["repeats"] = [{k: f[k] for k in ("seed", "seconds_per_step", "compute_seconds_per_step", "time_to_target_s",
                                         "training_seconds_to_target", "target_epoch")} for f in fits]
    return row


def report(args: argparse.Namespace, rows: list, links: list, compression: dict[str, float]) -> dict[str, Any]:
    """Print the table and the targets; the targets."""
    print(f"\nSynchronisation across machines: digits, MLP 64→{'→'.join(map(str, args.hidden))}→10, batch "
          f"{args.batch_size}/agent, SGD momentum 0.9, {args.epochs} epochs, target held-out accuracy {args.target}"
          f"{f', medians of {args.repeats} interleaved repeats' if args.repeats > 1 else ''}")
    print(LEGEND + "\n")
    for name, seconds in compression.items():
        print(f"  compression work of the leader, {name}: {seconds * 1e3:.2f} ms/step")
    for link in links:
        print(f"  {args.machines}×{link['agents_per_machine']} link {link['rate']}: {describe_link(link)}")
    print()
    print(HEADER)
    for row in rows:
        print(format_row(row))
    checks = targets(rows, min(args.rates, key=lambda r: rate_bits(r) or float("inf")))
    print()
    for key, value in checks.items():
        print(f"  {key}: {value}")
    return checks
