"""Reading back what a killed ``ShardWriter`` left behind.

A temp shard dir holds ``progress.jsonl``: a header line, then per flush the flushed samples'
index rows followed by one commit line (row counts per array, hashes of the chunks that became
durable, the name and sha256 of the tail snapshot). Only samples followed by a commit count;
later lines, chunks beyond the committed full rows, zarr's ``*.partial`` files and older tail
snapshots are dropped, so writing continues exactly where the last flush left off.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.durable import DurableJsonl, atomic_replace_dir, atomic_write_text, sha256_file
from storage.layout import CHECKSUMS_NAME, PROGRESS_NAME

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ResumeState:
    rows: list[dict[str, Any]]  # committed index rows
    files: dict[str, list[Any]]  # committed chunk files -> [size, sha256]
    seq: int  # number of the last commit
    full_rows: dict[str, int]  # per array: rows already in full zarr chunks
    tails: dict[str, np.ndarray]  # per array: rows after the last full chunk


def load_progress(tmp_dir: Path, header: dict[str, Any]) -> ResumeState | None:
    """The state after the last commit in ``tmp_dir``, or None to start the shard afresh."""
    path = tmp_dir / PROGRESS_NAME
    if not path.exists():
        return None
    _remove_partials(tmp_dir)
    with DurableJsonl(path) as progress:  # opening drops a torn last line
        lines = list(progress.read())
    if not lines:  # killed while writing the header: nothing was committed
        log.info("%s: no durable progress yet; starting the shard afresh", tmp_dir)
        return None
    if lines[0] != header:
        log.warning("%s: progress header differs from this run's settings; starting the shard afresh", tmp_dir)
        return None
    rows: list[dict[str, Any]] = []
    files: dict[str, list[Any]] = {}
    commit, n_kept = None, 1
    for i, line in enumerate(lines[1:], start=1):
        if line.get("kind") == "sample":
            rows.append({k: v for k, v in line.items() if k != "kind"})
        elif line.get("kind") == "commit":
            commit, n_kept = line, i + 1
            files.update(line["files"])
    if commit is None:
        return None
    rows = rows[: commit["num_samples"]]
    tail_path = tmp_dir / commit["tail"]
    if not tail_path.exists() or sha256_file(tail_path) != commit["tail_sha256"]:
        log.warning("%s: tail snapshot %s missing or damaged; starting the shard afresh", tmp_dir, tail_path.name)
        return None
    with np.load(tail_path) as npz:
        tails = {name: npz[name] for name in npz.files}
    # forget samples written after the last commit
    atomic_write_text(path, "".join(json.dumps(x, ensure_ascii=False, sort_keys=True) + "\n"
                                    for x in lines[:n_kept]))
    for name in os.listdir(tmp_dir):
        if name.startswith("tail-") and name != commit["tail"]:
            os.unlink(tmp_dir / name)
    return ResumeState(rows, files, commit["seq"], commit["full_rows"], tails)


def _remove_partials(tmp_dir: Path) -> None:
    """zarr writes each chunk to ``<key>.<uuid>.partial`` and renames it; kill -9 can leave one."""
    for dirpath, _dirs, names in os.walk(tmp_dir):
        for name in names:
            if name.endswith(".partial"):
                os.unlink(os.path.join(dirpath, name))


def recover_finished(tmp_dir: Path, final_dir: Path) -> dict[str, Any] | None:
    """The entry of a shard whose data is complete but which the manifest may not list yet:
    killed after ``checksums.json`` was written (rename it now) or after the rename."""
    if (tmp_dir / CHECKSUMS_NAME).exists():
        for name in os.listdir(tmp_dir):
            if name == PROGRESS_NAME or name.startswith("tail-"):
                os.unlink(tmp_dir / name)
        _remove_partials(tmp_dir)
        atomic_replace_dir(tmp_dir, final_dir)
        return shard_entry(final_dir)
    if not tmp_dir.exists() and (final_dir / CHECKSUMS_NAME).exists():
        return shard_entry(final_dir)
    return None


def shard_entry(shard_dir: Path) -> dict[str, Any]:
    """The manifest entry of a finished shard directory (from its ``checksums.json``)."""
    path = shard_dir / CHECKSUMS_NAME
    summary = json.loads(path.read_text())["summary"]
    return {"status": "done", **summary, "bytes": summary["data_bytes"] + path.stat().st_size,
            "checksums_sha256": sha256_file(path)}
