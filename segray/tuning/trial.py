"""One trial of a search, as Ray Tune runs it: a segray training run that reports each epoch to Tune."""

from __future__ import annotations

from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from segray import storage
from segray.tuning.space import trial_config

# Epochs the trial has finished (Train reports the 0-based ``epoch``): ASHA's clock. Tune's own
# training_iteration starts again at 1 when a trial restarts after the driver stopped.
EPOCHS_DONE = "epochs_done"


class EpochReport(TuneReportCallback):
    """Tune's ``TuneReportCallback`` (rank 0's metrics to the trial), with ``epochs_done`` added."""

    def after_report(self, run_context, metrics, checkpoint):
        first = {**metrics[0], EPOCHS_DONE: int(metrics[0]["epoch"]) + 1}
        super().after_report(run_context, [first, *metrics[1:]], checkpoint)


def run_trial(params: dict[str, Any], base: dict[str, Any], plan=None, tracking_tags: dict[str, str] | None = None) -> None:
    """Tune's function trainable: the segray training run of ``params`` over ``base``, named by the trial id.

    A trial that ran before the search's driver stopped finds its run in
    storage and continues it from its last checkpoint (Ray Train restores a
    run of the same storage and name). It is then rebuilt from that run's
    own config.json (``config_from`` with ``resume``), so a plan made again
    by the resumed driver cannot differ from the one the run started with.
    """
    import ray.tune

    from segray.runs import run_exists
    from segray.training import train

    name = ray.tune.get_context().get_trial_id()
    again = {"resume": True} if run_exists(storage.join(base["storage"], name)) else {}
    cfg = trial_config({**base, "name": name, **again}, params, plan)
    train(cfg, callbacks=[EpochReport()], tracking_tags=tracking_tags)
