"""cluster/local-autoscaler.yaml on a real, fake multi-node Ray cluster.

`RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...` runs Ray's
autoscaler with the fake_multinode provider: every "worker node" it launches
is one more raylet on this machine. The head has no CPUs, so any CPU demand
must make the autoscaler add nodes, and the short idle timeout of the config
must make them go away again.

Token auth stays on: the cluster gets its own token file, and every process
that talks to it (drivers, `ray job submit`) gets RAY_AUTH_MODE=token and the
token's path in its environment. Drivers run in subprocesses because a
process reads RAY_AUTH_MODE once, when Ray loads its config, so the pytest
process (which may have run a local Ray already) cannot switch to this
cluster's token; a subprocess also keeps this cluster apart from the Ray of
other test modules.

Teardown ends only the processes this module started (see
`cluster_helpers`); `ray stop` would also end every other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.cluster_helpers import RAY_CLI, REPO, RUNTIME_ENV, HeadNode, free_port, running_head, start_head

pytestmark = pytest.mark.slow

CONFIG = REPO / "cluster" / "local-autoscaler.yaml"

START_TIMEOUT_S = 180
UP_TIMEOUT_S = 150
DOWN_TIMEOUT_S = 180
JOB_TIMEOUT_S = 300

# Runs as a separate driver: asks for two actors of 2 CPUs each (the head has
# none, a cpu.small node has 2), records where they landed, releases them and
# waits for the cluster to shrink back to its head. Prints one JSON line per
# phase.
SCALE_DRIVER = r"""
import json, sys, time
import ray

address, up_timeout, down_timeout = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
ray.init(address=address, log_to_driver=False, logging_level="ERROR")

def alive():
    return [
        {"id": n["NodeID"], "cpu": n["Resources"].get("CPU", 0.0),
         "head": "node:__internal_head__" in n["Resources"]}
        for n in ray.nodes() if n["Alive"]
    ]

def report(**fields):
    print(json.dumps(fields), flush=True)

report(phase="start", nodes=alive())

@ray.remote(num_cpus=2)
class Holder:
    def node_id(self):
        return ray.get_runtime_context().get_node_id()

start = time.monotonic()
holders = [Holder.remote() for _ in range(2)]
try:
    placed = ray.get([h.node_id.remote() for h in holders], timeout=up_timeout)
except ray.exceptions.GetTimeoutError:
    report(phase="up", error=f"actors not placed within {up_timeout} s", nodes=alive())
    sys.exit(1)
report(phase="up", seconds=time.monotonic() - start, actor_nodes=placed, nodes=alive())

for h in holders:
    ray.kill(h)
start = time.monotonic()
while time.monotonic() - start < down_timeout and len(alive()) > 1:
    time.sleep(1)
report(phase="down", seconds=time.monotonic() - start, nodes=alive())
"""

# Runs as a job through `ray job submit --working-dir <repo> --runtime-env
# cluster/runtime_env.yaml`: checks what the runtime env promises, on the
# driver and in a task (which has to run on an autoscaled worker node).
JOB_PROBE = r"""
import importlib.util, json, os
import ray

def probe():
    spec = importlib.util.find_spec("segray")
    return {
        "segray_in_working_dir": spec is not None and spec.origin.startswith(os.getcwd()),
        "tests_uploaded": os.path.exists("tests"),
        "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL"),
    }

