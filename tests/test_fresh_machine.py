"""The README's test command is the one CI runs, and it installs what the tests need before running them.

Before, the README said ``pip install -e '.[test]' && python3 -m pytest -q
tests``: on a machine without Chromium the report tests failed, since only
``.ci/run`` installed it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CI_RUN = ROOT / ".ci" / "run"


def fresh_machine_commands() -> list[str]:
    """The indented command lines of the README's "On a fresh machine" section."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## On a fresh machine"):]
    section = section[: section.index("\n## ", 1)]
    return [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]


def test_the_readme_test_command_is_the_one_ci_runs():
    commands = fresh_machine_commands()
    tests = [c for c in commands if "pytest" in c or ".ci/run" in c]
    assert tests == ["bash .ci/run"], commands
    assert os.access(CI_RUN, os.X_OK)


def run_on_a_bare_machine(tmp_path: Path, *args: str, chromium: bool = False, azurite: bool = False) -> list[str]:
    """``.ci/run`` with a PATH of recording stand-ins for python3, apt-get, npm and sudo; returns the commands it ran, in order."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(parents=True)
    for tool in ("dirname", "id", "env"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    record = f'#!{shutil.which("bash")}\necho "${{0##*/}} $*" >> {log}\n'
    for name in ("python3", "apt-get", "npm", *(["chromium"] if chromium else []), *(["azurite-blob"] if azurite else [])):
        (bin_dir / name).write_text(record)
        (bin_dir / name).chmod(0o755)
    (bin_dir / "sudo").write_text(record + 'exec "$@"\n')
    (bin_dir / "sudo").chmod(0o755)
    done = subprocess.run([shutil.which("bash"), str(CI_RUN), *args], env={"PATH": str(bin_dir)}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [line for line in log.read_text().splitlines() if not line.startswith("sudo ")]


def test_ci_run_installs_chromium_before_the_tests_and_passes_arguments_to_pytest(tmp_path):
    ran = run_on_a_bare_machine(tmp_path / "bare")
    assert ran[0].startswith("python3 -m pip install") and "-e .[test]" in ran[0], ran
    assert [re.sub(r"\s+", " ", c) for c in ran[1:]] == [
        "apt-get update -qq", "apt-get install -y -qq chromium", "npm install -g --silent --no-fund --no-audit azurite@3",
        "python3 -m pytest -q tests",
    ], ran
    # Chromium and Azurite there already: nothing installed; arguments go to pytest.
    ran = run_on_a_bare_machine(tmp_path / "ready", "tests/export", "-k", "card", chromium=True, azurite=True)
    assert ran[1:] == ["python3 -m pytest -q tests/export -k card"], ran
