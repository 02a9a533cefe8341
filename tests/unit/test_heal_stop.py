"""mtp-rl heal's stopping rule on synthetic acceptance series with per-step rollout noise."""

from __future__ import annotations

import random

import pytest

from megatron_mtp_rl.config import RunConfig
from megatron_mtp_rl.train.heal_stop import TrendStop


def _steps_run(series: list[float], stop: TrendStop) -> int:
    for step, acceptance in enumerate(series, start=1):
        if stop.update(acceptance):
            return step
    return len(series)


def test_defaults_keep_healing_a_noisy_rise_and_stop_a_flat_series():
    d = RunConfig().mtp
    for seed in range(20):
        r = random.Random(seed)
        # +0.0015 a step under noise σ 0.008 (the README's heal run: 0.78 → 0.816 over 25 steps)
        rising = [0.78 + 0.0015 * t + r.gauss(0, 0.008) for t in range(25)]
        flat = [0.80 + r.gauss(0, 0.008) for _ in range(100)]
        assert _steps_run(rising, TrendStop(d.heal_patience, d.heal_min_gain)) == 25, seed
        assert _steps_run(flat, TrendStop(d.heal_patience, d.heal_min_gain)) <= 40, seed
    # the former rule (stop after 3 steps without a better value) stopped every one of these rises early
    r = random.Random(0)
    rising = [0.78 + 0.0015 * t + r.gauss(0, 0.008) for t in range(25)]
    best, since, steps = float("-inf"), 0, 0
    for a in rising:
        steps += 1
        best, since = (a, 0) if a > best else (best, since + 1)
        if since >= 3:
            break
    assert steps < 25


def test_the_rule_reads_the_trend_of_the_window():
    stop = TrendStop(patience=4, min_gain=0.01)
    assert not any(stop.update(a) for a in (0.5, 0.9, 0.5))  # never before a full window
    assert stop.update(0.51) and stop.trend == pytest.approx(-0.111)  # fit of 0.5, 0.9, 0.5, 0.51
    stop = TrendStop(patience=3, min_gain=0.01)
    assert not any(stop.update(a) for a in (0.5, float("nan"), 0.52, 0.54, 0.56))  # a NaN step is skipped
    with pytest.raises(ValueError):
        TrendStop(patience=1)
