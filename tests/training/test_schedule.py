"""The loop's owners outside Ray: the learning-rate schedule and the time budget."""

from __future__ import annotations

import numpy as np
import pytest

from segray.config import TrainConfig
from segray.training.budget import Budget
from segray.training.schedule import Optimization, poly_lr


def cfg(**kw) -> TrainConfig:
    return TrainConfig(data="memory", storage="none", name="t", lr=0.1, **kw)


def test_poly_warms_up_linearly_then_decays_to_zero():
    # warm-up over the first 10%: 0.1 * 0.05 / 0.1 at 5%; then 0.1 * (1 - (p - 0.1) / 0.9)^0.9.
    assert poly_lr(0.1, 0.1, 0.05) == pytest.approx(0.05)
    assert poly_lr(0.1, 0.1, 0.0) == pytest.approx(0.001)  # never quite 0: 1% of the peak
    assert poly_lr(0.1, 0.1, 0.1) == pytest.approx(0.1)
    assert poly_lr(0.1, 0.1, 0.55) == pytest.approx(0.1 * 0.5**0.9)
    assert poly_lr(0.1, 0.0, 1.0) == 0.0
    rates = [poly_lr(0.1, 0.0, p) for p in np.linspace(0, 1, 11)]
    assert all(a > b for a, b in zip(rates, rates[1:]))


def test_the_optimizer_follows_its_schedule():
    import keras

    variables = [keras.Variable(np.zeros(2, np.float32))]
    poly = Optimization(cfg(schedule="poly", warmup=0.0), total_steps=10, variables=variables)
    # Progress is the further of steps and budget share, at most 1.
    assert poly.progress(5) == 0.5 and poly.progress(5, budget_share=0.8) == 0.8 and poly.progress(50) == 1.0
    poly.before_step(poly.progress(5))
    assert poly.learning_rate() == pytest.approx(0.1 * 0.5**0.9)

    plateau = Optimization(cfg(schedule="plateau", optimizer="sgd"), total_steps=10, variables=variables)
    assert isinstance(plateau.optimizer, keras.optimizers.SGD)
    plateau.before_step(0.5)  # not a per-step schedule: unchanged
    for stale in (1, 2, 3, 4):
        plateau.after_epoch(stale)
    assert plateau.learning_rate() == pytest.approx(0.1 / 4)  # halved at 2 and 4 epochs without progress
    resumed = Optimization(cfg(schedule="plateau"), total_steps=10, variables=variables)
    resumed.restore({"lr": plateau.learning_rate()})
    assert resumed.learning_rate() == pytest.approx(0.025)

    constant = Optimization(cfg(schedule="constant"), total_steps=10, variables=variables)
    constant.after_epoch(2)
    constant.restore({"lr": 5.0})
    assert constant.learning_rate() == pytest.approx(0.1)


def test_budget_keeps_room_for_validation_and_agrees_across_workers():
    now = [100.0]
    budget = Budget(10.0, clock=lambda: now[0])
    now[0] = 106.0
    assert budget.elapsed() == 6.0 and budget.remaining() == 4.0 and not budget.exhausted()
    budget.reserve = 4.0  # the last validation pass took 4 s
    assert budget.exhausted() and budget.share(6.0) == 0.6
    # Two workers: the decision uses the mean of their clocks (the sum comes from the collective).
    two = Budget(10.0, world_size=2, global_sum=lambda v: v + 14.0, clock=lambda: now[0])
    now[0] = 112.0
    assert two.elapsed() == pytest.approx((6.0 + 14.0) / 2)
    unlimited = Budget(None, clock=lambda: now[0])
    assert not unlimited.limited and unlimited.remaining() == float("inf") and not unlimited.exhausted() and unlimited.share(5.0) is None
