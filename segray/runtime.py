"""The process around the jobs: connecting to Ray, quiet logs, CPU priority.

Quiet by default: a user sees segray's own lines, progress bars, one line per
epoch, the result tables and real warnings. TensorFlow's start-up notices
(oneDNN, "Could not find cuda drivers", ``failed call to cuInit``) and Ray's
INFO chatter (execution plans, Train's worker-group lines) are silenced in the
driver and, through the runtime environment Ray is started or joined with, in
every Ray worker of the job, on a cluster too. ``quiet_logging(verbose=True)``
(``--verbose``) leaves everything as Ray and TensorFlow print it.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import json
import logging
import os
import re
import sys
import tempfile
import warnings

# Set in every Ray worker of the job. A value exported in the driver's environment is passed on
# instead (TF_CPP_MIN_LOG_LEVEL=0 segray ... shows everything); one the submitted job's
# runtime_env sets is left to the job, since ray.init raises on an env var set by both.
QUIET_WORKER_ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TF C++ logs once absl is up: cpu_feature_guard (I), 'failed call to cuInit' (E)
    "RAY_DATA_LOG_LEVEL": "WARNING",  # ray.data INFO in workers: 'Dataset ... execution finished', per split and epoch
}
# What TensorFlow's shared libraries print while `import tensorflow` runs, before absl logging is
# initialised; no environment variable reaches these (TF_CPP_MIN_LOG_LEVEL, GLOG_* do not).
_TF_IMPORT_NOISE = re.compile(
    r"All log messages before absl::InitializeLog\(\) is called"
    r"|port\.cc:\d+\] oneDNN custom operations are on"
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers"
)


@contextlib.contextmanager
def _without_tf_import_noise():
    """Sends fd 2 to a temporary file meanwhile, then writes back every line that is not known noise."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            for line in tmp.read().decode(errors="replace").splitlines(keepends=True):
                if not _TF_IMPORT_NOISE.search(line):
                    sys.stderr.write(line)
            sys.stderr.flush()


