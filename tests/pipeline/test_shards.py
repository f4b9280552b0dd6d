"""Shard planning, lock files, the manifest under concurrent writers, the durable log."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys

import pytest

from pipeline.core.durable import DurableJsonl
from pipeline.core.locks import FileLock, LockHeld
from pipeline.core.manifest import Manifest, ManifestMismatch
from pipeline.core.shards import plan_shards, resolve_shard_index, run_shards


@pytest.mark.parametrize("n,k", [(0, 1), (1, 3), (10, 3), (24, 4), (7, 7)])
def test_plan_covers_every_record_once(n, k):
    shards = plan_shards(n, k)
    covered = [i for s in shards for i in range(s.start, s.stop)]
    assert covered == list(range(n))
    assert [s.name for s in shards][0] == f"shard-00000-of-{k:05d}"


def test_shard_index_from_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert resolve_shard_index(None, 4) == 2
    assert resolve_shard_index(1, 4) == 1
    with pytest.raises(ValueError, match="outside 0..3"):
        resolve_shard_index(4, 4)
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    assert resolve_shard_index(None, 4) is None


def test_lock_held_and_stale(tmp_path):
    path = tmp_path / "x.lock"
    with FileLock(path):
        with pytest.raises(LockHeld, match=f"pid {os.getpid()}"):
            FileLock(path).acquire()
    assert not path.exists()
    # a lock left by a process that died (kill -9) is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    import socket
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": 0}))
    with FileLock(path) as lock:
        assert lock.owner()["pid"] == os.getpid()


def test_lock_of_an_unreaped_zombie_is_stale(tmp_path):
    """A killed owner that nobody reaped (a container's pid 1 often never does) still answers
    signal 0; its lock must be taken over all the same, by a probe and by acquire."""
    import socket
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while open(f"/proc/{zombie.pid}/stat").read().rpartition(")")[2].split()[0] != "Z":
        pass  # exited, not yet waited for
    path = tmp_path / "x.lock"
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": zombie.pid, "started": 0}))
    os.kill(zombie.pid, 0)  # what a signal-only check sees: alive
    FileLock(path).check_free()
    with FileLock(path) as lock:
        assert lock.owner()["pid"] == os.getpid()
    zombie.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        path.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "started": 0}))
        with pytest.raises(LockHeld, match=f"pid {live.pid}"):
            FileLock(path).check_free(grace_s=0.5)
    finally:
        live.kill()
        live.wait()


def _mark(root: str, i: int) -> None:
    Manifest(root).mark_shard(i, {"status": "done", "n": i})


def test_manifest_concurrent_updates_lose_nothing(tmp_path):
    Manifest(tmp_path).init({"format": 1, "num_shards": 16}, must_match=("format", "num_shards"))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_mark, args=(str(tmp_path), i)) for i in range(16)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert sorted(int(k) for k in Manifest(tmp_path).shards()) == list(range(16))
    with pytest.raises(ManifestMismatch, match="num_shards: existing 16 vs now 8"):
        Manifest(tmp_path).init({"format": 1, "num_shards": 8}, must_match=("format", "num_shards"))


def test_run_shards_skips_done_and_busy(tmp_path):
    manifest = Manifest(tmp_path)
    manifest.init({"v": 1}, must_match=("v",))
    shards = plan_shards(6, 3)
    manifest.mark_shard(0, {"status": "done"})
    ran = []

    def process(shard):
        ran.append(shard.index)
        manifest.mark_shard(shard.index, {"status": "done"})

    with FileLock(tmp_path / "locks" / f"{shards[2].name}.lock"):
        summary = run_shards(tmp_path, shards, None, process, manifest)
        assert (summary.done, summary.skipped, summary.busy) == ([1], [0], [2])
        with pytest.raises(LockHeld):
            run_shards(tmp_path, shards, 2, process, manifest)
    assert ran == [1]


def test_durable_jsonl_drops_torn_tail(tmp_path):
    path = tmp_path / "log.jsonl"
    with DurableJsonl(path) as log:
        log.append_many([{"i": 0}, {"i": 1}])
    with open(path, "ab") as fh:
        fh.write(b'{"i": 2, "trunc')  # a crash in the middle of a write
    with DurableJsonl(path) as log:
        assert [r["i"] for r in log.read()] == [0, 1]
        log.append_many([{"i": 2}])
    assert [json.loads(x)["i"] for x in path.read_text().splitlines()] == [0, 1, 2]
