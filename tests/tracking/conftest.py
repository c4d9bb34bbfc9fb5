"""A real MLflow tracking server on 127.0.0.1 (SQLite backend store, local artifact root), started once per module."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """``mlflow server`` on a free port of 127.0.0.1; ``stop()`` kills it, ``start()`` brings it back on the same store."""

    def __init__(self, root: str):
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.log = os.path.join(root, "server.log")

    def start(self) -> None:
        mlflow = os.path.join(os.path.dirname(sys.executable), "mlflow")
        command = [mlflow if os.path.exists(mlflow) else "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", f"sqlite:///{self.root}/mlflow.db",
                   "--artifacts-destination", os.path.join(self.root, "artifacts"), "--workers", "1"]
        # No job runner: its consumer processes (for GenAI jobs) cost seconds of start-up and CPU the tests need.
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(command, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def wait(self, timeout_s: float = 180.0) -> None:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({self.process.returncode}); see {self.log}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.3)
        raise TimeoutError(f"mlflow server on {self.uri} did not answer in {timeout_s} s; see {self.log}")

    def stop(self) -> None:
        """Kills the server and every process it started (its own session's group)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # workers that outlive the main process
        except ProcessLookupError:
            pass
        self.process.wait()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mlflow-server"))
    server = MlflowServer(root)
    server.start()
    try:
        server.wait()
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
