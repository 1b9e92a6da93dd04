"""Calls timed interleaved (each round calls every function once, in turn), so that the drifts of a shared
machine hit them alike; ratios are taken per round, then summarised by their median."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable


def interleaved_seconds(
    calls: dict[Hashable, Callable[[], object]], repeats: int
) -> dict[Hashable, list[float]]:
    """Wall seconds of every call in each of ``repeats`` rounds, after one warm-up round."""
    times: dict[Hashable, list[float]] = {key: [] for key in calls}
    for round_ in range(repeats + 1):
        for key, call in calls.items():
            start = time.perf_counter()
            call()
            elapsed = time.perf_counter() - start
            if round_:
                times[key].append(elapsed)
    return times


def ratio_summary(times: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """Median, minimum and maximum over rounds of ``times / baseline`` (same round)."""
    ratios = [t / b for t, b in zip(times, baseline, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)
