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

Teardown ends only the processes this module started: those in the process
group of its `ray start`, and those whose command line names its private
temp dir (Ray puts workers in process groups of their own). `ray stop` would
also end every other Ray on the machine.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "cluster" / "local-autoscaler.yaml"
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]

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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeCluster:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    temp_dir: Path
    log: Path

    def diagnostics(self) -> str:
        """`ray status` and the autoscaler's log tail, for failure messages."""
        status = subprocess.run(
            [*RAY_CLI, "status", "--address", self.gcs_address],
            env=self.env, capture_output=True, text=True, timeout=60,
        )
        monitor_logs = sorted(self.temp_dir.glob("session_*/logs/monitor.log"))
        tail = monitor_logs[-1].read_text()[-3000:] if monitor_logs else "(no monitor.log)"
        return f"ray status:\n{status.stdout}{status.stderr}\nmonitor.log tail:\n{tail}"


def _our_pids(pgid: int, marker: str) -> list[int]:
    """Live processes in `pgid` or whose command line contains `marker`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        # Fields after the ")" that ends the command name: state, ppid, pgrp.
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state == "Z":
            continue
        if int(pgrp) == pgid or marker in cmdline:
            pids.append(int(proc.name))
    return pids


def _stop(pgid: int, marker: str, grace_s: float = 10.0) -> None:
    """SIGTERM this cluster's processes, then SIGKILL what is left after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in _our_pids(pgid, marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _our_pids(pgid, marker):
            time.sleep(0.5)


def _start_head(temp_dir: Path) -> tuple[int, FakeCluster | None, str]:
    """`ray start --head` with the config on free ports; (pgid, cluster or None, log)."""
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)

    port = _free_port()
    config = yaml.safe_load(CONFIG.read_text())
    config["provider"]["gcs_address"] = f"127.0.0.1:{port}"
    config_path = temp_dir / "local-autoscaler.yaml"
    config_path.write_text(yaml.safe_dump(config))

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_FAKE_CLUSTER="1",
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
        # The autoscaler's loop period (default 5 s): quicker scaling.
        AUTOSCALER_UPDATE_INTERVAL_S="1",
    )
    dashboard_port = _free_port()
    log = temp_dir / "ray-start.log"
    cmd = [
        *RAY_CLI, "start", "--head",
        f"--autoscaling-config={config_path}",
        f"--port={port}",
        "--num-cpus=0",
        "--object-store-memory=200000000",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with log.open("w") as out:
        start = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = start.wait(timeout=START_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        rc = f"nothing (still running after {START_TIMEOUT_S} s)"
    if rc != 0:
        return start.pid, None, f"ray start exited {rc}:\n{log.read_text()[-4000:]}"
    cluster = FakeCluster(
        gcs_address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        env=env,
        temp_dir=temp_dir,
        log=log,
    )
    return start.pid, cluster, ""


@pytest.fixture(scope="module")
def fake_cluster():
    # A second try with fresh ports: on a loaded two-core machine `ray start`
    # can miss its own internal deadlines, or lose a free port to another
    # process. Both failures are reported if the second try fails too.
    failures = []
    for _ in range(2):
        # Short, private temp dir: Ray's unix sockets live under it (path
        # limit 107 bytes), and its name marks this cluster's processes.
        temp_dir = Path(tempfile.mkdtemp(prefix="sgr-", dir="/tmp"))
        pgid, cluster, failure = _start_head(temp_dir)
        try:
            if cluster is not None:
                yield cluster
                return
            failures.append(failure)
        finally:
            _stop(pgid, marker=str(temp_dir))
            leftover = _our_pids(pgid, str(temp_dir))
            shutil.rmtree(temp_dir, ignore_errors=True)
            assert not leftover, f"processes of the fake cluster still alive: {leftover}"
    pytest.fail("\n\n".join(failures))


def _phases(stdout: str) -> dict[str, dict]:
    phases = {}
    for line in stdout.splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            phases[record["phase"]] = record
    return phases


def test_demand_adds_workers_and_idle_workers_go_away(fake_cluster: FakeCluster) -> None:
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


def test_job_submit_needs_the_token_and_applies_runtime_env(fake_cluster: FakeCluster) -> None:
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
            "TF_CPP_MIN_LOG_LEVEL": "2",
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
