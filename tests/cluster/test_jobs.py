"""jobs/ingest.py, jobs/train.py and jobs/predict.py submitted to a real Ray head with `ray job submit`.

The head is `ray start --head` on 127.0.0.1 with token auth on (see
`cluster_helpers`), 4 logical CPUs, and the AWS environment of the moto S3
server in its environment, as a node with credentials has: every job driver,
Ray Train worker and Ray Data task inherits it. The secret key is a marker
string that must never show up in a job's logs, in Ray's log files or in
anything the jobs write to storage.

Jobs are submitted with the `ray job` CLI as a user would (`--working-dir`
the repository, `--runtime-env cluster/runtime_env.yaml`); the pytest process
follows them through the job API over HTTP with the token in the header
(`JobSubmissionClient`), since it cannot switch its own Ray to token auth.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import subprocess
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from segray.data import synthesize
from tests.cluster.cluster_helpers import RAY_CLI, REPO, RUNTIME_ENV, HeadNode, free_port, running_head, start_head

pytestmark = pytest.mark.slow

# Not a credential: moto accepts any key. Random so that no file can hold it by chance.
SECRET = "sgr-marker-" + secrets.token_hex(12)

N_IMAGES = 40
SUBMIT_TIMEOUT_S = 240  # `ray job submit`: zips and uploads the repository
INGEST_TIMEOUT_S = 600
TRAIN_TIMEOUT_S = 900
PREDICT_TIMEOUT_S = 600
BAD_TIMEOUT_S = 300
TINY_TRAIN = [
    "--model", "unet", "--model-option", "depth=2", "--model-option", "width=8",
    "--epochs", "2", "--batch-size", "4", "--workers", "2", "--size", "32",
]

# Runs as a job: shows that the job's driver has the node's secret key in its
# environment (so the marker checks below are not vacuous) without printing it.
ENV_PROBE = (
    "import hashlib, os; "
    "print('SECRET-SHA256', hashlib.sha256(os.environ.get('AWS_SECRET_ACCESS_KEY', '').encode()).hexdigest())"
)


@dataclass
class Job:
    name: str
    submission_id: str
    submit_output: str
    status: str = "PENDING"
    logs: str = ""
    seconds: float = 0.0
    extra_output: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"job {self.name} ({self.submission_id}): {self.status} after {self.seconds:.0f} s; logs:\n{self.logs[-6000:]}"


def _start(temp_dir: Path, s3_env: dict[str, str]) -> tuple[int, HeadNode | None, str]:
    return start_head(
        temp_dir,
        port=free_port(),
        args=[
            "--node-ip-address=127.0.0.1",
            "--num-cpus=4",
            "--object-store-memory=300000000",
        ],
        env={**s3_env, "AWS_SECRET_ACCESS_KEY": SECRET},
    )


@pytest.fixture(scope="module")
def head(s3) -> HeadNode:
    s3_env = {k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_DEFAULT_REGION")}
    yield from running_head(lambda temp_dir: _start(temp_dir, s3_env))


class Jobs:
    """Submits with the `ray job` CLI; follows through the job API with the token header."""

    def __init__(self, head: HeadNode):
        from ray.job_submission import JobSubmissionClient

        self.head = head
        self.client = JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)

    def submit(self, name: str, *entrypoint: str) -> Job:
        submission_id = f"segray-{name}-{secrets.token_hex(4)}"
        cmd = [
            *RAY_CLI, "job", "submit",
            "--address", self.head.dashboard_url,
            "--submission-id", submission_id,
            "--no-wait",
            "--working-dir", str(REPO),
            "--runtime-env", str(RUNTIME_ENV),
            "--", *entrypoint,
        ]
        try:
            done = subprocess.run(cmd, env=self.head.env, capture_output=True, text=True, timeout=SUBMIT_TIMEOUT_S)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"`ray job submit` of {name} did not return within {SUBMIT_TIMEOUT_S} s: {e.stdout!r} {e.stderr!r}")
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"`ray job submit` of {name} exited {done.returncode}:\n{output[-4000:]}"
        return Job(name, submission_id, output)

    def wait(self, job: Job, timeout_s: float) -> Job:
        """Polls until the job ends; stops it and fails the test after timeout_s."""
        from ray.job_submission import JobStatus

        start = time.monotonic()
        status = None
        while time.monotonic() - start < timeout_s:
            status = self.client.get_job_status(job.submission_id)
            if status.is_terminal():
                break
            time.sleep(2)
        job.seconds = time.monotonic() - start
        job.status = str(status.value if isinstance(status, JobStatus) else status)
        job.logs = self.client.get_job_logs(job.submission_id)
        if status is None or not status.is_terminal():
            self.client.stop_job(job.submission_id)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not self.client.get_job_status(job.submission_id).is_terminal():
                time.sleep(1)
            pytest.fail(f"job {job.name} did not end within {timeout_s} s (stopped it).\n{job.describe()}\n{self.head.diagnostics()}")
        return job

    def cli(self, *args: str) -> str:
        """`ray job ARGS` against the head; its output."""
        done = subprocess.run(
            [*RAY_CLI, "job", *args, "--address", self.head.dashboard_url],
            env=self.head.env, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, f"`ray job {' '.join(args)}` exited {done.returncode}:\n{done.stdout}{done.stderr}"
        return done.stdout + done.stderr


@dataclass
class Pipeline:
    bucket: str
    dataset: str
    run: str
    predictions: str
    jobs: dict[str, Job]
    bad_flag_logs: dict[str, str]


# One is enough here: tests/training checks every flag; this checks what a job makes of the refusal.
BAD_FLAGS = {
    "epochs0": (["--epochs", "0"], "--epochs must be positive, got 0"),
}


@pytest.fixture(scope="module")
def pipeline(head: HeadNode, s3, tmp_path_factory) -> Pipeline:
    """Ingest, train and predict as three jobs, one after the other; the bad-flag jobs and a probe beside them."""
    raw = tmp_path_factory.mktemp("jobs") / "raw"
    synthesize(str(raw), n=N_IMAGES, size=(32, 32), num_classes=4, seed=0, show_progress=False)
    bucket = s3.bucket()
    dataset, runs, predictions = f"{bucket}/datasets/shapes", f"{bucket}/runs", f"{bucket}/predictions/tiny"
    jobs = Jobs(head)
    done: dict[str, Job] = {}

    # The quick jobs run beside the pipeline: the cluster has CPUs to spare.
    side = {"probe": jobs.submit("probe", "python", "-c", ENV_PROBE)}
    for name, (flags, _) in BAD_FLAGS.items():
        side[name] = jobs.submit(
            name, "python", "jobs/train.py", "--data", dataset, *TINY_TRAIN, *flags,
            "--storage", runs, "--name", f"bad-{name}",
        )

    steps = [
        ("ingest", INGEST_TIMEOUT_S, ["python", "jobs/ingest.py", str(raw), dataset, "--val-fraction", "0.25"]),
        ("train", TRAIN_TIMEOUT_S, ["python", "jobs/train.py", "--data", dataset, *TINY_TRAIN, "--storage", runs, "--name", "tiny"]),
        ("predict", PREDICT_TIMEOUT_S, [
            "python", "jobs/predict.py", "--model", f"{runs}/tiny", "--input", f"{dataset}/val",
            "--output", predictions, "--batch-size", "8",
        ]),
    ]
    for name, timeout_s, entrypoint in steps:
        job = jobs.wait(jobs.submit(name, *entrypoint), timeout_s)
        done[name] = job
        if job.status != "SUCCEEDED":
            break  # the next step needs this one's output; the test reports it
    for name, job in side.items():
        done[name] = jobs.wait(job, BAD_TIMEOUT_S)
    # Shown with -s or when a test fails: where the time went.
    print("\n".join(f"job {j.name}: {j.status} after {j.seconds:.0f} s of waiting" for j in done.values()))

    # `ray job logs` and `ray job status` as a user reads them, for the failed jobs.
    bad_flag_logs = {}
    for name in BAD_FLAGS:
        job = done[name]
        bad_flag_logs[name] = jobs.cli("logs", job.submission_id)
        job.extra_output.append(bad_flag_logs[name])
        job.extra_output.append(jobs.cli("status", job.submission_id))
    return Pipeline(bucket, dataset, f"{runs}/tiny", predictions, done, bad_flag_logs)


def _key(uri: str) -> str:
    return uri.split("/", 3)[3]


def _frame(s3, uri: str):
    import pyarrow.parquet as pq

    bucket, key = uri[len("s3://"):].split("/", 1)
    body = s3.client.get_object(Bucket=bucket, Key=key)["Body"].read()
    return pq.read_table(io.BytesIO(body)).to_pandas()


def test_ingest_train_predict_jobs_succeed_and_leave_their_outputs(pipeline: Pipeline, s3) -> None:
    jobs = pipeline.jobs
    for name in ("ingest", "train", "predict"):
        assert name in jobs, f"job {name} was not submitted: an earlier step failed\n" + "\n".join(j.describe() for j in jobs.values())
        assert jobs[name].status == "SUCCEEDED", jobs[name].describe()

    keys = set(s3.keys(pipeline.bucket))
    bucket_name = pipeline.bucket[len("s3://"):]
    dataset_key = _key(pipeline.dataset + "/")
    info = json.loads(s3.client.get_object(Bucket=bucket_name, Key=dataset_key + "dataset.json")["Body"].read())
    assert sum(info["splits"].values()) == N_IMAGES, info["splits"]
    n_val = info["splits"]["val"]
    assert n_val > 0 and any(k.startswith(dataset_key + "val/") and k.endswith(".parquet") for k in keys), sorted(keys)

    run_key = _key(pipeline.run + "/")
    for name in ("model/model.keras", "model/preprocessing.json", "history.parquet", "config.json"):
        assert run_key + name in keys, f"{run_key + name} missing; the run holds {sorted(k for k in keys if k.startswith(run_key))}"
    history = _frame(s3, pipeline.run + "/history.parquet")
    assert list(history["epoch"]) == [0, 1], history
    assert history["train_loss"].notna().all() and history["val_miou"].notna().all(), history
    assert "trained unet for 2 epoch(s)" in jobs["train"].logs, jobs["train"].logs[-3000:]

    pred_key = _key(pipeline.predictions + "/")
    assert pred_key + "per_class.parquet" in keys, sorted(k for k in keys if k.startswith(pred_key))
    masks = [k for k in keys if k.startswith(pred_key + "masks/") and k.endswith(".png")]
    assert len(masks) == n_val, (len(masks), n_val)
    per_class = _frame(s3, pipeline.predictions + "/per_class.parquet")
    assert len(per_class) == info["num_classes"], per_class


@pytest.mark.parametrize("name", list(BAD_FLAGS))
def test_bad_flag_job_fails_with_its_message(pipeline: Pipeline, s3, name: str) -> None:
    flags, message = BAD_FLAGS[name]
    job = pipeline.jobs[name]
    assert job.status == "FAILED", job.describe()
    logs = pipeline.bad_flag_logs[name]
    assert message in logs, f"`ray job logs` of {' '.join(flags)} lacks {message!r}:\n{logs[-3000:]}"
    # A flag the user can fix ends with one line, not a traceback.
    assert "Traceback" not in logs, logs[-3000:]
    assert not [k for k in s3.keys(pipeline.bucket) if f"/bad-{name}/" in k], "a refused run wrote to storage"


def _contains(body: bytes, marker: bytes) -> bool:
    """The marker in the bytes, or in a member of a zip (.keras files, checkpoints)."""
    if marker in body:
        return True
    if body[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(io.BytesIO(body)) as archive:
            return any(marker in archive.read(member) for member in archive.namelist())
    return False


def test_the_secret_key_reaches_the_jobs_but_never_their_logs_or_outputs(pipeline: Pipeline, head: HeadNode, s3) -> None:
    probe = pipeline.jobs["probe"]
    assert probe.status == "SUCCEEDED", probe.describe()
    assert f"SECRET-SHA256 {hashlib.sha256(SECRET.encode()).hexdigest()}" in probe.logs, (
        "the job's driver does not have the node's AWS_SECRET_ACCESS_KEY: the checks below would prove nothing\n" + probe.logs
    )

    marker = SECRET.encode()
    leaks = []
    for job in pipeline.jobs.values():
        for text in (job.logs, job.submit_output, *job.extra_output):
            if SECRET in text:
                leaks.append(f"job {job.name} output")
    bucket_name = pipeline.bucket[len("s3://"):]
    objects = s3.keys(pipeline.bucket)
    assert len(objects) > 10, objects
    for key in objects:
        body = s3.client.get_object(Bucket=bucket_name, Key=key)["Body"].read()
        if _contains(body, marker):
            leaks.append(f"s3://{bucket_name}/{key}")
    # Everything Ray logged on the node: drivers, workers, raylet, GCS, dashboard.
    logs_dir = head.logs_dir()
    assert logs_dir is not None and any(logs_dir.iterdir()), f"no Ray logs under {head.temp_dir}"
    for path in logs_dir.rglob("*"):
        if path.is_file() and marker in path.read_bytes():
            leaks.append(str(path))
    assert not leaks, f"the secret key appears in: {leaks}"
