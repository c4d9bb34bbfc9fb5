"""`segray plan` on real ingested datasets: the file, its validation, bad input, and `segray train` following it."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from segray import storage
from segray.cli import main as cli_main
from segray.config import ConfigError, IngestConfig
from segray.data import ingest, synthesize
from segray.planning import make_plan, plan_uri, read_plan
from segray.training import config_from
from segray.runs import run_state

TINY = ["--model-option", "depth=2", "--model-option", "width=8"]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("shapes")
    synthesize(str(root / "raw"), n=48, size=(32, 32), num_classes=3, seed=1, show_progress=False)
    # A fourth class declared in classes.json that no mask uses.
    classes = json.loads((root / "raw" / "classes.json").read_text())
    (root / "raw" / "classes.json").write_text(json.dumps([*classes, {"id": 3, "name": "never_drawn"}]))
    return ingest(IngestConfig(source=str(root / "raw"), destination=str(root / "ds"), val_fraction=0.25))


def test_plan_cli_writes_a_valid_plan_with_a_reason_per_choice_and_warns_of_an_empty_class(shapes, capsys, recwarn):
    assert cli_main(["plan", shapes.dst, "--time-budget", "2m"]) == 0
    out = capsys.readouterr().out
    assert "choice" in out and "foreground_oversample" in out and plan_uri(shapes.dst) in out
    plan = read_plan(plan_uri(shapes.dst))
    assert plan.time_budget == 120.0 and plan.choices["time_budget"].value == 120.0
    assert all(c.reason for c in plan.choices.values())
    assert plan.fingerprint.median_size == [32, 32] and plan.choices["crop"].value == [32, 32]
    assert [c.name for c in plan.fingerprint.classes if c.frequency == 0] == ["never_drawn"]
    assert any("never_drawn" in str(w.message) for w in recwarn.list), [str(w.message) for w in recwarn.list]


@pytest.mark.filterwarnings("ignore:.*never_drawn")
def test_a_hand_edited_plan_is_validated_like_a_config(shapes, tmp_path):
    data = str(tmp_path / "ds")
    shutil.copytree(shapes.dst, data)
    made = make_plan(data, 120.0)
    raw = made.to_dict()
    for entry, value, message in [
        ("batch_size", "four", "choices.batch_size: expected an integer, got 'four'"),
        ("foreground_oversample", 1.5, "foreground_oversample must be a share in [0, 1]"),
        ("oversample_classes", "often", "oversample_classes"),
        ("normalization", "percentile", "choices.normalization: expected one of ['zscore']"),
        ("learning_rate", 0.1, "choices.learning_rate: not a plan entry"),
    ]:
        edited = json.loads(json.dumps(raw))
        edited["choices"][entry] = {"value": value, "reason": "edited by hand"}
        storage.write_text(plan_uri(data), json.dumps(edited))
        with pytest.raises(ConfigError, match="plan.json") as info:
            config_from({"data": data, "storage": str(tmp_path / "runs"), "name": "r", "time_budget": 120.0})
        assert message in str(info.value)
    edited = json.loads(json.dumps(raw))
    edited["choices"]["lr"] = {"value": 0.5}
    storage.write_text(plan_uri(data), json.dumps(edited))
    with pytest.raises(ConfigError, match=r"choices.lr.reason is required"):
        read_plan(plan_uri(data))


@pytest.mark.filterwarnings("ignore:.*never_drawn")
def test_one_class_and_an_empty_train_split_are_refused_naming_them(shapes, tmp_path):
    one = str(tmp_path / "one")
    shutil.copytree(shapes.dst, one)
    info = json.loads(storage.read_text(os.path.join(one, "dataset.json")))
    info["classes"] = info["classes"][:1]
    info["pixel_counts"] = info["pixel_counts"][:1]
    info["pixel_frequency"] = dict(list(info["pixel_frequency"].items())[:1])
    info["num_classes"] = 1
    storage.write_text(os.path.join(one, "dataset.json"), json.dumps(info))
    with pytest.raises(ConfigError, match=r"only one class \(background\); segmentation needs at least 2"):
        make_plan(one)

    empty = str(tmp_path / "empty")
    shutil.copytree(shapes.dst, empty)
    shutil.rmtree(os.path.join(empty, "train"))
    with pytest.raises(ConfigError, match=r"the train split is empty"):
        make_plan(empty)


@pytest.mark.filterwarnings("ignore:.*never_drawn")
def test_train_follows_the_plan_a_given_flag_wins_and_is_recorded_and_the_budget_stops_it(shapes, tmp_path, capsys):
    data = str(tmp_path / "ds")
    shutil.copytree(shapes.dst, data)
    assert cli_main(["plan", data, "--time-budget", "12s"]) == 0
    plan = read_plan(plan_uri(data))
    assert plan.choices["batch_size"].value != 8 and plan.choices["lr"].value != 0.05
    # Given epochs say how long: the plan's budget is left out, and recorded as such.
    bounded = config_from({"data": data, "storage": str(tmp_path / "runs"), "name": "e", "epochs": 3})
    assert bounded.time_budget is None and "time_budget" in bounded.plan["left_out"] and bounded.epochs == 3

    runs = str(tmp_path / "runs")
    argv = ["train", "--data", data, "--storage", runs, "--name", "r", "--epochs", "10000", "--batch-size", "8", "--lr", "0.05",
            "--time-budget", "12s", "--workers", "1", *TINY]
    assert cli_main(argv) == 0
    out = capsys.readouterr().out
    assert "following the plan" in out, out[-2000:]
    saved = json.loads(storage.read_text(os.path.join(runs, "r", "config.json")))
    record = saved["plan"]
    assert saved["batch_size"] == 8 and saved["lr"] == 0.05 and saved["epochs"] == 10000 and saved["time_budget"] == 12.0
    assert record["source"] == plan_uri(data)
    assert record["overridden"]["batch_size"] == {"plan": plan.choices["batch_size"].value, "given": 8}
    assert record["overridden"]["lr"]["given"] == 0.05 and "model_options" in record["overridden"]
    # What no flag set comes from the plan.
    for name in ("loss", "schedule", "foreground_oversample", "augment_set", "crop"):
        assert saved[name] == plan.choices[name].value and name in record["applied"], name
    assert os.path.exists(os.path.join(runs, "r", "plan.json"))
    # Stopped on time: far fewer epochs than asked, and past the budget by less than
    # the first epoch (which holds the step's compilation): at most one step and the
    # last validation. The best model is written.
    history = storage.read_parquet(os.path.join(runs, "r", "history.parquet")).to_pandas()
    assert 1 <= len(history) < 10000 and history["seconds"].sum() <= 12 + history["seconds"].iloc[0], history[["epoch", "seconds"]]
    # Stopped by its budget is a normal end: recorded as such, so export takes the run.
    state = run_state(os.path.join(runs, "r"))
    assert state.finished and state.stopped == "time_budget" and state.epochs_done == len(history) and state.epochs == 10000
    assert os.path.exists(os.path.join(runs, "r", "model", "model.keras"))
