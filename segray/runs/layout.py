"""The names of what a training run and a search leave in storage; nothing else spells them.

A training run, ``STORAGE/RUN``:

- ``config.json``: the resolved config and the dataset it trained on;
- ``plan.json``: the plan it followed (``segray plan``'s file, which lives
  as ``DATA/plan.json`` beside a dataset too), when it followed one;
- ``history.parquet`` (one row per epoch), ``curves.png``, ``tensorboard/``;
- ``ended.json``: how the run ended; a run without it is still training, or
  was killed;
- ``model/``: the best model by val mIoU: ``model.keras``,
  ``preprocessing.json`` (what a predictor needs besides the weights) and
  ``best.json`` (its epoch and that epoch's metrics);
- Ray Train's checkpoint folders, each holding ``weights.npz``,
  ``optimizer.npz`` and ``state.json`` (the loop's state), so a run resumes
  exactly.

A search of ``segray tune``, ``STORAGE/NAME``: ``runs/TRIAL`` (one training
run per trial), ``trials.parquet`` and ``best.json`` (its best trial, with
that trial's ``run_uri``).
"""

CONFIG_FILE = "config.json"
PLAN_FILE = "plan.json"
HISTORY_FILE = "history.parquet"
CURVES_FILE = "curves.png"
TENSORBOARD_DIR = "tensorboard"
END_FILE = "ended.json"

MODEL_DIR = "model"
MODEL_FILE = "model.keras"
PREPROCESSING_FILE = "preprocessing.json"
BEST_FILE = "best.json"

# Inside each Ray Train checkpoint folder.
WEIGHTS_FILE = "weights.npz"
OPTIMIZER_FILE = "optimizer.npz"
STATE_FILE = "state.json"

# A search (STORAGE/NAME) names its best trial's run in a file of the same name as a model's best.json.
SEARCH_BEST_FILE = BEST_FILE
SEARCH_RUNS_DIR = "runs"
TRIALS_FILE = "trials.parquet"
