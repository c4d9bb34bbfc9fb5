"""`segray demo` as a new user runs it: the real CLI at the machine's real core count, quiet by default."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

# What a user may see, by kind; every printed line must be one of them.
KINDS = {
    "step": r"^\[\d/4\] ",
    "dataset": r"^(dataset: |  layout |  splits: |  mean \[|  pixel frequency|    \w+ +\d+\.\d\d%)",
    "epoch line": r"epoch \d+/\d+: train loss [\d.]+ mIoU",
    "history table": r"^ +(epoch +train_loss|\d+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d.]+$)",
    "best": r"^  best val mIoU ",
    "per-class table": r"^( id  class|-{20,}| +\d  \w+ +[\d.-]+| +mean of \d valid)",
    "scores": r"^mIoU [\d.]+  mean Dice",
    "where": r"^(results: |demo done in )",
    "progress": r"(it/s\]|logging_progress\.py|Progress will be logged|execution finished in|✔️)",
    "warning": r"(WARNING|UserWarning|core_worker\.cc:\d+: Actor with class name)",
}
NOISE = r"(oneDNN|cuda drivers|cuInit|absl::InitializeLog|INFO:tensorflow|Execution plan|Starting execution|Started a local Ray|cpu_feature_guard)"


def kind_of(line: str) -> str | None:
    for kind, pattern in KINDS.items():
        if re.search(pattern, line):
            return kind
    return None


@pytest.fixture
def another_local_ray():
    """A second Ray on this machine, as a notebook's would be: Ray's helpers must not mistake it for the demo's."""
    code = "import ray, time; ray.init(num_cpus=1, include_dashboard=False); print('up', flush=True); time.sleep(900)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout.readline().strip() == "up"
    yield
    proc.kill()
    proc.wait()


@pytest.mark.slow
def test_demo_prints_segray_lines_only(tmp_path, another_local_ray):
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "RAY_ADDRESS")}
    done = subprocess.run(
        [sys.executable, "-m", "segray.cli", "demo", "--dir", str(tmp_path / "demo"), "--n", "48", "--epochs", "2"],
        capture_output=True, text=True, timeout=900, env=env,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    kinds: dict[str, int] = {}
    unknown = []
    for line in lines:
        kind = kind_of(line)
        kinds[kind or "unknown"] = kinds.get(kind or "unknown", 0) + 1
        if kind is None:
            unknown.append(line)
    noisy = [line for line in lines if re.search(NOISE, line)]
    assert not noisy, "start-up noise printed:\n" + "\n".join(noisy[:20])
    assert not unknown, f"lines of no known kind ({kinds}):\n" + "\n".join(unknown[:30])
    assert kinds["step"] == 4 and kinds["epoch line"] == 2 and kinds["scores"] == 1, kinds
    # About 400 lines before segray quieted its workers; what is left is segray's own output.
    assert len(lines) < 100, kinds


@pytest.mark.slow
def test_verbose_shows_what_quiet_hides(tmp_path):
    from segray.data import synthesize

    synthesize(str(tmp_path / "raw"), n=8, size=(16, 16), seed=0, show_progress=False)
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "RAY_ADDRESS")}
    outputs = {}
    for flags in ([], ["--verbose"]):
        dst = str(tmp_path / f"ds{len(flags)}")
        done = subprocess.run(
            [sys.executable, "-m", "segray.cli", "ingest", str(tmp_path / "raw"), dst, *flags],
            capture_output=True, text=True, timeout=600, env=env,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        outputs[bool(flags)] = done.stdout + done.stderr
    assert "Execution plan" not in outputs[False] and "Execution plan" in outputs[True]
    assert "dataset: " in outputs[False] and "dataset: " in outputs[True]
