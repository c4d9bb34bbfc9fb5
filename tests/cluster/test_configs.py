"""The files in cluster/ parse, and say what Ray and KubeRay will read from them.

Launcher configs are checked with Ray's own schema and validator (and, for
aws.yaml, Ray's AWS bootstrap against moto's EC2 and IAM), KubeRay manifests
with the function Ray's KubeRay autoscaler uses to turn a RayCluster into an
autoscaling config. No cloud account and no Kubernetes is needed.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import ray.autoscaler
import yaml
from ray._private.runtime_env.packaging import _get_excludes
from ray.autoscaler._private.kuberay.autoscaling_config import _derive_autoscaling_config_from_ray_cr
from ray.autoscaler._private.util import validate_config
from ray.autoscaler.v2.instance_manager.config import AutoscalingConfig
from ray.runtime_env import RuntimeEnv

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
KUBERAY = CLUSTER / "kuberay"
LAUNCHER_CONFIGS = ["aws.yaml", "local-autoscaler.yaml"]
RAYJOBS = ["rayjob-train.yaml", "rayjob-predict.yaml"]
CLUSTER_SPECS = ["raycluster.yaml", *RAYJOBS]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


# --- cluster launcher configs ---------------------------------------------


@pytest.mark.parametrize("name", LAUNCHER_CONFIGS)
def test_launcher_config_passes_ray_schema_and_validator(name: str, ray_schema: dict) -> None:
    config = _load(CLUSTER / name)
    jsonschema.validate(config, ray_schema)
    # Ray's checks beyond the schema: head type listed, sum of min_workers
    # within max_workers, the fields the monitor reads unfilled present.
    validate_config(config)


def test_schema_check_catches_a_misspelled_field(ray_schema: dict) -> None:
    config = _load(CLUSTER / "aws.yaml")
    config["idle_timeout_minute"] = config.pop("idle_timeout_minutes")
    with pytest.raises(jsonschema.ValidationError, match="idle_timeout_minute"):
        jsonschema.validate(config, ray_schema)


def test_aws_head_takes_no_work_and_workers_scale_from_zero() -> None:
    config = _load(CLUSTER / "aws.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}
    assert {name: t.get("min_workers", 0) for name, t in workers.items()} == dict.fromkeys(workers, 0)
    assert any(t["resources"].get("GPU", 0) > 0 for t in workers.values())
    assert any(t["resources"].get("GPU", 0) == 0 and t["resources"]["CPU"] > 0 for t in workers.values())
    assert 0 < config["idle_timeout_minutes"] <= 30


def test_aws_gpu_spot_type_has_an_on_demand_twin_of_lower_priority() -> None:
    config = _load(CLUSTER / "aws.yaml")
    # Node types as autoscaler v2 (the default of `ray up`) reads them.
    node_types = AutoscalingConfig(config, skip_content_hash=True).get_node_type_configs()
    node_configs = {name: t["node_config"] for name, t in config["available_node_types"].items()}
    gpu = [name for name, t in node_types.items() if t.resources.get("GPU", 0) > 0]
    spot = [n for n in gpu if node_configs[n].get("InstanceMarketOptions", {}).get("MarketType") == "spot"]
    on_demand = [n for n in gpu if "InstanceMarketOptions" not in node_configs[n]]
    assert len(spot) == 1 and len(on_demand) == 1, gpu
    spot_type, fallback = node_types[spot[0]], node_types[on_demand[0]]
    assert spot_type.resources == fallback.resources
    assert node_configs[spot[0]]["InstanceType"] == node_configs[on_demand[0]]["InstanceType"]
    assert spot_type.priority > fallback.priority


def test_aws_nodes_get_s3_from_an_instance_profile() -> None:
    config = _load(CLUSTER / "aws.yaml")
    for name, node_type in config["available_node_types"].items():
        arn = node_type["node_config"]["IamInstanceProfile"]["Arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:instance-profile/[\w+=,.@-]+", arn), (name, arn)


def test_aws_start_commands_keep_token_auth_and_a_local_dashboard() -> None:
    config = _load(CLUSTER / "aws.yaml")
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts, key
        assert all("RAY_AUTH_MODE=token" in c for c in starts), config[key]
    (head_start,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head_start
    # Every node and the submitting laptop share one token file.
    assert "~/.ray/auth_token" in config["file_mounts"]


@pytest.mark.slow
def test_ray_aws_bootstrap_accepts_aws_yaml(s3, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `ray up` does before launching anything, against moto's EC2 and IAM."""
    import boto3
    from ray.autoscaler._private.aws.config import bootstrap_aws
    from ray.autoscaler._private.util import prepare_config

    # Ray writes the key pair it creates to ~/.ssh.
    monkeypatch.setenv("HOME", str(tmp_path))
    config = _load(CLUSTER / "aws.yaml")
    zones = config["provider"]["availability_zone"].split(",")
    ec2 = boto3.client("ec2", region_name=config["provider"]["region"])
    subnet_zones = {s["SubnetId"]: s["AvailabilityZone"] for s in ec2.describe_subnets()["Subnets"]}

    bootstrapped = bootstrap_aws(prepare_config(config))
    for name, node_type in bootstrapped["available_node_types"].items():
        node_config = node_type["node_config"]
        assert {subnet_zones[s] for s in node_config["SubnetIds"]} <= set(zones), name
        assert node_config["SecurityGroupIds"], name
        assert node_config["IamInstanceProfile"] == config["available_node_types"][name]["node_config"]["IamInstanceProfile"]


