"""A real Ray head (`ray start --head`) for tests: free ports, its own token and temp dir.

Token auth stays on: the head gets a fresh token file, and every process that
talks to it (drivers, `ray job submit`) gets RAY_AUTH_MODE=token and the
token's path in its environment (`HeadNode.env`). The pytest process itself
reads RAY_AUTH_MODE once, when Ray loads its config, so it talks to the head
only through subprocesses or through HTTP with the token in the header
(`HeadNode.auth_headers`).

Teardown ends only the processes this head started: those in the process
group of its `ray start`, and those whose command line or environment names
its private temp dir (Ray puts workers and job drivers in process groups of
their own; they all inherit RAY_AUTH_TOKEN_PATH, which lies in that dir).
`ray stop` would also end every other Ray on the machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUNTIME_ENV = REPO / "cluster" / "runtime_env.yaml"
RAY_CLI = [sys.executable, "-m", "ray.scripts.scripts"]

START_TIMEOUT_S = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class HeadNode:
    gcs_address: str
    dashboard_url: str
    env: dict[str, str]
    temp_dir: Path
    log: Path

    @property
    def auth_headers(self) -> dict[str, str]:
        """The HTTP header the dashboard and job API want (for JobSubmissionClient)."""
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        return {"Authorization": f"Bearer {token}"}

    def logs_dir(self) -> Path | None:
        sessions = sorted(self.temp_dir.glob("session_2*"))
        return sessions[-1] / "logs" if sessions else None

    def diagnostics(self) -> str:
        """`ray status` and the autoscaler's log tail, for failure messages."""
        try:
            status = subprocess.run(
                [*RAY_CLI, "status", "--address", self.gcs_address],
                env=self.env, capture_output=True, text=True, timeout=60,
            )
            status_text = status.stdout + status.stderr
        except subprocess.TimeoutExpired:
            status_text = "(ray status did not answer within 60 s)\n"
        monitor_logs = sorted(self.temp_dir.glob("session_*/logs/monitor.log"))
        tail = monitor_logs[-1].read_text()[-3000:] if monitor_logs else "(no monitor.log)"
        return f"ray status:\n{status_text}\nmonitor.log tail:\n{tail}"


def our_pids(pgid: int, marker: str) -> list[int]:
    """Live processes in `pgid` or whose command line or environment contains `marker`."""
    pids = []
    needle = marker.encode()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            stat = (proc / "stat").read_text()
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        # Fields after the ")" that ends the command name: state, ppid, pgrp.
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if state == "Z":
            continue
        if int(pgrp) == pgid or needle in cmdline:
            pids.append(int(proc.name))
            continue
        try:
            if needle in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def stop_processes(pgid: int, marker: str, grace_s: float = 10.0) -> None:
    """SIGTERM the head's processes, then SIGKILL what is left after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in our_pids(pgid, marker):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and our_pids(pgid, marker):
            time.sleep(0.5)


def start_head(
    temp_dir: Path,
    *,
    port: int,
    args: list[str],
    env: dict[str, str] | None = None,
    timeout_s: float = START_TIMEOUT_S,
) -> tuple[int, HeadNode | None, str]:
    """`ray start --head` on free ports with its own token; (pgid, head or None, failure).

    Args:
        temp_dir: the head's private temp dir (short: Ray's unix sockets live
            under it, path limit 107 bytes); its name marks the head's processes.
        port: the GCS port.
        args: more `ray start` flags (resources, autoscaling config ...).
        env: more environment for the head and everything it starts.
    """
    token = temp_dir / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)

    head_env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    head_env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token),
        RAY_USAGE_STATS_ENABLED="0",
    )
    head_env.update(env or {})
    dashboard_port = free_port()
    log = temp_dir / "ray-start.log"
    cmd = [
        *RAY_CLI, "start", "--head",
        *args,
        f"--port={port}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    with log.open("w") as out:
        start = subprocess.Popen(cmd, env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = start.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        rc = f"nothing (still running after {timeout_s} s)"
    if rc != 0:
        return start.pid, None, f"ray start exited {rc}:\n{log.read_text()[-4000:]}"
    head = HeadNode(
        gcs_address=f"127.0.0.1:{port}",
        dashboard_url=f"http://127.0.0.1:{dashboard_port}",
        env=head_env,
        temp_dir=temp_dir,
        log=log,
    )
    return start.pid, head, ""


def running_head(start: Callable[[Path], tuple[int, HeadNode | None, str]], tries: int = 2) -> Iterator[HeadNode]:
    """For module fixtures (`yield from running_head(...)`): a head, ended at teardown.

    A second try with fresh ports and a fresh temp dir: on a loaded two-core
    machine `ray start` can miss its own internal deadlines, or lose a free
    port to another process. Every failure is reported if the last try fails
    too.

    Args:
        start: makes the head in the temp dir it is given (`start_head` with
            the caller's flags).
    """
    failures = []
    for _ in range(tries):
        temp_dir = Path(tempfile.mkdtemp(prefix="sgr-", dir="/tmp"))
        pgid, head, failure = start(temp_dir)
        try:
            if head is not None:
                yield head
                return
            failures.append(failure)
        finally:
            stop_processes(pgid, marker=str(temp_dir))
            leftover = our_pids(pgid, str(temp_dir))
            shutil.rmtree(temp_dir, ignore_errors=True)
            assert not leftover, f"processes of the Ray head in {temp_dir} still alive: {leftover}"
    pytest.fail("\n\n".join(failures))
