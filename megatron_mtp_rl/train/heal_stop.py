"""When ``mtp-rl heal`` stops: the acceptance trend over the last ``--patience`` steps gains less than ``--min-gain``.

Each step's acceptance is measured on that step's fresh rollouts, so it carries sampling noise of
about ±0.01 on the demo's batches while healing gains about +0.0015 a step: "no better value for
three steps" stopped runs that were still improving. A least-squares line through the last
``patience`` acceptances averages that noise out (the slope's error falls as patience^-1.5); healing
stops when the line's rise across the window, slope × (patience − 1), is below ``min_gain``.
On synthetic series with noise σ = 0.008 (tests/unit/test_heal_stop.py) a rise of 0.0015 a step
is never stopped within 25 steps and a flat series stops within 40.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field


@dataclass
class TrendStop:
    """Feed each step's acceptance to :meth:`update`; it returns True when healing should stop."""

    patience: int
    min_gain: float = 0.0
    trend: float = field(default=float("nan"), init=False)  # the last window's fitted rise
    _window: deque = field(default_factory=deque, init=False)

    def __post_init__(self) -> None:
        if self.patience < 2:
            raise ValueError(f"the trend needs a window of at least 2 steps (got {self.patience})")
        self._window = deque(maxlen=self.patience)

    def update(self, acceptance: float) -> bool:
        if math.isnan(acceptance):  # a step without MTP tokens tells nothing
            return False
        self._window.append(acceptance)
        n = len(self._window)
        if n < self.patience:
            return False
        mid = (n - 1) / 2
        mean = sum(self._window) / n
        slope = sum((i - mid) * (a - mean) for i, a in enumerate(self._window)) / sum((i - mid) ** 2 for i in range(n))
        self.trend = slope * (n - 1)
        return self.trend < self.min_gain
