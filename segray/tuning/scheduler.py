"""ASHA on the search's objective per epoch (val mIoU, or val mask AP50 for instance data), keeping its state in storage so a resumed search judges as before."""

from __future__ import annotations

import os
import pickle
import tempfile

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from segray import storage
from segray.config import TuneConfig
from segray.tuning.trial import EPOCHS_DONE

# In a folder of its own: Tune copies the experiment folder's top-level .json and .pkl files
# to its staging folder on resume and uploads them back later, which would put an old
# state over a newer one.
SCHEDULER_FILE = "asha/state.pkl"
METRIC = "val_miou"  # a semantic search's; segray.tuning.objective picks by the dataset's task


class PersistentASHA(ASHAScheduler):
    """ASHA that saves its rungs and the trials it stopped to ``state_uri`` after each decision.

    Tune restores a search's trials but not its scheduler: a resumed search
    would forget every rung and never stop a trial that reaches one first.
    Saving with ASHA's own ``save`` after each result lets it go on as it was.
    The trials it stopped before their last epoch are kept as well: a trial
    stopped just before the driver died is stopped again at once, and the
    trials table says which trials were stopped early.
    """

    def __init__(self, state_uri: str, **kwargs):
        super().__init__(**kwargs)
        self.state_uri = state_uri
        self.stopped_early: dict[str, int] = {}  # trial id -> epochs done when stopped
        self._loaded = False

    @classmethod
    def for_search(cls, cfg: TuneConfig, uri: str, metric: str = METRIC) -> "PersistentASHA":
        return cls(
            storage.join(uri, SCHEDULER_FILE),
            time_attr=EPOCHS_DONE,
            metric=metric,
            mode="max",
            max_t=cfg.epochs,
            grace_period=cfg.grace_epochs,
            reduction_factor=cfg.reduction_factor,
        )

    def _load(self) -> None:
        self._loaded = True
        if storage.exists(self.state_uri):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "state.pkl")
                with open(path, "wb") as f:
                    f.write(storage.read_bytes(self.state_uri))
                self.restore(path)
            self._loaded = True

    def _save(self) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "state.pkl")
            self.save(path)
            with open(path, "rb") as f:
                storage.write_bytes(self.state_uri, f.read())

    def on_trial_add(self, tune_controller, trial):
        if not self._loaded:
            self._load()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result):
        if trial.trial_id in self.stopped_early:
            return TrialScheduler.STOP
        action = super().on_trial_result(tune_controller, trial, result)
        if action == TrialScheduler.STOP and result.get(EPOCHS_DONE, self._max_t) < self._max_t:
            self.stopped_early[trial.trial_id] = int(result[EPOCHS_DONE])
        self._save()
        return action

    def on_trial_complete(self, tune_controller, trial, result):
        if trial.trial_id in self._trial_info:
            super().on_trial_complete(tune_controller, trial, result)
        self._save()

    def on_trial_remove(self, tune_controller, trial):
        self._trial_info.pop(trial.trial_id, None)


def stopped_early(uri: str) -> dict[str, int]:
    """The trials the search's ASHA stopped before their last epoch -> the epochs they had done then."""
    state_uri = storage.join(uri, SCHEDULER_FILE)
    if not storage.exists(state_uri):
        return {}
    # Written by the search's own driver (PersistentASHA.save), never taken from a user.
    return dict(pickle.loads(storage.read_bytes(state_uri)).get("stopped_early", {}))
