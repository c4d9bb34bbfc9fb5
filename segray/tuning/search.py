"""The search on Ray Tune: each trial is one segray training run (Ray Train inside a Tune trial).

Ray 2.60's pattern for Train V2 under Tune: a function trainable per trial
(``run_trial``) builds the trial's ``TrainConfig`` and launches the Ray Train
run with Tune's ``TuneReportCallback``, so every epoch's metrics reach the
Tune driver, where ASHA compares trials by the objective (validation mIoU; on
an instance dataset, validation mask AP50: ``segray.tuning.objective``) and stops poor ones.
The trial's own process needs next to no CPU (its Train controller asks for
none and its workers ask for their own), so a trial costs its workers' CPUs,
plus one for its data pipeline.

``STORAGE/NAME/`` holds Tune's experiment state, ``runs/TRIAL/`` (one segray
run per trial: history, checkpoints, ``model/``), ``asha/state.pkl`` (ASHA's
rungs and the trials it stopped, so a resumed search goes on judging the same
way) and, when the search ends, ``trials.parquet``, ``best.json`` and
``search.png`` (``segray.tuning.results``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from segray import storage
from segray.config import ConfigError, TuneConfig, about
from segray.runs import SEARCH_RUNS_DIR
from segray.runtime import DATA_PIPELINE_CPUS
from segray.tracking import finish_search_run, start_search_run, trial_tags
from segray.tuning.objective import SEMANTIC, Objective, dataset_objective
from segray.tuning.space import SearchSpace, check_space, load_space, probes, trial_config

# A trial's own process only waits on its Train run (whose controller asks for no CPU and
# whose workers ask for their own); Tune refuses a trial that asks for nothing at all.
TRIAL_DRIVER_CPUS = 0.01


@dataclass(frozen=True)
class Search:
    """A checked search, ready to run: its config, space, the fields every trial shares, and where it goes."""

    config: TuneConfig
    space: SearchSpace
    base: dict[str, Any]
    uri: str
    plan: Any = None  # (Plan, source): the dataset's plan beneath every trial
    objective: Objective = SEMANTIC  # what ASHA and best.json maximise: from the dataset's task


def trial_base(cfg: TuneConfig, uri: str) -> dict[str, Any]:
    """The TrainConfig fields the search sets for every trial (``name`` is the trial's id)."""
    return {
        "data": cfg.data,
        "storage": storage.join(uri, SEARCH_RUNS_DIR),
        "workers": cfg.workers_per_trial,
        "cpus_per_worker": cfg.cpus_per_worker,
        "gpu": cfg.gpu,
        "epochs": cfg.epochs,
        # Only when set: a trial's config (and so its config.json) is as before without tracking.
        **({"mlflow": cfg.mlflow} if cfg.mlflow else {}),
        **({"mlflow_experiment": cfg.mlflow_experiment} if cfg.mlflow_experiment != "segray" else {}),
    }


def search_exists(uri: str) -> bool:
    from ray import tune

    fs, path = storage.filesystem(uri)
    return tune.Tuner.can_restore(path, storage_filesystem=fs)


def prepare(cfg: TuneConfig) -> Search:
    """Checks the space, the trials it can make and the search's name before Ray starts.

    Raises:
        ConfigError: a bad key or value in the space, naming it (``search_space``).
        FileExistsError: the search exists and ``resume`` is off.
        FileNotFoundError: ``resume`` without a search, or ``data`` is not a dataset.
    """
    from segray.planning import plan_for
    from segray.training import resolve

    space = load_space(cfg.search_space)
    uri = storage.join(cfg.storage, cfg.name)
    base = trial_base(cfg, uri)
    check_space(space, {**base, "name": "check"})
    # Made once here (DATA/plan.json when it is for this device, else fingerprinted now),
    # so every trial starts from the same plan without a pass over the data of its own.
    plan = plan_for({"data": cfg.data, "gpu": cfg.gpu})
    for params in probes(space):
        try:
            resolve(trial_config({**base, "name": "check"}, params, plan))
        except ConfigError as e:
            shown = ", ".join(f"{k}={v!r}" for k, v in params.items() if k in space.domains)
            raise ConfigError(f"search_space {space.source}: a trial with {shown or 'its values'}: {e}", field="search_space") from None
    exists = search_exists(uri)
    if exists and not cfg.resume:
        raise about("name", FileExistsError(f"name {cfg.name}: the search {uri} already exists; set `resume` to continue it or choose another `name`"))
    if cfg.resume and not exists:
        raise about("resume", FileNotFoundError(f"resume: there is no search at {uri} to continue"))
    return Search(cfg, space, base, uri, plan, dataset_objective(cfg.data))


def trial_count(search: Search) -> int:
    """Trials the search makes: ``trials`` samples of every grid combination."""
    count = search.config.trials
    for domain in search.space.domains.values():
        if domain.kind == "grid":
            count *= len(domain.values)
    return count


def concurrent_trials(cfg: TuneConfig, cpus: float, gpus: float, trials: int, local: bool) -> int:
    """How many trials run at once: as many as the CPUs (and GPUs) hold, at most ``max_concurrent``.

    ``local``: ``cpus`` is this machine's cores, and the Ray about to start
    gets a logical CPU per trial for its data pipeline beside the workers
    (``ray_cpus``). Otherwise ``cpus`` is what a running Ray (a cluster, or
    one started earlier) has, and each trial's data pipeline needs one of them.

    Raises:
        ConfigError: locally, ``max_concurrent`` trials whose workers need more CPUs (GPUs) than there are.
    """
    per_trial = cfg.workers_per_trial * cfg.cpus_per_worker
    fit = int(cpus // (per_trial if local else per_trial + DATA_PIPELINE_CPUS))
    if cfg.gpu:
        fit = min(fit, int(gpus // cfg.workers_per_trial))
    fit = max(1, fit)
    if cfg.max_concurrent is not None:
        if local and cfg.max_concurrent > fit:
            raise ConfigError(
                f"max_concurrent {cfg.max_concurrent}: trials of {cfg.workers_per_trial} worker(s) x {cfg.cpus_per_worker} CPU(s) "
                f"{'and 1 GPU ' if cfg.gpu else ''}each, this machine holds {fit} at once "
                f"({cpus:g} CPUs{f', {gpus:g} GPUs' if cfg.gpu else ''}); lower `max_concurrent` or `workers_per_trial`",
                field="max_concurrent",
            )
        fit = cfg.max_concurrent
    return max(1, min(fit, trials))


def ray_cpus(cfg: TuneConfig, concurrent: int) -> int:
    """Logical CPUs for a local Ray: every concurrent trial's workers, plus a CPU for its data pipeline."""
    return math.ceil(concurrent * (cfg.workers_per_trial * cfg.cpus_per_worker + DATA_PIPELINE_CPUS + TRIAL_DRIVER_CPUS))


def trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def run(search: Search, concurrent: int):
    """Runs (or resumes) the search on the Ray this process is connected to; writes and returns its results.

    Args:
        concurrent: trials at once (``concurrent_trials``); a resumed search keeps its own.

    Returns:
        ``TuneResult``: the trials table, the best trial, the seconds this driver searched.
    """
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from segray.tuning.report import TrialLines
    from segray.tuning.results import TuneResult, trial_rows, write_outputs
    from segray.tuning.scheduler import PersistentASHA, stopped_early
    from segray.tuning.trial import run_trial

    cfg = search.config
    fs, path = storage.filesystem(cfg.storage)
    parent = start_search_run(search.uri, cfg.to_dict(), cfg.mlflow, cfg.mlflow_experiment)
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=search.base, plan=search.plan, tracking_tags=trial_tags(parent)),
                                    {"cpu": TRIAL_DRIVER_CPUS})
    if cfg.resume:
        tuner = tune.Tuner.restore(
            storage.filesystem(search.uri)[1], trainable=trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=fs
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search.space.param_space(),
            tune_config=tune.TuneConfig(
                num_samples=cfg.trials,
                scheduler=PersistentASHA.for_search(cfg, search.uri, search.objective.metric),
                # The limit goes to the generator itself: Tune ignores TuneConfig's
                # max_concurrent_trials when given a generator of its own.
                search_alg=BasicVariantGenerator(random_state=cfg.seed, max_concurrent=concurrent),
                time_budget_s=cfg.time_budget,
                trial_dirname_creator=trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=cfg.name, storage_path=path, storage_filesystem=fs, verbose=0, callbacks=[TrialLines(cfg.epochs, trial_count(search), search.objective)]
            ),
        )
    started = time.time()
    try:
        grid = tuner.fit()
    except Exception:
        finish_search_run(search.uri, parent, None, "FAILED")
        raise
    seconds = time.time() - started
    table, curve = trial_rows(grid, storage.join(search.uri, SEARCH_RUNS_DIR), stopped_early(search.uri), search.objective)
    best = write_outputs(search.uri, table, curve, search.objective)
    finish_search_run(search.uri, parent, best, "FINISHED")
    return TuneResult(search.uri, table, best, seconds, search.objective)
