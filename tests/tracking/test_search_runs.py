"""`segray tune --mlflow` on a real MLflow server: one parent run per search, one nested run per trial, the best tagged.

A tiny search (two trials of a 2-epoch U-Net on 32x32 shapes, never stopped
by ASHA) through the command line, in this module's Ray; then the same
command again with ``--resume``, which must go on in the same parent run.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from segray import storage
from segray.cli import main as cli_main
from segray.config import IngestConfig
from segray.data import ingest, synthesize
from segray.runs import read_history
from segray.tracking import read_run_record

pytestmark = pytest.mark.slow
EXPERIMENT = "segray-search-tests"
EPOCHS = 2
SPACE = {"lr": {"grid": [0.01, 0.02]}, "model": "unet", "depth": 2, "width": 8, "batch_size": 4, "schedule": "constant"}


def search_runs(client: MlflowClient, experiment_id: str) -> list:
    return client.search_runs([experiment_id], filter_string="tags.`segray.kind` = 'search'")


def trial_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> list:
    return client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


@pytest.fixture(scope="module")
def searched(tmp_path_factory, ray_cluster, mlflow_server):
    """The search run once to its end: ``(command, search URI)``."""
    root = tmp_path_factory.mktemp("search")
    synthesize(str(root / "raw"), n=12, size=(32, 32), num_classes=3, seed=0, show_progress=False)
    ingest(IngestConfig(source=str(root / "raw"), destination=str(root / "ds"), val_fraction=0.25))
    (root / "space.yaml").write_text(yaml.safe_dump(SPACE))
    command = ["tune", "--data", str(root / "ds"), "--storage", str(root / "searches"), "--name", "s",
               "--search-space", str(root / "space.yaml"), "--trials", "1", "--epochs", str(EPOCHS),
               "--grace-epochs", str(EPOCHS), "--seed", "0", "--mlflow", mlflow_server.uri, "--mlflow-experiment", EXPERIMENT]
    assert cli_main(command) == 0
    return command, str(root / "searches" / "s")


def test_a_search_is_one_parent_run_with_a_nested_run_per_trial_and_the_best_tagged(searched, mlflow_server):
    _, uri = searched
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    parents = search_runs(client, experiment_id)
    record = read_run_record(uri)
    assert [p.info.run_id for p in parents] == [record["run_id"]], parents
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.tags["segray.search_uri"] == uri

    table = storage.read_parquet(storage.join(uri, "trials.parquet")).to_pandas()
    best = json.loads(storage.read_text(storage.join(uri, "best.json")))
    assert len(table) == 2 and set(table["status"]) == {"TERMINATED"}, table
    trials = trial_runs(client, experiment_id, parent.info.run_id)
    by_run = {t.data.tags["segray.run_uri"]: t for t in trials}
    assert len(trials) == 2 and set(by_run) == set(table["run_uri"]), (sorted(by_run), list(table["run_uri"]))
    for run_uri, trial in by_run.items():
        assert trial.info.status == "FINISHED", run_uri
        assert trial.info.run_id == read_run_record(run_uri)["run_id"]
        history = read_history(run_uri)
        assert list(history["epoch"]) == list(range(EPOCHS))
        logged = sorted((m.step, m.value) for m in client.get_metric_history(trial.info.run_id, "val_miou"))
        expected = [(int(e), float(v)) for e, v in zip(history["epoch"], history["val_miou"]) if np.isfinite(v)]
        assert logged == pytest.approx(expected), run_uri
        assert (trial.data.tags.get("segray.best_trial") == "true") == (run_uri == best["run_uri"]), run_uri
    best_run = by_run[best["run_uri"]]
    assert parent.data.tags["segray.best_trial_run_id"] == best_run.info.run_id
    assert parent.data.tags["segray.best_run_uri"] == best["run_uri"]
    assert parent.data.metrics["best_val_miou"] == pytest.approx(best["val_miou"])


def test_a_resumed_search_goes_on_in_the_same_parent_run(searched, mlflow_server):
    command, uri = searched
    client = MlflowClient(mlflow_server.uri)
    experiment_id = client.get_experiment_by_name(EXPERIMENT).experiment_id
    first = read_run_record(uri)["run_id"]
    trials_before = {t.info.run_id for t in trial_runs(client, experiment_id, first)}

    assert cli_main([*command, "--resume"]) == 0
    assert read_run_record(uri)["run_id"] == first
    assert [p.info.run_id for p in search_runs(client, experiment_id)] == [first]
    assert client.get_run(first).info.status == "FINISHED"
    # The finished trials are not run again: no new trial run under the parent.
    assert {t.info.run_id for t in trial_runs(client, experiment_id, first)} == trials_before
