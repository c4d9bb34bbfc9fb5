"""segray tune: search spaces refused before any trial, and a real search on Ray Tune killed and resumed.

The search runs as ``segray tune`` in driver processes of their own, each
starting its own Ray at this machine's real core count (as a user's command
does), so a search that would hang on 2 cores hangs here too.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import yaml

from segray import storage
from segray.cli import main as cli_main
from segray.config import ConfigError, IngestConfig, PredictConfig, TuneConfig
from segray.data import ingest, synthesize
from segray.tuning.search import concurrent_trials, ray_cpus
from segray.tuning.space import DEFAULT_SPACE, check_space, parse_space, trial_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EPOCHS = 3
GOOD_LRS, BAD_LR = (0.01, 0.02), 10.0
# Tiny U-Nets on 32x32 shapes; one arm (lr 10) clearly worse than the others. Batch 4 (18
# steps an epoch) so that the good arms' batch-norm statistics have settled by ASHA's first
# rung: at batch 8 their first-epoch val mIoU (0.15, 0.21) was no better than the diverged
# arm's all-background 0.21, and ASHA rightly kept it.
SPACE = {"lr": {"grid": [*GOOD_LRS, BAD_LR]}, "model": "unet", "depth": 2, "width": 8, "batch_size": 4, "schedule": "constant"}


# --- the space, checked before any trial (no Ray) ---------------------------------------------


@pytest.mark.parametrize(
    "space, key",
    [
        ({"model": {"choice": ["unet", "transformer"]}}, "`model`"),
        ({"lr": {"loguniform": [1e-4, 1e-2]}, "widht": 16}, "`widht`"),
        ({"model": {"choice": ["unet", "deeplabv3plus"]}, "depth": {"choice": [2, 3]}}, "`depth`"),
        ({"loss": {"choice": ["ce", "focal"]}}, "`loss`"),
        ({"lr": {"uniform": [-1.0, 0.1]}}, "`lr`"),
        ({"lr": {"normal": [0.0, 1.0]}}, "`lr`"),
        ({"workers": 4}, "`workers`"),
        ({"class_weights": {"choice": ["none", "sometimes"]}}, "`class_weights`"),
    ],
)
def test_a_bad_space_is_refused_before_any_trial_naming_the_key(tmp_path, capsys, space, key):
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    code = cli_main(["tune", "--data", str(tmp_path / "no-such-data"), "--storage", str(tmp_path / "searches"), "--name", "s",
                     "--search-space", str(tmp_path / "space.yaml")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"segray tune: error: --search-space {tmp_path / 'space.yaml'}: " in err and key in err, err
    assert not (tmp_path / "searches").exists()


def test_the_default_space_passes_its_own_checks(tmp_path):
    space = parse_space(DEFAULT_SPACE, "(default)")
    check_space(space, {"data": str(tmp_path), "storage": str(tmp_path), "name": "t", "workers": 1, "epochs": 2})
    assert {"lr", "loss", "class_weights", "model", "width", "augment_strength"} <= set(space.domains)


def test_trial_config_puts_model_options_beneath_the_model_and_accepts_numpy_samples(tmp_path):
    base = {"data": str(tmp_path), "storage": str(tmp_path), "name": "t", "workers": 1, "epochs": 2, "model_options": {"depth": 3}}
    cfg = trial_config(base, {"lr": np.float64(0.003), "width": np.int64(16), "model": "segnet", "batch_size": np.int64(4)})
    assert cfg.model == "segnet" and cfg.lr == 0.003 and cfg.batch_size == 4 and type(cfg.batch_size) is int
    assert cfg.model_options == {"depth": 3, "width": 16}
    with pytest.raises(ConfigError, match="loss"):
        trial_config(base, {"loss": "focal"})


def test_trials_at_once_fit_the_cores():
    cfg = TuneConfig(data="d", storage="s", name="n", workers_per_trial=1)
    # 2 cores, 1 worker of 1 CPU per trial: 2 trials at once, each with a CPU for its data pipeline.
    assert concurrent_trials(cfg, cpus=2, gpus=0, trials=8, local=True) == 2
    assert ray_cpus(cfg, 2) >= 2 * (1 + 1)
    assert concurrent_trials(cfg, cpus=2, gpus=0, trials=1, local=True) == 1
    assert concurrent_trials(TuneConfig(data="d", storage="s", name="n", workers_per_trial=2), cpus=2, gpus=0, trials=8, local=True) == 1
    with pytest.raises(ConfigError, match="max_concurrent 3") as e:
        concurrent_trials(TuneConfig(data="d", storage="s", name="n", max_concurrent=3), cpus=2, gpus=0, trials=8, local=True)
    assert e.value.field == "max_concurrent"
    # A cluster: the data pipelines need real CPUs there.
    assert concurrent_trials(cfg, cpus=8, gpus=0, trials=8, local=False) == 4


# --- a search killed mid-way and resumed ------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("shapes")
    synthesize(str(root / "raw"), n=96, size=(32, 32), num_classes=4, seed=0, show_progress=False)
    return ingest(IngestConfig(source=str(root / "raw"), destination=str(root / "ds"), val_fraction=0.25))


def tune_command(data: str, searches: str, space_file: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "segray.cli", "tune", "--data", data, "--storage", searches, "--name", "s",
        "--search-space", space_file, "--trials", "1", "--epochs", str(EPOCHS), "--grace-epochs", "1",
        "--reduction-factor", "2", "--seed", "0", *extra,
    ]


def finished_trials(uri: str) -> set[str]:
    """Trials Tune's saved experiment state holds as TERMINATED (what a resumed search will not run again)."""
    done = set()
    for path in glob.glob(os.path.join(uri, "experiment_state-*.json")):
        try:
            with open(path) as f:
                state = json.load(f)
        except (OSError, ValueError):
            continue  # being rewritten
        for trial_json, _ in state.get("trial_data", []):
            trial = json.loads(trial_json)
            if trial.get("status") == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def run_snapshot(run_uri: str) -> dict:
    """What a trial's run holds that redoing it would change: its history's bytes and time, its checkpoints."""
    history = os.path.join(run_uri, "history.parquet")
    checkpoints = sorted(d for d in os.listdir(run_uri) if d.startswith("checkpoint_") and not d.endswith(".json"))
    with open(history, "rb") as f:
        return {"history": f.read(), "mtime": os.stat(history).st_mtime_ns, "checkpoints": checkpoints}


