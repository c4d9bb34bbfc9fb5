"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1) and a local Ray cluster.

The S3 environment is set before Ray starts, so Ray's worker processes
inherit the endpoint and the (fake) credentials just as a real cluster's
workers inherit an instance profile.
"""

from __future__ import annotations

import os
import socket
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
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield S3(endpoint)
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def ray_cluster(s3):
    """One local Ray per test module (4 logical CPUs: actor pools deadlock at 2)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
