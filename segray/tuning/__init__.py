"""Hyperparameter search on Ray Tune: each trial a segray training run, poor trials stopped by ASHA.

``segray.tune`` (the API call) checks the space before Ray starts, runs the
search (``search.run``) and writes ``trials.parquet``, ``best.json`` and
``search.png`` under ``STORAGE/NAME`` (``results``). The search space
(``space``) is a YAML mapping of TrainConfig fields to values or domains.
"""

from segray.tuning.results import BEST_FILE, TuneResult, read_best
from segray.tuning.space import DEFAULT_SPACE, SearchSpace, load_space, trial_config

__all__ = ["BEST_FILE", "DEFAULT_SPACE", "SearchSpace", "TuneResult", "load_space", "read_best", "trial_config"]