@pytest.fixture(scope="module")
def search(shapes, tmp_path_factory):
    """One search of 3 trials (lr 0.01, 0.02, 10): its driver SIGKILLed after a trial finished, then resumed."""
    tmp = tmp_path_factory.mktemp("search")
    space_file, searches = str(tmp / "space.yaml"), str(tmp / "searches")
    (tmp / "space.yaml").write_text(yaml.safe_dump(SPACE))
    uri = os.path.join(searches, "s")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)  # the command's own quiet default, as a user gets it
    command = tune_command(shapes.dst, searches, space_file)
    t0 = time.time()
    with open(tmp / "first.log", "w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(tmp), start_new_session=True)
    try:
        deadline = time.time() + 600
        while not finished_trials(uri):
            assert driver.poll() is None, f"the driver ended ({driver.returncode}) before it was killed:\n{(tmp / 'first.log').read_text()[-4000:]}"
            assert time.time() < deadline, (tmp / "first.log").read_text()[-4000:]
            time.sleep(0.5)
        done = finished_trials(uri)
        before = {t: run_snapshot(os.path.join(uri, "runs", t)) for t in done}
        os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        killed_at = time.time() - t0
    finally:
        # The driver's Ray dies with it (Ray's fate sharing); anything of its session left is ended here.
        time.sleep(2)
        try:
            os.killpg(driver.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not os.path.exists(os.path.join(uri, "trials.parquet")), "the search ended before its driver was killed"
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, env=env, cwd=str(tmp), timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-4000:] + resumed.stderr[-4000:]
    return SimpleNamespace(
        uri=uri, data=shapes.dst, done=done, before=before, killed_at=killed_at, seconds=time.time() - t0,
        first_log=(tmp / "first.log").read_text(), resumed_log=resumed.stdout + resumed.stderr, tmp=tmp,
    )


def trials_table(uri: str) -> pd.DataFrame:
    return storage.read_parquet(storage.join(uri, "trials.parquet")).to_pandas()


@pytest.mark.slow
def test_resumed_search_finishes_without_redoing_finished_trials(search):
    table = trials_table(search.uri)
    assert len(table) == 3 and set(table["status"]) == {"TERMINATED"}, table
    assert sorted(table["param_lr"]) == sorted([*GOOD_LRS, BAD_LR])
    for trial_id, before in search.before.items():
        after = run_snapshot(os.path.join(search.uri, "runs", trial_id))
        assert after == before, f"trial {trial_id} finished before the kill and was trained again"
        assert f"trial {trial_id} started" not in search.resumed_log
    unfinished = set(table["trial_id"]) - search.done
    assert unfinished, "every trial had finished before the kill: nothing was resumed"
    for trial_id in unfinished:
        assert f"trial {trial_id} started" in search.resumed_log, search.resumed_log[-3000:]
    print(f"search of 3 trials: driver killed at {search.killed_at:.0f} s, resumed search done at {search.seconds:.0f} s")


@pytest.mark.slow
def test_asha_stops_the_clearly_worse_arm_early(search):
    table = trials_table(search.uri).set_index("param_lr")
    bad = table.loc[BAD_LR]
    assert bool(bad["stopped_early"]) and 1 <= bad["stopped_after"] < EPOCHS, table[["epochs", "stopped_early", "stopped_after", "best_val_miou"]]
    assert table["epochs"].max() == EPOCHS  # the best arm ran to the end
    assert bad["best_val_miou"] < table["best_val_miou"].max()
    # ASHA ends the trial from outside: its run has no end of its own, but exported through
    # the search it counts as ended (stopped early by ASHA), not as an unfinished run.
    from segray.export.card import training_state
    from segray.runs import run_state

    assert run_state(bad["run_uri"]).stopped is None
    through_search = training_state(search.uri, os.path.join(bad["run_uri"], "model", "model.keras"))
    assert through_search.finished and through_search.stopped == "asha", through_search
    for lr, row in table.iterrows():
        if not row["stopped_early"]:
            assert run_state(row["run_uri"]).stopped == "epochs", (lr, run_state(row["run_uri"]))


@pytest.mark.slow
def test_trials_table_and_best_json_agree_with_the_runs(search):
    table = trials_table(search.uri)
    best = json.loads(storage.read_text(storage.join(search.uri, "best.json")))
    top = table.loc[table["best_val_miou"].idxmax()]
    assert best["trial_id"] == top["trial_id"] and best["run_uri"] == top["run_uri"]
    assert best["val_miou"] == pytest.approx(top["best_val_miou"]) and best["val_mean_dice"] == pytest.approx(top["best_val_dice"])
    assert best["config"]["lr"] == best["params"]["lr"] == top["param_lr"]
    assert best["config"]["model_options"] == {"depth": 2, "width": 8} and best["config"]["workers"] == 1
    for row in table.itertuples():
        history = storage.read_parquet(storage.join(row.run_uri, "history.parquet")).to_pandas()
        saved = json.loads(storage.read_text(storage.join(row.run_uri, "model", "best.json")))
        # The row scores the trial's saved model (what predict uses), an epoch of its history.
        assert row.best_val_miou == pytest.approx(saved["val_miou"]) and row.best_epoch == saved["epoch"]
        assert history.loc[history["epoch"] == row.best_epoch, "val_miou"].item() == pytest.approx(row.best_val_miou)
        assert row.epochs == len(history)
        if not row.stopped_early:
            assert row.best_val_miou == pytest.approx(history["val_miou"].max())
    assert storage.read_bytes(storage.join(search.uri, "search.png")).startswith(b"\x89PNG")


@pytest.mark.slow
def test_two_cores_run_at_most_two_trials_at_once(search):
    if (os.cpu_count() or 1) != 2:
        pytest.skip("the limit under test is the one of a 2-core machine")
    table = trials_table(search.uri)
    assert table["started"].notna().all() and table["ended"].notna().all(), table[["trial_id", "started", "ended"]]
    events = sorted([(t, 1) for t in table["started"]] + [(t, -1) for t in table["ended"]], key=lambda e: (e[0], e[1]))
    running, most = 0, 0
    for _, step in events:
        running += step
        most = max(most, running)
    assert most <= 2, table[["trial_id", "started", "ended"]]


@pytest.mark.slow
def test_predict_with_the_search_uses_the_best_trial(search, tmp_path):
    import segray

    best = json.loads(storage.read_text(storage.join(search.uri, "best.json")))
    result = segray.predict(PredictConfig(model=search.uri, input=search.data, split="val", output=str(tmp_path / "pred"), overlays=0))
    assert result.summary["model"].startswith(best["run_uri"])
    # The best model, not a worse trial's: predict scores it as training's validation did.
    assert result.summary["miou"] == pytest.approx(best["val_miou"], abs=0.02)

