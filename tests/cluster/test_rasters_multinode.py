"""Chunked raster predict across two nodes (issue 28): both nodes do chunks, one is killed mid-run, the rerun finishes.

`ray.cluster_utils.Cluster` fakes a head with no CPUs and two worker nodes of
2 CPUs each on this machine. Ray Data spreads its actor pool over the nodes
(its default scheduling is SPREAD), so `workers=2` puts one chunk actor on
each node; each chunk record names the node and process that wrote it.

The killed run's driver is a subprocess joined to the cluster: once both
nodes have written chunks, one node is removed without grace (its raylet and
workers are SIGKILLed, possibly mid-chunk) and the driver is SIGKILLed. The
rerun, on the surviving node and a fresh one, skips the done chunks and does
the rest; its masks and tables equal a clean run's.

As test_multinode.py, this module points RAY_TMPDIR at a private dir while
its Cluster lives, and ends only processes that name that dir.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from segray import storage
from tests.cluster.cluster_helpers import REPO, our_pids, stop_processes
from tests.inference.helpers import write_run

pytestmark = pytest.mark.slow

NODE_START_TIMEOUT_S = 120
RUN_TIMEOUT_S = 400
SIDE, CHUNK = 768, 64  # 144 chunks: enough for the kill to land mid-run


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    temp_dir = Path(tempfile.mkdtemp(prefix="sgr-", dir="/tmp"))
    env = {"RAY_TMPDIR": str(temp_dir), "RAY_USAGE_STATS_ENABLED": "0"}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    c = None
    try:
        # No CPUs on the head: chunks run only on the worker nodes.
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": 100 * 1024 * 1024, "include_dashboard": False})
        nodes = {name: c.add_node(num_cpus=2, resources={name: 1}, object_store_memory=100 * 1024 * 1024) for name in ("node_a", "node_b")}
        c.wait_for_nodes(timeout=NODE_START_TIMEOUT_S)
        ray.init(address=c.address, log_to_driver=False)
        yield c, nodes
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        stop_processes(-1, marker=str(temp_dir))
        leftover = our_pids(-1, str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"processes of the raster cluster still alive: {leftover}"


def _config(run: str, images: str, truth: str, out: str) -> dict:
    return {"model": run, "input": images, "truth": truth, "output": out, "chunk": CHUNK, "tile": [32, 32], "overlap": 0.5,
            "batch_size": 16, "workers": 2}


def _records(out: str):
    from segray.inference import read_chunk_records

    return read_chunk_records(out).to_pandas()


def _tables(out: str) -> dict:
    """The run's tables, without the lineage columns that say which node and process did a chunk."""
    tables = {}
    for name in ("raster_chunks", "per_image", "per_class", "confusion"):
        frame = storage.read_parquet(os.path.join(out, f"{name}.parquet")).to_pandas()
        frame = frame.drop(columns=[c for c in ("node_id", "pid", "run") if c in frame.columns])
        sort = [c for c in ("image_id", "chunk_row", "chunk_col", "class_id", "true_id", "pred_id") if c in frame.columns]
        tables[name] = frame.sort_values(sort).reset_index(drop=True) if sort else frame
    return tables


def _mask(out: str) -> np.ndarray:
    from segray.data import open_raster

    return open_raster(os.path.join(out, "masks", f"synth_{SIDE}x{SIDE}.ome.zarr")).read(0, SIDE, 0, SIDE)[..., 0]


def _settled(out: str, quiet_s: float = 5.0, timeout_s: float = 120.0):
    """The chunk records once none has been added for ``quiet_s`` (the killed job's actors may finish a chunk while Ray ends them)."""
    records, since, deadline = _records(out), time.monotonic(), time.monotonic() + timeout_s
    while time.monotonic() - since < quiet_s and time.monotonic() < deadline:
        time.sleep(0.5)
        now = _records(out)
        if len(now) != len(records):
            records, since = now, time.monotonic()
    return records


