"""The search's own lines in the driver's log: one per trial start, epoch and end."""

from __future__ import annotations

import sys

from ray.tune import Callback

from segray.tuning.objective import SEMANTIC, Objective
from segray.tuning.trial import EPOCHS_DONE


def _params(config: dict) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items())


class TrialLines(Callback):
    """Prints what each trial does, named by its id (Tune's own tables are turned off).

    Args:
        epochs: the epochs of a trial that is never stopped.
        trials: the trials the search makes.
        objective: what the search maximises (its metric is printed first).
    """

    def __init__(self, epochs: int, trials: int, objective: Objective = SEMANTIC):
        self.epochs, self.trials, self.ended, self.objective = epochs, trials, 0, objective

    def _print(self, line: str) -> None:
        print(line, file=sys.stdout, flush=True)

    def on_trial_start(self, iteration, trials, trial, **info):
        self._print(f"trial {trial.trial_id} started: {_params(trial.config)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if EPOCHS_DONE in result:
            o = self.objective
            self._print(
                f"trial {trial.trial_id} epoch {result[EPOCHS_DONE]}/{self.epochs}: val {o.label} {result.get(o.metric, float('nan')):.4f} "
                f"{o.second_label} {result.get(o.second, float('nan')):.4f} | {result.get('time_total_s', 0):.0f} s"
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.ended += 1
        last = trial.last_result.get(EPOCHS_DONE, 0) if trial.last_result else 0
        self._print(f"trial {trial.trial_id} ended after epoch {last} ({self.ended}/{self.trials} trials ended)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.ended += 1
        self._print(f"trial {trial.trial_id} failed ({self.ended}/{self.trials} trials ended); its error is in trials.parquet")
