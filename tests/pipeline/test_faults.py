"""Crash points and the resume drill, on a tiny command that commits one file durably."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.faults import CrashSpec, crash_chain, random_passages, read_trace

REPO = Path(__file__).resolve().parents[2]
# writes a.txt then b.txt (skipping what exists: "resume"), through the durable write path
WRITER = ("from pathlib import Path\nfrom pipeline.core.durable import atomic_write_text\n"
          "for name in ('a.txt', 'b.txt'):\n"
          "    if not Path(name).exists():\n"
          "        atomic_write_text(name, name * 1000)\n")


def test_spec_parsing_and_matching() -> None:
    assert CrashSpec.parse("12") == CrashSpec(None, "*", 12)
    spec = CrashSpec.parse("after-rename-dir:shard-0000*#2")
    assert (spec.point, spec.target, spec.nth) == ("after-rename-dir", "shard-0000*", 2)
    assert spec.matches("after-rename-dir", "shard-00001-of-00004")
    assert not spec.matches("after-rename-dir", "shard-00010-of-00020") and not spec.matches("before-rename", "x")
    for bad, why in (("rename", "unknown crash point"), ("before-rename#x", "positive integer")):
        with pytest.raises(ValueError, match=why):
            CrashSpec.parse(bad)
    assert random_passages(30, 3, seed=1) == random_passages(30, 3, seed=1) != random_passages(30, 3, seed=2)
    assert all(1 <= int(n) <= 15 for n in random_passages(30, 5, seed=0))


def test_crash_chain_kills_at_each_point_and_the_last_run_completes(tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", WRITER]
    env = {"PYTHONPATH": str(REPO), "AE3_CRASH_TRACE": str(tmp_path / "trace.txt"), "PATH": "/usr/bin:/bin"}
    runs = crash_chain(cmd, ["before-rename:a.txt", "after-rename:b.txt", "3"], tmp_path / "logs",
                       cwd=tmp_path, env=env)
    assert [r.returncode for r in runs] == [-9, -9, 0, 0]  # "3": only 2 passages remain, not reached
    assert (tmp_path / "a.txt").read_text() == "a.txt" * 1000 and (tmp_path / "b.txt").read_text() == "b.txt" * 1000
    assert not list(tmp_path.glob(".*.tmp"))  # the first run's temp file is gone with the retried write
    assert read_trace(tmp_path / "trace.txt") == [
        ("before-rename", "a.txt"),  # run 0 dies here
        ("before-rename", "a.txt"), ("after-rename", "a.txt"), ("before-rename", "b.txt"),
        ("after-rename", "b.txt"),  # run 1 dies here, after the rename: b.txt is in place
    ]


def test_drill_cli(tmp_path: Path) -> None:
    drill = [sys.executable, "-m", "pipeline.core.faults", "--logs", str(tmp_path / "logs")]
    ok = subprocess.run([*drill, "--crash", "after-rename:a.txt", "--", sys.executable, "-c", WRITER],
                        cwd=tmp_path, capture_output=True, text=True, env={"PYTHONPATH": str(REPO)})
    assert ok.returncode == 0, ok.stderr
    assert "after-rename:a.txt" in ok.stdout and "killed" in ok.stdout and (tmp_path / "b.txt").exists()
    typo = subprocess.run([*drill, "--crash", "after-renam", "--", "true"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO)})
    assert typo.returncode == 2 and "unknown crash point 'after-renam'" in typo.stderr