def test_two_nodes_share_a_raster_and_a_killed_node_costs_only_its_unfinished_chunks(cluster, tmp_path):
    import pandas as pd
    import ray

    import segray
    from segray.config import PredictConfig
    from segray.data import write_synthetic_raster

    run = write_run(str(tmp_path / "run"), None, window=[32, 32])
    write_synthetic_raster(str(tmp_path / "syn"), SIDE, SIDE, num_classes=3, tile=64, show_progress=False)
    images, truth = str(tmp_path / "syn" / "images"), str(tmp_path / "syn" / "truth")
    total = (SIDE // CHUNK) ** 2
    cluster, nodes = cluster
    node_a, node_b = nodes["node_a"], nodes["node_b"]
    workers = {node_a.node_id: "node_a", node_b.node_id: "node_b"}

    # A clean run: both nodes predict chunks of the one raster.
    clean = str(tmp_path / "clean")
    result = segray.predict(PredictConfig(**_config(run, images, truth, clean)))
    assert result.summary["chunks"] == total and result.summary["chunks_this_run"] == total
    records = _records(clean)
    by_node = records.groupby("node_id").size().to_dict()
    assert set(by_node) == set(workers), f"chunks per node {by_node}, worker nodes {workers}"
    chunks = storage.read_parquet(os.path.join(clean, "raster_chunks.parquet")).to_pandas()
    assert set(chunks["node_id"]) == set(workers) and chunks["pid"].nunique() == 2

    # The same run, its driver in a subprocess; node_b is killed once both nodes have written chunks.
    out = str(tmp_path / "killed")
    script = (
        "import json, sys, ray, segray\n"
        "from segray.config import PredictConfig\n"
        f"ray.init(address={cluster.address!r}, log_to_driver=False)\n"
        "segray.predict(PredictConfig(**json.loads(sys.argv[1])))\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = open(tmp_path / "driver.log", "w")
    driver = subprocess.Popen([sys.executable, "-c", script, json.dumps(_config(run, images, truth, out))], env=env, cwd=str(REPO),
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    seen: dict = {}
    try:
        while time.monotonic() < deadline and driver.poll() is None:
            done = _records(out) if os.path.exists(os.path.join(out, "_chunks")) else None
            if done is not None and len(done):
                seen = done.groupby("node_id").size().to_dict()
                if set(seen) == set(workers) and min(seen.values()) >= 3:
                    break
            time.sleep(0.2)
        assert driver.poll() is None, f"the run ended before a node could be killed (chunks per node {seen}): {(tmp_path / 'driver.log').read_text()[-3000:]}"
        assert set(seen) == set(workers), f"no chunk from both nodes within {RUN_TIMEOUT_S} s: {seen}\n{(tmp_path / 'driver.log').read_text()[-3000:]}"
        cluster.remove_node(node_b, allow_graceful=False)
    finally:
        # The whole job goes with it: its driver too (only the process this test started).
        if driver.poll() is None:
            os.kill(driver.pid, signal.SIGKILL)
        driver.wait(timeout=60)
        log.close()
    killed = _settled(out)
    assert 0 < len(killed) < total, f"{len(killed)} of {total} chunks done when node_b was killed: not mid-run"
    assert set(killed["node_id"]) == set(workers)

    # The rerun, on the survivor and a fresh node, does only the chunks without a record.
    node_c = cluster.add_node(num_cpus=2, resources={"node_c": 1}, object_store_memory=100 * 1024 * 1024)
    cluster.wait_for_nodes(timeout=NODE_START_TIMEOUT_S)
    again = segray.predict(PredictConfig(**_config(run, images, truth, out)))
    assert again.summary["chunks_this_run"] == total - len(killed), (again.summary["chunks_this_run"], len(killed), total)
    assert again.summary["errors"] == 0
    records = _records(out)
    # Exactly once: one record per chunk; the killed run's records are kept as they were.
    assert len(records) == total and not records.duplicated(["image_id", "chunk_row", "chunk_col"]).any()
    kept = records.merge(killed[["chunk_row", "chunk_col", "run", "pid"]], on=["chunk_row", "chunk_col"], suffixes=("", "_killed"))
    assert len(kept) == len(killed) and (kept["run"] == kept["run_killed"]).all() and (kept["pid"] == kept["pid_killed"]).all()
    later = records[~records.set_index(["chunk_row", "chunk_col"]).index.isin(killed.set_index(["chunk_row", "chunk_col"]).index)]
    assert set(later["node_id"]) <= {node_a.node_id, node_c.node_id}, f"rerun chunks on {set(later['node_id'])}; node_b was killed"
    assert not next(n for n in ray.nodes() if n["NodeID"] == node_b.node_id)["Alive"]

    # Masks and tables equal the clean run's.
    np.testing.assert_array_equal(_mask(out), _mask(clean))
    mine, theirs = _tables(out), _tables(clean)
    for name in theirs:
        pd.testing.assert_frame_equal(mine[name], theirs[name], obj=name)
    cluster.remove_node(node_c)