def test_local_autoscaler_is_fake_multinode_on_loopback() -> None:
    from ray.autoscaler._private.fake_multi_node.node_provider import FAKE_HEAD_NODE_TYPE

    config = _load(CLUSTER / "local-autoscaler.yaml")
    assert config["provider"]["type"] == "fake_multinode"
    assert config["provider"]["gcs_address"].startswith("127.0.0.1:")
    # The fake provider tags its head with a fixed type name.
    assert config["head_node_type"] == FAKE_HEAD_NODE_TYPE
    assert config["available_node_types"][FAKE_HEAD_NODE_TYPE]["resources"] == {"CPU": 0}
    workers = {n: t for n, t in config["available_node_types"].items() if n != FAKE_HEAD_NODE_TYPE}
    assert workers and all(t["min_workers"] == 0 and 1 <= t["max_workers"] <= 3 for t in workers.values())
    # Short enough that tests/cluster/test_autoscaler.py sees idle nodes go.
    assert config["idle_timeout_minutes"] <= 1


# --- KubeRay manifests ----------------------------------------------------


def _cluster_spec(name: str) -> dict:
    doc = _load(KUBERAY / name)
    return doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]


@pytest.mark.parametrize("name", sorted(p.name for p in KUBERAY.glob("*.yaml")))
def test_kuberay_manifest_has_api_version_kind_and_name(name: str) -> None:
    docs = [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d is not None]
    assert docs
    for doc in docs:
        assert doc["apiVersion"] in ("ray.io/v1", "v1"), doc["apiVersion"]
        assert doc["kind"] in ("RayCluster", "RayJob", "ServiceAccount"), doc["kind"]
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
        if doc["kind"] in ("RayCluster", "RayJob"):
            assert doc["apiVersion"] == "ray.io/v1"


