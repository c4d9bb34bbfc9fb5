"""Shared fixtures: real object stores on 127.0.0.1 and a local Ray cluster.

S3 is moto's server, Google Cloud Storage is gcp-storage-emulator's, Azure
Blob is Azurite (npm's ``azurite``, which ``.ci/run`` installs). Each store's
environment is set before Ray starts, so Ray's worker processes inherit the
endpoint and the (fake) credentials just as a real cluster's workers inherit
an instance profile.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

DATA = os.path.join(os.path.dirname(__file__), "data")
EPFL_MINI = os.path.join(DATA, "epfl-mini")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3:
    """A moto server and a boto3 client talking to it over HTTP."""

    def __init__(self, endpoint: str):
        import boto3

        self.endpoint = endpoint
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")

    def bucket(self, prefix: str = "segray") -> str:
        """A fresh bucket; returns its s3:// URI."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client.create_bucket(Bucket=name)
        return f"s3://{name}"

    def keys(self, uri: str) -> list[str]:
        bucket, _, prefix = uri[len("s3://"):].partition("/")
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))


def _set_env(env: dict[str, str]) -> dict[str, str | None]:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return old


def _restore_env(old: dict[str, str | None]) -> None:
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _fix_moto_complete_multipart_root() -> None:
    """Makes moto answer CompleteMultipartUpload with S3's real root element.

    moto 5.2 names the root ``CompleteMultipartUploadResponse``; S3 and MinIO
    send ``CompleteMultipartUploadResult``, and the AWS C++ SDK inside pyarrow
    treats any other root as an error embedded in a 200 reply, so every
    pyarrow write to moto failed. boto3 does not check the name. This fixes
    the fake server, not a client.
    """
    from moto.core.serialize import S3Serializer

    original = S3Serializer._serialized_result_to_response
    if getattr(original, "_segray_fixed", False):
        return

    def fixed(self, resp, result, shape, serialized_result):
        resp = original(self, resp, result, shape, serialized_result)
        if self.operation_model.name == "CompleteMultipartUpload" and isinstance(resp.get("body"), str):
            resp["body"] = resp["body"].replace("CompleteMultipartUploadResponse", "CompleteMultipartUploadResult")
        return resp

    fixed._segray_fixed = True
    S3Serializer._serialized_result_to_response = fixed


@pytest.fixture(scope="session")
def s3() -> S3:
    from moto.server import ThreadedMotoServer

    _fix_moto_complete_multipart_root()

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = _set_env(env)
    yield S3(endpoint)
    server.stop()
    _restore_env(old)


class GCS:
    """gcp-storage-emulator's server and a gcsfs client talking to it over HTTP."""

    def __init__(self, endpoint: str):
        from gcsfs.core import GCSFileSystem

        self.endpoint = endpoint
        self.client = GCSFileSystem(token="anon", use_listings_cache=False)

    def bucket(self, prefix: str = "segray") -> str:
        """A fresh bucket; returns its gs:// URI."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client.mkdir(name)
        return f"gs://{name}"

    def keys(self, uri: str) -> list[str]:
        bucket = uri[len("gs://"):].split("/", 1)[0]
        return sorted(k[len(bucket) + 1:] for k in self.client.find(uri[len("gs://"):]))


def _fix_gcs_emulator_preconditions() -> None:
    """Makes gcp-storage-emulator answer an upload with ``ifGenerationMatch=0`` as GCS does.

    The emulator ignores the precondition and overwrites, so every
    conditional create "won"; GCS answers 412 when the object exists. Its
    server handles one request at a time, so the check and the write cannot
    interleave. This fixes the fake server, not a client.
    """
    from http import HTTPStatus

    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    original = objects.insert
    if getattr(original, "_segray_fixed", False):
        return

    def insert(request, response, storage, *args, **kwargs):
        if request.query.get("ifGenerationMatch") == ["0"]:
            data = request.data if isinstance(request.data, dict) else {}
            name = (request.query.get("name") or [None])[0] or (data.get("meta") or {}).get("name") or data.get("name")
            try:
                storage.get_file_obj(request.params["bucket_name"], name)
            except NotFound:
                pass
            else:
                response.status = HTTPStatus.PRECONDITION_FAILED
                response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}})
                return None
        return original(request, response, storage, *args, **kwargs)

    insert._segray_fixed = True
    objects.insert = insert
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is original:
                handlers[method] = insert


@pytest.fixture(scope="session")
def gcs() -> GCS:
    from gcp_storage_emulator.server import create_server

    _fix_gcs_emulator_preconditions()
    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # gcsfs (and Google's own clients) go to STORAGE_EMULATOR_HOST without credentials.
    old = _set_env({"STORAGE_EMULATOR_HOST": endpoint})
    yield GCS(endpoint)
    server.stop()
    _restore_env(old)


# Azurite's development account: its name and key are published in Azurite's
# documentation and accepted by no real store.
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class Azure:
    """An Azurite blob server and an azure-storage-blob client talking to it over HTTP."""

    def __init__(self, endpoint: str, connection_string: str):
        from azure.storage.blob import BlobServiceClient

        self.endpoint = endpoint
        self.connection_string = connection_string
        self.client = BlobServiceClient.from_connection_string(connection_string)

    def bucket(self, prefix: str = "segray") -> str:
        """A fresh container; returns its az:// URI."""
        name = f"{prefix}-{uuid.uuid4().hex[:10]}"
        self.client.create_container(name)
        return f"az://{name}"

    def keys(self, uri: str) -> list[str]:
        container, _, prefix = uri[len("az://"):].partition("/")
        return sorted(self.client.get_container_client(container).list_blob_names(name_starts_with=prefix))


def _wait_for_port(port: int, process: subprocess.Popen, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"azurite exited with {process.returncode} before it listened on 127.0.0.1:{port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"azurite did not listen on 127.0.0.1:{port} within {timeout_s:.0f} s")


@pytest.fixture(scope="session")
def azure() -> Azure:
    program = shutil.which("azurite-blob") or shutil.which("azurite")
    if program is None:
        message = "azurite is not installed: npm install -g azurite (as .ci/run does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    port = _free_port()
    workspace = tempfile.mkdtemp(prefix="segray-azurite-")
    process = subprocess.Popen(
        [program, "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
         "--skipApiVersionCheck", "--loose", "--silent", "--disableTelemetry"],
        cwd=workspace,  # whatever Azurite writes besides the blobs (held in memory) stays out of the repo
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, process)
        endpoint = f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}"
        connection = f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={endpoint};"
        old = _set_env({"AZURE_STORAGE_CONNECTION_STRING": connection})
        yield Azure(endpoint, connection)
        _restore_env(old)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workspace, ignore_errors=True)


@pytest.fixture(scope="module", autouse=True)
def _one_ray_per_module():
    """Ends at each module's end any Ray a test started without ``ray_cluster`` (Ray Data starts one on
    first use), so the next module's ``ray.init`` starts its own instead of failing."""
    yield
    import sys

    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_cluster(s3):
    """One local Ray per test module (4 logical CPUs: actor pools deadlock at 2)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
