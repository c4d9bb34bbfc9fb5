"""Training across nodes: `ray.cluster_utils.Cluster` fakes a head and worker nodes on this machine.

The head has 1 CPU (for Ray Data's tasks) and each worker node 2 CPUs plus a
resource naming it. A Ray Train worker asks for 2 CPUs, so no node can hold
two workers and the head none: a run with 2 workers must span the two worker
nodes. Losing one of them mid-run must cost a restart from the last
checkpoint, not the run.

The Cluster writes its address to `<temp dir>/ray_current_cluster`, which a
bare `ray.init()` of any process on the machine would join; this module
points RAY_TMPDIR at a private dir while its Cluster lives, so that other
sessions' Ray never sees it. A Cluster and the module-scoped `ray_cluster`
fixture of other modules cannot live in one process at once: this module has
its own fixture and never uses that one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from segray import storage
from segray.config import IngestConfig, TrainConfig
from segray.data import ingest, synthesize
from segray.training import train
from tests.cluster.cluster_helpers import free_port, our_pids, stop_processes
from tests.training.test_training import config as train_config

pytestmark = pytest.mark.slow

NODE_START_TIMEOUT_S = 120
TRAIN_TIMEOUT_S = 900
RECOVERY_TIMEOUT_S = 1500


@dataclass
class MultiNode:
    cluster: Any  # ray.cluster_utils.Cluster
    nodes: dict[str, Any]  # name -> ray._private.node.Node of a worker node
    dashboard_url: str  # for the state API (list_actors)
    data: str = ""  # the ingested tiny dataset

    def add_node(self, name: str):
        node = self.cluster.add_node(num_cpus=2, resources={name: 1}, object_store_memory=100 * 1024 * 1024)
        self.cluster.wait_for_nodes(timeout=NODE_START_TIMEOUT_S)
        self.nodes[name] = node
        return node

    def name_of(self, node_id: str) -> str:
        return next((name for name, node in self.nodes.items() if node.node_id == node_id), f"head or unknown node {node_id[:8]}")


@pytest.fixture(scope="module")
def multinode(tmp_path_factory):
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    temp_dir = Path(tempfile.mkdtemp(prefix="sgr-", dir="/tmp"))
    # No usage reports: Ray Data's usage poller otherwise keeps asking a
    # Prometheus on localhost:9090 and logs tracebacks at interpreter exit.
    env = {"RAY_TMPDIR": str(temp_dir), "RAY_USAGE_STATS_ENABLED": "0"}
    old_env = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    cluster = None
    try:
        dashboard_port = free_port()
        cluster = Cluster(
            initialize_head=True,
            head_node_args={
                "num_cpus": 1,
                "object_store_memory": 150 * 1024 * 1024,
                # list_actors goes through the dashboard's state API.
                "include_dashboard": True,
                "dashboard_host": "127.0.0.1",
                "dashboard_port": dashboard_port,
                "dashboard_agent_listen_port": free_port(),
            },
        )
        multinode = MultiNode(cluster, {}, f"http://127.0.0.1:{dashboard_port}")
        for name in ("node_a", "node_b"):
            multinode.add_node(name)
        ray.init(address=cluster.address, log_to_driver=False)

        root = tmp_path_factory.mktemp("multinode")
        synthesize(str(root / "raw"), n=64, size=(32, 32), num_classes=4, seed=0, show_progress=False)
        multinode.data = ingest(IngestConfig(source=str(root / "raw"), destination=str(root / "ds"), val_fraction=0.25)).dst
        yield multinode
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        for k, v in old_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        # What Cluster.shutdown missed (workers of removed nodes): only
        # processes that name this module's temp dir, never a broad kill.
        stop_processes(-1, marker=str(temp_dir))
        leftover = our_pids(-1, str(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"processes of the multi-node cluster still alive: {leftover}"


def config(data: str, runs: str, name: str, **overrides) -> TrainConfig:
    """tests/training's tiny U-Net run, with workers of 2 CPUs: one per worker node."""
    return train_config(data, runs, name, **{"epochs": 2, "batch_size": 4, "cpus_per_worker": 2, **overrides})


