"""Durable file operations: every completed artifact is written to a temporary name, fsynced,
renamed into place, and its directory fsynced. A crash at any moment leaves either the old
file or the new one, never half of one.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pipeline.core.faults import crash_point, die, should_crash

TMP_SUFFIX = ".tmp"


def with_path(err: OSError, path: str | Path) -> OSError:
    """``err`` with the file name filled in (a failed ``write`` on an open file reports none)."""
    if err.filename is not None:
        return err
    return type(err)(err.errno, err.strerror or str(err), str(path))


def fsync_file(path: str | Path) -> None:
    """Make a file's contents durable (written by another library that did not fsync)."""
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or a new entry in ``path`` durable (a directory is fsynced like a file)."""
    fsync_file(path)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and directory under ``root`` (before renaming the tree into place)."""
    root = Path(root)
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        crash_point("before-rename", path.name)
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise with_path(err, path) from err
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    crash_point("after-rename", path.name)
    # writers of one path are serialized by a lock (manifest, shard, rank 0), so any other temp
    # file of this name is what a killed writer left behind
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*{TMP_SUFFIX}"):
        stale.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_replace_dir(tmp_dir: str | Path, final_dir: str | Path, *, synced: bool = False) -> None:
    """Move a fully written, fsynced directory into place (replacing an older one).

    ``synced=True``: the caller already made every file and directory under ``tmp_dir``
    durable, so the tree is not fsynced again (~3 ms per file even when clean).
    """
    tmp_dir, final_dir = Path(tmp_dir), Path(final_dir)
    if not synced:
        fsync_tree(tmp_dir)
    crash_point("before-rename-dir", final_dir.name)
    # old copies a killed replacement left aside (writers of one directory hold its lock)
    for stale in final_dir.parent.glob(f".{glob.escape(final_dir.name)}.old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    if final_dir.exists():
        # rename cannot replace a non-empty directory: move the old one aside first (a crash in
        # between leaves no FINAL_DIR and the old one as .FINAL_DIR.old-PID; rerun the writer)
        old = final_dir.with_name(f".{final_dir.name}.old-{os.getpid()}")
        os.replace(final_dir, old)
        crash_point("dir-swap", final_dir.name)
        os.replace(tmp_dir, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, final_dir)
    crash_point("after-rename-dir", final_dir.name)
    fsync_dir(final_dir.parent)


def build_dir(out_dir: str | Path, write: Callable[[Path], None]) -> Path:
    """Build a directory atomically: ``write(tmp)`` fills a private sibling temp dir, which is made
    readable (a shared cache: CI, other users), fsynced and renamed into place; a failure leaves
    nothing behind. Returns the absolute path. Writers of one path must hold a lock (see
    :func:`ensure_dir`)."""
    import shutil
    import tempfile

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        for path in (tmp, *tmp.rglob("*")):
            path.chmod(0o755 if path.is_dir() else 0o644)
        atomic_replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def ensure_dir(out_dir: str | Path, complete: Callable[[Path], bool], write: Callable[[Path], None]) -> Path:
    """``out_dir`` after building it with :func:`build_dir` only if ``complete(out_dir)`` is false;
    concurrent callers serialise on a lock file beside it, so one builds and the others reuse it."""
    import fcntl

    out = Path(out_dir).resolve()
    if complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return out if complete(out) else build_dir(out, write)


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DurableJsonl:
    """An append-only jsonl log that survives kill -9: each ``append_many`` is one write plus
    fsync, and ``open`` drops a torn last line left by a crash mid-write.

    Used for in-progress shards: the log holds one line per finished input record, so resume
    skips exactly the records whose line is durable.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_torn_tail()
        # unbuffered: a failed write leaves nothing behind in a buffer for close() to retry
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _truncate_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with open(self.path, "r+b") as fh:
                fh.truncate(end)
                fh.flush()
                os.fsync(fh.fileno())

    def read(self) -> Iterator[dict]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            for line in fh:
                if line.endswith(b"\n"):
                    yield json.loads(line)

    def append_many(self, rows: list[dict]) -> None:
        if not rows:
            return
        blob = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows).encode("utf-8")
        try:
            if should_crash("torn-append", self.path.name):
                self._write_all(blob[: len(blob) // 2])
                os.fsync(self._fd)
                die()
            self._write_all(blob)
            os.fsync(self._fd)
        except OSError as err:
            raise with_path(err, self.path) from err

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:  # a write near a size limit may be partial; the next one raises
            view = view[os.write(self._fd, view):]

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> DurableJsonl:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