class _QuietTensorflowImport(importlib.abc.MetaPathFinder):
    """Runs the first `import tensorflow` of the process inside _without_tf_import_noise."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        real = spec.loader

        class _Loader(importlib.abc.Loader):
            def create_module(self, spec):
                return real.create_module(spec)

            def exec_module(self, module):
                with _without_tf_import_noise():
                    real.exec_module(module)

        spec.loader = _Loader()
        return spec


def setup_worker() -> None:
    """Ray's worker_process_setup_hook for every worker of a segray job: pin the Ray address, quiet the logs.

    Ray's own helpers inside workers (Train's placement-group cleaner asks the
    state API whether its controller lives) find "their" Ray by looking for
    local instances, and fail with "Found multiple active Ray instances" when
    a machine runs two (a notebook's and a CLI's). Pinning ``RAY_ADDRESS`` in
    the worker to the Ray it belongs to removes the guess.
    """
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        try:
            os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
        except Exception:  # noqa: BLE001 - not connected: nothing to pin
            pass
    if os.environ.get(VERBOSE_ENV) != "1":
        quiet_process()


VERBOSE_ENV = "SEGRAY_VERBOSE"


def quiet_process() -> None:
    """Quiets TensorFlow and Ray's INFO chatter in this process: the driver, and every Ray worker
    of the job (ray.init's worker_process_setup_hook). Warnings and errors still show."""
    import ray
    from ray.util.debug import log_once

    # 'INFO:tensorflow:Using MirroredStrategy ...', twice each: TF's own handler and the root
    # logger Ray Train sets to INFO in its workers.
    logging.getLogger("tensorflow").setLevel(logging.WARNING)
    # 'Reporting training result N: TrainingReport(...)' at INFO, on a logger Ray names by file path
    # (ray/train/v2/_internal/execution/context.py), out of reach of RunConfig's LoggingConfig.
    train_context = os.path.join(os.path.dirname(ray.__file__), "train", "v2", "_internal", "execution", "context.py")
    logging.getLogger(train_context).setLevel(logging.WARNING)
    # 'Progress bars disabled ...': segray turns Ray Data's bars off in Train workers on purpose.
    log_once("ray_data_progress_manager_disabled")
    # Ray Train's own DataConfig passes the deprecated argument; nothing for us to change.
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated")
    quiet_tensorflow_import()


def quiet_tensorflow_import() -> None:
    """Filters TensorFlow's import-time lines out of this process's stderr, unless TF_CPP_MIN_LOG_LEVEL is 0."""
    if (
        "tensorflow" not in sys.modules
        and os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0") not in ("", "0")
        and not any(isinstance(f, _QuietTensorflowImport) for f in sys.meta_path)
    ):
        sys.meta_path.insert(0, _QuietTensorflowImport())


def _job_runtime_env() -> dict:
    """The runtime_env `ray job submit` gave this driver; ray.init merges its own into it."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return (json.loads(raw).get("runtime_env") or {}) if raw else {}


_VERBOSE = False


def quiet_logging(verbose: bool = False) -> None:
    """Chooses, before Ray or TensorFlow start, between quiet output (the default) and everything."""
    global _VERBOSE
    _VERBOSE = verbose
    if not verbose:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", QUIET_WORKER_ENV["TF_CPP_MIN_LOG_LEVEL"])
        quiet_tensorflow_import()


def is_verbose() -> bool:
    return _VERBOSE


def _setup_hook(job: dict) -> dict:
    """The worker setup hook, unless the submitted job brought its own (Ray allows one)."""
    if "worker_process_setup_hook" in job or "__RAY_WORKER_PROCESS_SETUP_HOOK_ENV_VAR" in (job.get("env_vars") or {}):
        return {}
    return {"worker_process_setup_hook": f"{__name__}.setup_worker"}


def init_ray(num_cpus: int | None = None) -> None:
    """Joins the cluster in ``RAY_ADDRESS`` (set by ``ray job submit``) or starts a local one."""
    import ray

    if ray.is_initialized():
        return
    job = _job_runtime_env()
    if _VERBOSE:
        runtime_env = {"env_vars": {VERBOSE_ENV: "1"}, **_setup_hook(job)}
        kwargs = {"num_cpus": num_cpus} if num_cpus and not os.environ.get("RAY_ADDRESS") else {}
        ray.init(log_to_driver=True, runtime_env=runtime_env, **kwargs)
        ray.data.DataContext.get_current().enable_progress_bars = True
        return
    job_env_vars = job.get("env_vars") or {}
    env_vars = {k: os.environ.get(k, v) for k, v in QUIET_WORKER_ENV.items() if k not in job_env_vars}
    # The driver imports TensorFlow too (segray.training builds the model); before that import.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", env_vars.get("TF_CPP_MIN_LOG_LEVEL", "3"))
    runtime_env: dict = {"env_vars": env_vars} if env_vars else {}
    runtime_env.update(_setup_hook(job))
    quiet_process()
    kwargs = {
        "log_to_driver": True,
        "logging_level": logging.WARNING,  # 'Started a local Ray instance. View the dashboard at ...'
        "runtime_env": runtime_env or None,
    }
    if not os.environ.get("RAY_ADDRESS") and num_cpus:
        kwargs["num_cpus"] = num_cpus
    ray.init(**kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.print_on_execution_start = False  # 'Starting execution of Dataset ...' / 'Execution plan of Dataset ...'
    if sys.stdout.isatty():
        # A terminal has the bars; the driver's ray.data INFO lines would only repeat them ('Dataset ...
        # execution finished') or advertise the rich UI. Not on a pipe or in a job's log: there Ray
        # Data's progress is those INFO lines. ray-data.log in the session folder keeps everything.
        for handler in logging.getLogger("ray.data").handlers:
            if handler.get_name() == "console":
                handler.setLevel(logging.WARNING)


# Ray Data reads and decodes beside the training workers or predictor actors;
# without a CPU of its own it never gets one and the job waits forever
# ("Cluster resources are not enough to run any task").
DATA_PIPELINE_CPUS = 1

# Ray retries a failed task forever by default. A bad file never fails a task
# (it becomes an error row with its reason); what still does (a lost node,
# storage down) is retried this many times, then the job stops and says so.
TASK_RETRIES = 3


@contextlib.contextmanager
def bounded_retries():
    """Yields the map-task options that retry a task ``TASK_RETRIES`` times, not forever.

    Ray Data 2.60 takes a retry count only through ``ray_remote_args``, which
    it deprecates in favour of named parameters that have none; its warning
    is silenced for these calls alone.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        yield {"max_retries": TASK_RETRIES}


def local_cpus(needed: float) -> int:
    """CPUs to start a local Ray with: the machine's, or enough logical ones for the job to run at all."""
    return max(os.cpu_count() or 1, int(-(-needed // 1)))


def local_gpus() -> float:
    """GPUs on this machine (what a local Ray would find), without starting Ray.

    Ray 2.60 has no public call for this (``ray.cluster_resources`` needs a
    running Ray); this and ``cluster_limits`` are segray's only uses of
    ``ray._private`` (tests/test_architecture.py holds them to that).
    """
    try:
        from ray._private.accelerators import get_accelerator_manager_for_resource

        return float(get_accelerator_manager_for_resource("GPU").get_current_node_num_accelerators())
    except Exception:  # noqa: BLE001 - no way to count: assume none
        return 0.0


def cluster_limits() -> dict[str, float] | None:
    """The most CPUs and GPUs the joined cluster's autoscaler may ever give (its node types x their max counts).

    None when the cluster publishes no autoscaling config (a fixed cluster,
    or nodes joined by hand): then no limit is known. Ray Train checks its
    workers against the same numbers (``get_max_resources_from_cluster_config``).
    """
    try:
        from ray._private.state import state as ray_state

        limits = ray_state.get_max_resources_from_cluster_config()
    except Exception:  # noqa: BLE001 - a Ray without the call: no limit known
        return None
    return {k: float(v) for k, v in limits.items()} if limits else None


def check_fits(cpus: float, gpus: float, field: str, what: str) -> None:
    """Refuses at once a job this Ray can never run, naming what it needs and what there is.

    A local Ray is measured as it is. On a cluster joined through
    ``RAY_ADDRESS`` a busy cluster is never refused (it frees up, and an
    autoscaler may add nodes); only a job larger than the most the
    autoscaler may ever give (``cluster_limits``) is refused.

    Raises:
        ConfigError: more CPUs or GPUs than the Ray has, or can ever have.
    """
    import ray

    from segray.config import ConfigError

    if os.environ.get("RAY_ADDRESS"):
        limits = cluster_limits()
        if limits is None:
            return
        have_cpus, have_gpus = limits.get("CPU", 0.0), limits.get("GPU", 0.0)
        where = "this cluster's autoscaler can give at most"
        advice = "or raise the node types' max_workers in the cluster config"
    else:
        total = ray.cluster_resources()
        have_cpus, have_gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
        where = "this Ray has"
        advice = "or start Ray with more CPUs"
    if cpus > have_cpus:
        raise ConfigError(
            f"{field}: {what} needs {cpus:g} CPUs ({DATA_PIPELINE_CPUS} of them for the data pipeline), "
            f"{where} {have_cpus:g}; lower `{field}` {advice}",
            field=field,
        )
    if gpus > have_gpus:
        raise ConfigError(f"{field}: {what} needs {gpus:g} GPUs, {where} {have_gpus:g}; lower `{field}` {advice}", field=field)


def normal_priority() -> int:
    """Brings every thread of this process back to niceness 0; returns how many moved.

    Ray starts its worker processes at niceness 15 (``RAY_worker_niceness``), so
    that the raylet and GCS stay responsive. A CPU training worker at 15 loses
    its cores to every nice-0 process that wakes up; on a 2-core machine that
    cost a one-worker run a quarter of the plain loop's speed. Lowering
    niceness needs ``CAP_SYS_NICE`` (or an ``RLIMIT_NICE`` that allows it);
    without it the worker keeps Ray's niceness and nothing else changes.
    Linux keeps niceness per thread, hence the walk over ``/proc/self/task``;
    threads started later (TensorFlow's pools, data prefetch) inherit it.
    """
    if not hasattr(os, "setpriority"):
        return 0
    try:
        threads = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        threads = [0]  # not Linux: the calling process
    moved = 0
    for tid in threads:
        try:
            if os.getpriority(os.PRIO_PROCESS, tid) > 0:
                os.setpriority(os.PRIO_PROCESS, tid, 0)
                moved += 1
        except (PermissionError, ProcessLookupError):
            pass
    return moved


# CPU instruction sets that compute bfloat16 natively (Intel Cooper Lake and
# later, AMD Zen 4 and later: AVX-512 BF16; Sapphire Rapids: AMX). Without
# them TensorFlow emulates bfloat16 (converting to float32 to compute): no gain, so training stays float32.
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this machine's CPU computes bfloat16 natively (see ``BF16_CPU_FLAGS``); False where ``cpuinfo`` is unreadable."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    return any(flag in line.split() for flag in BF16_CPU_FLAGS)
    except OSError:
        pass
    return False