def train_bounded(cfg: TrainConfig, timeout_s: float, diagnostics: Callable[[], str]):
    """`train(cfg)` in a thread; fails the test after timeout_s instead of hanging.

    A run left behind ends with the module's cluster at teardown.
    """
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = train(cfg)
        except BaseException as e:  # noqa: BLE001  (re-raised in the test's thread)
            outcome["error"] = e

    thread = threading.Thread(target=run, name=f"train-{cfg.name}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        pytest.fail(f"training {cfg.name} did not finish within {timeout_s} s\n{diagnostics()}")
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def train_workers(multinode: MultiNode, exclude: set[str] = frozenset(), state: str | None = None) -> list:
    """RayTrainWorker actors (alive and dead) but those in `exclude`."""
    from ray.util.state import list_actors

    filters = [("class_name", "=", "RayTrainWorker")]
    if state:
        filters.append(("state", "=", state))
    # The address is explicit: found by itself, it would be any Ray on the machine.
    actors = list_actors(address=multinode.dashboard_url, filters=filters, limit=10_000, raise_on_missing_output=False)
    return [a for a in actors if a.actor_id not in exclude]


def placement(multinode: MultiNode, workers: list) -> str:
    """Where the workers ran and how they ended, for failure messages."""
    import ray

    nodes = {n["NodeID"]: ("alive" if n["Alive"] else "dead") for n in ray.nodes()}
    return "; ".join(
        f"{w.actor_id[:8]} {w.state} on {multinode.name_of(w.node_id)} ({nodes.get(w.node_id, '?')})" for w in workers
    )


def read_history(run_dir: Path):
    """history.parquet as rank 0 last wrote it, or None while it is absent or half-written."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(run_dir / "history.parquet").to_pandas()
    except Exception:  # noqa: BLE001  (absent, or caught mid-write: try again later)
        return None


def test_two_workers_run_on_two_nodes(multinode: MultiNode, tmp_path: Path) -> None:
    before = {a.actor_id for a in train_workers(multinode)}
    cfg = config(multinode.data, str(tmp_path / "runs"), "spread", epochs=1)
    result = train_bounded(cfg, TRAIN_TIMEOUT_S, lambda: placement(multinode, train_workers(multinode, before)))
    assert list(result.history["epoch"]) == [0], result.history

    workers = train_workers(multinode, before)
    assert len(workers) == 2, placement(multinode, workers)
    expected = {multinode.nodes["node_a"].node_id, multinode.nodes["node_b"].node_id}
    assert {w.node_id for w in workers} == expected, placement(multinode, workers)


def test_losing_a_node_mid_run_resumes_from_the_checkpoint(multinode: MultiNode, tmp_path: Path) -> None:
    import ray

    # The replacement is there before the loss, as a warm spare: the run must
    # not wait for a node to start, and it can only go on with it.
    multinode.add_node("node_c")
    runs = tmp_path / "runs"
    run_dir = runs / "lose"
    before = {a.actor_id for a in train_workers(multinode)}
    removal: dict[str, Any] = {}
    failures: list[str] = []
    finished = threading.Event()

    def remove_a_worker_node() -> None:
        try:
            first_group: list = []
            while not removal and not finished.is_set():
                if len(first_group) < 2:
                    first_group = train_workers(multinode, before, state="ALIVE")
                history = read_history(run_dir)
                checkpoints = list(run_dir.glob("checkpoint_*")) if run_dir.exists() else []
                # Two epochs written: the first epoch's report (with its
                # checkpoint) returned a whole epoch ago, so Ray Train holds it.
                if len(first_group) == 2 and checkpoints and history is not None and len(history) >= 2:
                    hosts = {w.node_id for w in first_group}
                    node = next(n for n in multinode.cluster.worker_nodes if n.node_id in hosts)
                    removal.update(
                        node_id=node.node_id,
                        first_group={w.actor_id for w in first_group},
                        remaining={n.node_id for n in multinode.cluster.worker_nodes} - {node.node_id},
                        history=history,
                    )
                    started = time.monotonic()
                    multinode.cluster.remove_node(node)
                    removal.update(at=time.monotonic(), removal_seconds=time.monotonic() - started)
                    return
                time.sleep(0.3)
        except Exception as e:  # noqa: BLE001  (reported by the test)
            failures.append(repr(e))

    remover = threading.Thread(target=remove_a_worker_node, name="remove-node", daemon=True)
    remover.start()
    cfg = config(multinode.data, str(runs), "lose", epochs=4, max_failures=2)
    try:
        result = train_bounded(cfg, RECOVERY_TIMEOUT_S, lambda: f"removal: {removal}\n{placement(multinode, train_workers(multinode, before))}")
    finally:
        finished.set()
        remover.join(timeout=120)
    assert not failures, failures
    assert removal, f"training ended before a worker node could be removed: no recovery was exercised\n{result.history}"
    # Shown with -s or when a test fails: how much room the removal had.
    print(
        f"node removed in {removal['removal_seconds']:.1f} s, {time.monotonic() - removal['at']:.0f} s before the run ended; "
        f"epochs took {list(result.history['seconds'].round(1))} s"
    )

    # Every epoch exactly once, and the first epoch is the one in the
    # checkpoint (same loss, same wall time), not trained a second time.
    history = storage.read_parquet(storage.join(str(run_dir), "history.parquet")).to_pandas()
    assert list(history["epoch"]) == [0, 1, 2, 3], history
    carried = removal["history"].iloc[0]
    assert history.iloc[0]["train_loss"] == carried["train_loss"], (history, removal["history"])
    assert history.iloc[0]["seconds"] == carried["seconds"], (history, removal["history"])

    # The first group spanned the lost node; the workers started after the
    # loss ran on the two worker nodes left (the survivor and the spare).
    workers = train_workers(multinode, before)
    where = placement(multinode, workers)
    lost = removal["node_id"]
    first_nodes = [w.node_id for w in workers if w.actor_id in removal["first_group"]]
    assert len(set(first_nodes)) == 2 and lost in first_nodes, where
    later = [w for w in workers if w.actor_id not in removal["first_group"]]
    assert len(later) >= 2, where
    assert {w.node_id for w in later} == removal["remaining"], where
    assert not next(n for n in ray.nodes() if n["NodeID"] == lost)["Alive"], where