ray.init()
remote_probe = ray.remote(num_cpus=1)(probe)
print("SEGRAY-PROBE " + json.dumps({"driver": probe(), "task": ray.get(remote_probe.remote())}))
"""


def _start_head(temp_dir: Path) -> tuple[int, HeadNode | None, str]:
    """`ray start --head` with the config on free ports; (pgid, head or None, failure)."""
    port = free_port()
    config = yaml.safe_load(CONFIG.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config_path = temp_dir / "local-autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return start_head(
        temp_dir,
        port=port,
        args=[
            f"--autoscaling-config={config_path}",
            "--num-cpus=0",
            "--object-store-memory=200000000",
        ],
        env={
            "RAY_FAKE_CLUSTER": "1",
            # The autoscaler's loop period (default 5 s): quicker scaling.
            "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        },
        timeout_s=START_TIMEOUT_S,
    )


@pytest.fixture(scope="module")
def fake_cluster():
    yield from running_head(_start_head)


def _phases(stdout: str) -> dict[str, dict]:
    phases = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            phases[record["phase"]] = record
    return phases


def test_demand_adds_workers_and_idle_workers_go_away(fake_cluster: HeadNode) -> None:
    config = yaml.safe_load(CONFIG.read_text())
    worker_cpus = config["available_node_types"]["cpu.small"]["resources"]["CPU"]
    idle_timeout_s = config["idle_timeout_minutes"] * 60

    driver = subprocess.run(
        [sys.executable, "-c", SCALE_DRIVER, fake_cluster.gcs_address, str(UP_TIMEOUT_S), str(DOWN_TIMEOUT_S)],
        env=fake_cluster.env, capture_output=True, text=True,
        timeout=UP_TIMEOUT_S + DOWN_TIMEOUT_S + 120,
    )
    phases = _phases(driver.stdout)
    context = f"driver rc={driver.returncode}\n{driver.stdout}\n{driver.stderr[-3000:]}"
    assert "up" in phases and "error" not in phases["up"], f"{context}\n{fake_cluster.diagnostics()}"

    # Only the head, and it offers no CPU: the demand cannot be met without workers.
    start_nodes = phases["start"]["nodes"]
    assert [(n["head"], n["cpu"]) for n in start_nodes] == [(True, 0.0)], context

    # Two actors of 2 CPUs each: two new cpu.small nodes, one actor on each.
    up = phases["up"]
    workers = [n for n in up["nodes"] if not n["head"]]
    assert len(workers) == 2, context
    assert all(n["cpu"] == worker_cpus for n in workers), context
    assert sorted(up["actor_nodes"]) == sorted(n["id"] for n in workers), context

    # Released: the workers stay for the idle timeout, then the autoscaler ends them.
    down = phases["down"]
    assert [n["head"] for n in down["nodes"]] == [True], f"{context}\n{fake_cluster.diagnostics()}"
    assert down["seconds"] >= 0.5 * idle_timeout_s, (
        f"workers gone after {down['seconds']:.1f} s, before the idle timeout of {idle_timeout_s} s: {context}"
    )
    assert driver.returncode == 0, context


def test_job_submit_needs_the_token_and_applies_runtime_env(fake_cluster: HeadNode) -> None:
    submit = subprocess.run(
        [
            *RAY_CLI, "job", "submit",
            "--address", fake_cluster.dashboard_url,
            "--working-dir", str(REPO),
            "--runtime-env", str(RUNTIME_ENV),
            "--", "python", "-c", JOB_PROBE,
        ],
        env=fake_cluster.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S,
    )
    lines = [line for line in submit.stdout.splitlines() if line.startswith("SEGRAY-PROBE ")]
    assert submit.returncode == 0 and lines, (
        f"rc={submit.returncode}\n{submit.stdout[-4000:]}\n{submit.stderr[-3000:]}"
    )
    result = json.loads(lines[-1].split(" ", 1)[1])
    for where in ("driver", "task"):
        assert result[where] == {
            "segray_in_working_dir": True,
            "tests_uploaded": False,
            "TF_CPP_MIN_LOG_LEVEL": "3",
        }, (where, result)

    # The same request without the token is refused. HOME points at an empty
    # folder so that no ~/.ray/auth_token can stand in for it.
    no_token_env = {k: v for k, v in fake_cluster.env.items() if not k.startswith("RAY_AUTH")}
    no_token_env["HOME"] = str(fake_cluster.temp_dir / "empty-home")
    os.makedirs(no_token_env["HOME"], exist_ok=True)
    listing = subprocess.run(
        [*RAY_CLI, "job", "list", "--address", fake_cluster.dashboard_url],
        env=no_token_env, capture_output=True, text=True, timeout=120,
    )
    assert listing.returncode != 0, f"job list without a token succeeded:\n{listing.stdout}"
    assert "401" in listing.stdout + listing.stderr or "nauthorized" in listing.stdout + listing.stderr, (
        listing.stdout + listing.stderr
    )