@pytest.mark.parametrize("name", CLUSTER_SPECS)
def test_kuberay_cluster_spec_has_what_kuberay_requires(name: str) -> None:
    spec = _cluster_spec(name)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["authOptions"] == {"mode": "token"}
    head = spec["headGroupSpec"]
    # rayStartParams values are strings in the CRD.
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert head["serviceType"] == "ClusterIP"
    groups = spec["workerGroupSpecs"]
    assert len({g["groupName"] for g in groups}) == len(groups)
    for group in [head, *groups]:
        pod = group["template"]["spec"]
        assert pod["containers"][0]["image"]
        assert pod["serviceAccountName"] == "segray-s3"
    for group in groups:
        assert isinstance(group["rayStartParams"], dict)
        assert 0 == group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
    gpu_limits = [g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu") for g in groups]
    assert any(gpu_limits) and not all(gpu_limits), gpu_limits


@pytest.mark.parametrize("name", CLUSTER_SPECS)
def test_kuberay_autoscaler_reads_the_cluster_spec(name: str) -> None:
    spec = _cluster_spec(name)
    ray_cr = {"metadata": {"name": "segray", "namespace": "default"}, "spec": spec}
    # What the autoscaler sidecar does with the RayCluster; validates the result.
    config = _derive_autoscaling_config_from_ray_cr(ray_cr)
    types = config["available_node_types"]
    assert types.pop("headgroup")["resources"]["CPU"] == 0
    assert types["gpu"]["resources"]["GPU"] == 1
    assert "GPU" not in types["cpu"]["resources"] and types["cpu"]["resources"]["CPU"] > 0
    assert config["idle_timeout_minutes"] == spec["autoscalerOptions"]["idleTimeoutSeconds"] / 60


def test_service_account_carries_an_irsa_role() -> None:
    account = _load(KUBERAY / "serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "segray-s3"
    role = account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
    assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@-]+", role), role


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_embeds_the_raycluster_spec(name: str) -> None:
    assert _cluster_spec(name) == _cluster_spec("raycluster.yaml")


@pytest.mark.parametrize("name", RAYJOBS)
def test_rayjob_runs_one_job_and_cleans_up(name: str) -> None:
    job = _load(KUBERAY / name)
    spec = job["spec"]
    assert job["kind"] == "RayJob"
    assert spec["entrypoint"].strip()
    assert spec["shutdownAfterJobFinishes"] is True
    # A job makes its own cluster or targets one, not both.
    assert "rayClusterSpec" in spec and "clusterSelector" not in spec
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= RuntimeEnv.known_fields
    RuntimeEnv(**runtime_env)
    assert runtime_env["env_vars"] == _load(CLUSTER / "runtime_env.yaml")["env_vars"]


@pytest.mark.parametrize(("name", "job_file"), [("rayjob-train.yaml", "jobs/train.py"), ("rayjob-predict.yaml", "jobs/predict.py")])
def test_rayjob_entrypoint_runs_a_job_file_installed_by_the_image(name: str, job_file: str) -> None:
    argv = shlex.split(_load(KUBERAY / name)["spec"]["entrypoint"])
    assert argv[0] == "python"
    assert argv[1] == f"{_image_install_dir()}/{job_file}", argv[1]
    flags = [a.split("=", 1)[0] for a in argv[2:] if a.startswith("--")]
    assert flags
    # Before jobs/ holds scripts only the path format is checked; after that
    # the file must exist and its --help must list every flag used.
    if not any((REPO / "jobs").glob("*.py")):
        return
    assert (REPO / job_file).is_file(), f"{job_file} is missing"
    usage = subprocess.run(
        [sys.executable, str(REPO / job_file), "--help"], capture_output=True, text=True, timeout=120
    )
    assert usage.returncode == 0, usage.stderr
    accepted = set(re.findall(r"--[a-z][-a-z0-9]*", usage.stdout))
    assert not set(flags) - accepted, f"{job_file} does not accept {sorted(set(flags) - accepted)}"


# --- runtime env, Dockerfile ------------------------------------------------


def test_runtime_env_is_one_ray_accepts() -> None:
    runtime_env = _load(CLUSTER / "runtime_env.yaml")
    assert set(runtime_env) <= RuntimeEnv.known_fields
    assert "working_dir" not in runtime_env  # given by `--working-dir .`
    RuntimeEnv(**runtime_env)  # raises on a wrong type, e.g. a non-string env var
    assert runtime_env["env_vars"]["TF_CPP_MIN_LOG_LEVEL"] == "3"


def test_runtime_env_excludes_keep_the_package_and_drop_tests() -> None:
    excluded = _get_excludes(REPO, _load(CLUSTER / "runtime_env.yaml")["excludes"])
    for kept in ("pyproject.toml", "segray/__init__.py", "jobs/train.py"):
        assert not excluded(REPO / kept), kept
    for dropped in (".git/HEAD", "tests/conftest.py", "tests/data/README.md", "segray/__pycache__/x.pyc"):
        assert excluded(REPO / dropped), dropped


def _image_install_dir() -> str:
    (workdir,) = re.findall(r"^WORKDIR (/opt/\S+)$", (CLUSTER / "Dockerfile").read_text(), re.M)
    return workdir


def test_dockerfile_copies_files_that_exist_and_installs_segray() -> None:
    dockerfile = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", dockerfile, re.M)
    assert base and base.group(1).startswith(ray.__version__ + "-") and base.group(1).endswith("-gpu")
    copies = re.findall(r"^COPY (?:--\S+ )*(.+) \S+$", dockerfile, re.M)
    sources = [s for line in copies for s in line.split()]
    assert {"pyproject.toml", "segray", "jobs"} <= set(sources)
    # pyproject.toml names README.md as the readme: `pip install` needs it.
    missing = [s for s in sources if not (REPO / s).exists()]
    assert not missing, f"Dockerfile copies {missing}, absent from the repository"
    assert re.search(rf"pip install .*{re.escape(_image_install_dir())}\b", dockerfile)


# --- no credentials anywhere in cluster/ ------------------------------------

CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS key setting": re.compile(r"(?i)aws_(secret_access_key|access_key_id|session_token)"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    # Ray's tokens are 64 hex digits (secrets.token_hex(32)).
    "hex token": re.compile(r"\b[0-9a-f]{64}\b"),
    "literal Ray token": re.compile(r"RAY_AUTH_TOKEN[\"']?\s*(=|:|\n\s*value:)\s*[\"']?[A-Za-z0-9+/]{16,}"),
    "password or secret value": re.compile(r"(?i)\b(password|secret)[\"']?\s*[:=]\s*[\"']?[^\s\"'{}]{8,}"),
}


def _credential_findings(text: str) -> list[str]:
    return [name for name, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(text)]


@pytest.mark.parametrize(
    "planted",
    [
        "AKIA" + "IOSFODNN7EXAMPLE",
        "aws_secret_access_" + "key = abc",
        "-----BEGIN RSA PRIVATE " + "KEY-----",
        "RAY_AUTH_TOKEN=" + "c2VjcmV0LXRva2VuLXZhbHVl",
        "- name: RAY_AUTH_TOKEN\n  value: " + "c2VjcmV0LXRva2VuLXZhbHVl",
        "password: " + "hunter2hunter2",
        "0123456789abcdef" * 4,
    ],
)
def test_credential_scan_finds_planted_secrets(planted: str) -> None:
    assert _credential_findings(f"env:\n  {planted}\n")


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in CLUSTER.rglob("*") if p.is_file()))
def test_cluster_file_holds_no_credential(path: str) -> None:
    assert _credential_findings((REPO / path).read_text()) == [], path
