"""The run's time budget: the one owner of ``time_budget``.

Every worker must take the same decision to stop (a worker that stops while
another steps on would hang the next collective), so the seconds a decision
uses are the workers' mean, agreed with one collective.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


class Budget:
    """Seconds since training started against ``seconds`` of budget (None: no budget).

    Args:
        seconds: the budget; None: training is never cut short.
        world_size: the workers that agree on the time.
        global_sum: sums a float64 vector over the workers (a collective:
            every worker calls it at the same point); unused with one worker.
        clock: seconds now (``time.time``; a test passes its own).
    """

    def __init__(
        self,
        seconds: float | None,
        world_size: int = 1,
        global_sum: Callable[[np.ndarray], np.ndarray] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.seconds, self.world_size, self.global_sum, self.clock = seconds, world_size, global_sum, clock
        self.start = clock()
        # What the stop decision keeps room for: the validation pass after the last step.
        self.reserve = 0.0
        self.exhausted_in_step = False

    @property
    def limited(self) -> bool:
        return self.seconds is not None

    def elapsed(self) -> float:
        """Seconds since the start, the same on every worker (their mean: one collective with several workers)."""
        local = self.clock() - self.start
        if self.world_size == 1 or self.global_sum is None:
            return local
        return float(self.global_sum(np.array([local]))[0]) / self.world_size

    def remaining(self, elapsed: float | None = None) -> float:
        """Seconds left before the budget (infinite without one), after the kept ``reserve``."""
        if self.seconds is None:
            return float("inf")
        return self.seconds - (self.elapsed() if elapsed is None else elapsed) - self.reserve

    def exhausted(self, elapsed: float | None = None) -> bool:
        """Whether the next step (with the validation pass after it) would pass the budget."""
        return self.remaining(elapsed) <= 0

    def share(self, elapsed: float) -> float | None:
        """The share of the budget ``elapsed`` seconds are (None without a budget)."""
        return None if self.seconds is None else elapsed / self.seconds
