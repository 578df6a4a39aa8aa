"""The stream-recommender's replay windows (no Spark): timestamp order, whole periods, short
periods joined to the next, a short last one to the previous, the limit."""

from __future__ import annotations

import pandas as pd

from spark_ddl.apps.stream_recommender import WEEK, windows_of


def ratings(weeks_and_counts: list[tuple[int, int]]) -> pd.DataFrame:
    """``count`` ratings in week ``week`` for each pair, given out of timestamp order."""
    times = [week * WEEK + i for week, count in weeks_and_counts for i in range(count)]
    return pd.DataFrame({"user": range(len(times)), "item": 0, "rating": 3.0, "timestamp": times[::-1]})


def sizes(frame: pd.DataFrame) -> list[int]:
    return frame.groupby("window").size().tolist()


def test_whole_periods_in_timestamp_order():
    frame = windows_of(ratings([(0, 3), (1, 4), (2, 5)]), weeks=1, min_rows=1, limit=None)
    assert sizes(frame) == [3, 4, 5]
    assert frame["timestamp"].is_monotonic_increasing and frame["window"].is_monotonic_increasing


def test_periods_are_cut_at_week_boundaries_and_empty_ones_left_out():
    frame = windows_of(ratings([(0, 2), (1, 2), (5, 2), (6, 2)]), weeks=2, min_rows=1, limit=None)
    assert sizes(frame) == [4, 2, 2]  # weeks 0-1 | (2-3 empty) | 4-5 | 6-7


def test_short_periods_join_the_next_and_a_short_last_one_the_previous():
    frame = windows_of(ratings([(0, 1), (1, 1), (2, 5), (3, 6), (4, 2)]), weeks=1, min_rows=5, limit=None)
    assert sizes(frame) == [7, 8]  # 1+1+5 | 6, with the last 2 joined to it


def test_limit_keeps_the_first_windows():
    frame = windows_of(ratings([(0, 3), (1, 4), (2, 5)]), weeks=1, min_rows=1, limit=2)
    assert sizes(frame) == [3, 4] and len(frame) == 7
