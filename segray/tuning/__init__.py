"""Hyperparameter search on Ray Tune: each trial a segray training run, poor trials stopped by ASHA.

``segray.tune`` (the API call) checks the space before Ray starts, runs the
search (``search.run``) and writes ``trials.parquet``, ``best.json`` and
``search.png`` under ``STORAGE/NAME`` (``results``). The search space
(``space``) is a YAML mapping of TrainConfig fields to values or domains.
"""

from segray.tuning.results import TuneResult, read_best, trial_end
from segray.tuning.search import Search, concurrent_trials, prepare, ray_cpus, run, trial_count
from segray.tuning.space import DEFAULT_SPACE, SearchSpace, load_space, trial_config

__all__ = [
    "DEFAULT_SPACE",
    "Search",
    "SearchSpace",
    "TuneResult",
    "concurrent_trials",
    "load_space",
    "prepare",
    "ray_cpus",
    "read_best",
    "run",
    "trial_config",
    "trial_count",
    "trial_end",
]
