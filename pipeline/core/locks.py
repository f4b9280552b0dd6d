"""Exclusive lock files that work on local disks and shared cluster filesystems.

A lock is a file created with O_CREAT|O_EXCL (atomic on POSIX filesystems and NFSv3+) holding
the owner's host, pid and start time. A heartbeat thread touches it, so a lock whose owner died
is recognised as stale: on the same host when the pid is gone, on another host when the file
has not been touched for ``stale_after_s``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path


class LockHeld(RuntimeError):
    """Another live process holds the lock; the message says who and how to recover."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a killed process whose parent died stays a zombie until init reaps it, and a container's
    # pid 1 often never does: signal 0 still succeeds, but the owner is gone
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): trust the signal
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")


def _slurm_job() -> str | None:
    """Who this process is in Slurm: job (``<array job>_<task>`` for arrays), step and rank.

    All three survive a requeue, and concurrent ranks or steps of one job differ in them.
    """
    job = os.environ.get("SLURM_JOB_ID")
    array_job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and task:
        job = f"{array_job}_{task}"
    if not job:
        return None
    return f"{job}.{os.environ.get('SLURM_STEP_ID', 'batch')}.{os.environ.get('SLURM_PROCID', '0')}"


class FileLock:
    """``with FileLock(path): ...`` or ``acquire()``/``release()``; raises :class:`LockHeld`."""

    def __init__(self, path: str | Path, *, stale_after_s: float = 900.0, heartbeat_s: float = 30.0,
                 wait_s: float = 0.0):
        self.path = Path(path)
        self.stale_after_s = stale_after_s
        self.heartbeat_s = heartbeat_s
        self.wait_s = wait_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False

    def owner(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _is_stale(self) -> bool:
        try:
            age_s = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        info = self.owner()
        if info is None:
            # a lock file with no readable owner was torn by a crash right after creation
            return age_s > 5.0
        if info.get("host") == socket.gethostname():
            return not _pid_alive(int(info.get("pid", -1)))
        if info.get("slurm_job") and info.get("slurm_job") == _slurm_job():
            # Slurm runs one instance of a job at a time: the holder is this very task before a requeue
            return True
        return age_s > self.stale_after_s

    def _try_create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        info = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "slurm_job": _slurm_job()}
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
            fh.flush()
            os.fsync(fh.fileno())
        return True

    def acquire(self) -> FileLock:
        deadline = time.monotonic() + self.wait_s
        while True:
            if self._try_create():
                break
            if self._is_stale():
                # move the stale lock aside under a unique name: of two processes that both saw
                # it stale, only one rename succeeds, and only then does either retry create
                aside = self.path.with_name(f"{self.path.name}.stale-{os.getpid()}-{time.time_ns()}")
                try:
                    os.replace(self.path, aside)
                    aside.unlink(missing_ok=True)
                except FileNotFoundError:
                    pass
                continue
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            raise self._held_error()
        self.held = True
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()
        return self

    def _held_error(self) -> LockHeld:
        info = self.owner() or {}
        return LockHeld(
            f"{self.path} is held by host {info.get('host', '?')} pid {info.get('pid', '?')} "
            f"since {time.ctime(info.get('started', 0))}; another job is working on it. If that "
            f"job is dead on another host, the lock expires after {self.stale_after_s:.0f} s "
            f"without heartbeat, or remove the file by hand."
        )

    def check_free(self, grace_s: float = 3.0) -> None:
        """Raise :class:`LockHeld` if a live owner holds the lock, without taking it: a launcher
        refuses a second job at once instead of after starting its processes (the ranks still take
        the lock itself, so this only narrows the window). ``grace_s`` covers an owner that was just
        killed and is still being torn down (a SIGKILLed process group takes ~1 s to be reaped)."""
        deadline = time.monotonic() + grace_s
        while self.path.exists() and not self._is_stale():
            if time.monotonic() >= deadline:
                raise self._held_error()
            time.sleep(0.1)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        if not self.held:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        info = self.owner()
        if info and info.get("pid") == os.getpid() and info.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
