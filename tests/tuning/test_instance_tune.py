"""segray tune on an instance dataset: the objective is val mask AP50 (maximised), not mIoU; a 2-trial, 1-epoch tiny maskrcnn search."""

from __future__ import annotations

import json
import os
import time

import pandas as pd
import pytest
import yaml

from segray import models, storage
from segray.cli import main as cli_main
from segray.config import TuneConfig
from segray.tuning.objective import INSTANCE, SEMANTIC, dataset_objective, objective_for

pytestmark = pytest.mark.usefixtures("ray_cluster")


@pytest.fixture(scope="module")
def instance_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("insttune")
    raw, data = str(root / "raw"), str(root / "data")
    assert cli_main(["synth", raw, "--task", "instance", "--n", "8", "--size", "64", "--classes", "3"]) == 0
    assert cli_main(["ingest", raw, data, "--task", "instance", "--val-fraction", "0.25"]) == 0
    return root, data


def test_the_objective_follows_the_task(instance_data, tmp_path):
    _, data = instance_data
    assert dataset_objective(data) == INSTANCE and INSTANCE.metric == "val_ap50" and INSTANCE.column == "best_val_ap50"
    assert objective_for("semantic") == SEMANTIC and SEMANTIC.column == "best_val_miou" and SEMANTIC.second_column == "best_val_dice"
    raw, sem = str(tmp_path / "raw"), str(tmp_path / "sem")
    assert cli_main(["synth", raw, "--n", "4", "--size", "32", "--classes", "2"]) == 0
    assert cli_main(["ingest", raw, sem, "--val-fraction", "0.25"]) == 0
    assert dataset_objective(sem) == SEMANTIC


@pytest.mark.slow
def test_two_trial_maskrcnn_search_maximises_val_ap50(instance_data, capsys):
    from segray.api import tune

    root, data = instance_data
    space = {"lr": {"grid": [3e-3, 1e-3]}, "model": "maskrcnn", "model_options": dict(models.spec("maskrcnn").tiny_options),
             "batch_size": 2, "schedule": "constant", "optimizer": "adam", "size": [64, 64]}
    space_file = root / "space.yaml"
    space_file.write_text(yaml.safe_dump(json.loads(json.dumps(space))))
    t0 = time.time()
    result = tune(TuneConfig(data=data, storage=str(root / "searches"), name="s", search_space=str(space_file), trials=1, epochs=1,
                             grace_epochs=1, seed=0))
    seconds = time.time() - t0
    out = capsys.readouterr().out
    table = result.trials
    assert result.objective == INSTANCE and len(table) == 2 and (table.status == "TERMINATED").all(), table
    assert {"best_val_ap50", "best_val_pq"} <= set(table.columns) and "best_val_miou" not in table.columns
    for row in table.itertuples():
        saved = json.loads(storage.read_text(os.path.join(row.run_uri, "model", "best.json")))
        assert row.best_val_ap50 == pytest.approx(saved["val_ap50"]) and row.best_val_pq == pytest.approx(saved["val_pq"], nan_ok=True)
        assert 0.0 <= row.best_val_ap50 <= 1.0
    best = json.loads(storage.read_text(os.path.join(result.uri, "best.json")))
    top = table.loc[table.best_val_ap50.idxmax()]
    assert best["objective"] == "val_ap50" and best["trial_id"] == top.trial_id and best["val_ap50"] == pytest.approx(top.best_val_ap50)
    assert best["config"]["model"] == "maskrcnn"
    # The driver's lines and the summary name the objective; the plot was drawn from the AP50 curves.
    assert "val mask AP50" in out and "val mIoU" not in out
    assert "val mask AP50" in result.describe()
    assert storage.read_bytes(os.path.join(result.uri, "search.png")).startswith(b"\x89PNG")
    trials = pd.read_parquet(os.path.join(result.uri, "trials.parquet"))
    assert list(trials.best_val_ap50) == list(table.best_val_ap50)
    print(f"2-trial 1-epoch maskrcnn search: {seconds:.1f} s; AP50 {table.best_val_ap50.tolist()}")
