"""The saved-run contract: what a training run and a search leave in storage, and resolving RUN to a model.

Writers (training, tuning) and readers (predict, export, serve, report,
resume) import these names; nothing else spells a run's file names.

- ``layout``: the names of a run's files and folders (``config.json``,
  ``plan.json``, ``history.parquet``, ``ended.json``, ``model/``, the
  checkpoints' files, a search's ``best.json``);
- ``record``: reading and writing a run's config, plan, history and end,
  and ``run_state`` (how far it got);
- ``checkpoint``: what each Ray Train checkpoint holds (``save_state``, ``load_state``);
- ``model``: ``RUN/model/`` (``write_model``, ``locate``, ``load_model``, ``Preprocessing``);
- ``resolve``: MODEL or RUN -> a ``ModelSpec`` for predict, export and serve.

It sits above ``segray.models`` (which builds models and knows nothing of runs).
"""

from segray.runs.checkpoint import load_state, save_state
from segray.runs.layout import (
    BEST_FILE,
    CONFIG_FILE,
    CURVES_FILE,
    END_FILE,
    HISTORY_FILE,
    MODEL_DIR,
    MODEL_FILE,
    PLAN_FILE,
    PREPROCESSING_FILE,
    SEARCH_BEST_FILE,
    SEARCH_RUNS_DIR,
    TENSORBOARD_DIR,
    TRIALS_FILE,
)
from segray.runs.model import Preprocessing, class_list, load_keras, load_model, locate, read_preprocessing, write_model
from segray.runs.record import (
    FINISHED,
    STOP_REASONS,
    RunState,
    clear_end,
    has_history,
    read_config,
    read_history,
    run_exists,
    run_state,
    write_config,
    write_end,
    write_history,
    write_plan,
)
from segray.runs.resolve import ModelSpec, required_multiple, resolve_model, share_gpus, weights_id

__all__ = [
    "BEST_FILE",
    "CONFIG_FILE",
    "CURVES_FILE",
    "END_FILE",
    "FINISHED",
    "HISTORY_FILE",
    "MODEL_DIR",
    "MODEL_FILE",
    "PLAN_FILE",
    "PREPROCESSING_FILE",
    "SEARCH_BEST_FILE",
    "SEARCH_RUNS_DIR",
    "STOP_REASONS",
    "TENSORBOARD_DIR",
    "TRIALS_FILE",
    "ModelSpec",
    "Preprocessing",
    "RunState",
    "class_list",
    "clear_end",
    "has_history",
    "load_keras",
    "load_model",
    "load_state",
    "locate",
    "read_config",
    "read_history",
    "read_preprocessing",
    "required_multiple",
    "resolve_model",
    "run_exists",
    "run_state",
    "save_state",
    "share_gpus",
    "weights_id",
    "write_config",
    "write_end",
    "write_history",
    "write_model",
    "write_plan",
]
