"""The system-package check `make test`, `make demo` and .ci/run start with (pipeline/tools/sysdeps.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.tools import sysdeps

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "pipeline" / "tools" / "sysdeps.py"


def _bin(tmp_path: Path, *names: str) -> Path:
    """A new PATH folder holding stand-in executables ``names`` (and nothing else)."""
    folder = tmp_path / "-".join(("bin", *names))
    folder.mkdir()
    for name in names:
        exe = folder / name
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    return folder


def _run(path: Path, *args: str) -> subprocess.CompletedProcess:
    # the system interpreter by absolute path: the check must run before any venv exists
    return subprocess.run([sys.executable, str(SCRIPT), *args], env={**os.environ, "PATH": str(path)},
                          capture_output=True, text=True, timeout=60)


def test_missing_espeak_stops_within_seconds_with_the_exact_command(tmp_path: Path) -> None:
    folder = _bin(tmp_path, "apt-get")  # a Debian machine without espeak-ng; --check never calls apt-get
    start = time.monotonic()
    proc = _run(folder, "--check")
    assert proc.returncode == 1 and time.monotonic() - start < 30
    espeak = [d for d in sysdeps.REQUIRED if d.package == "espeak-ng"]
    assert f"install with: {sysdeps.install_command(espeak, sudo=os.geteuid() != 0)}" in proc.stderr
    assert "missing system package espeak-ng" in proc.stderr


def test_present_packages_pass_and_optional_ones_only_note(tmp_path: Path) -> None:
    proc = _run(_bin(tmp_path, "espeak-ng", "ffmpeg"), "--check")
    assert proc.returncode == 0 and proc.stderr == ""
    proc = _run(_bin(tmp_path, "espeak-ng"), "--check")  # ffmpeg: mp3 input only, no test needs it
    assert proc.returncode == 0 and "ffmpeg is not installed" in proc.stderr


def test_make_test_and_demo_check_system_packages_before_the_venv() -> None:
    if shutil.which("make") is None:
        pytest.fail("make is needed for `make test` / `make demo`: apt-get install make", pytrace=False)
    for target in ("test", "demo"):
        # -n: print the commands without running them; -B: as on a fresh clone (venv not yet built)
        lines = subprocess.run(["make", "-n", "-B", "-C", str(REPO), target], capture_output=True, text=True,
                               check=True).stdout.splitlines()
        commands = [line for line in lines if line and not line.startswith(("make", "#"))]
        assert commands[0].endswith("pipeline/tools/sysdeps.py"), commands[:3]
        assert any("-m venv" in c for c in commands[1:]), target
