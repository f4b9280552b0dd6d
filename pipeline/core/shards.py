"""Shard planning and the loop that runs a stage's per-shard function with resume and locks.

Shard membership depends only on (record count, number of shards, shard index) over the
stable record order of the input, so any job of a Slurm array computes the same split.
Contiguous ranges keep a shard's records together on disk and let outputs concatenate in
input order.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.locks import FileLock, LockHeld
from pipeline.core.manifest import Manifest

log = logging.getLogger(__name__)
# what Shard.name gives: stage 1 files and store shard directories are named this way
SHARD_NAME = re.compile(r"shard-(\d{5})-of-(\d{5})")


@dataclass(frozen=True)
class Shard:
    index: int
    count: int
    start: int  # first record index (inclusive)
    stop: int  # last record index (exclusive)

    @property
    def name(self) -> str:
        return f"shard-{self.index:05d}-of-{self.count:05d}"

    def __len__(self) -> int:
        return self.stop - self.start


def plan_shards(num_records: int, num_shards: int) -> list[Shard]:
    if num_shards < 1:
        raise ValueError(f"--num-shards must be >= 1, got {num_shards}")
    return [
        Shard(i, num_shards, i * num_records // num_shards, (i + 1) * num_records // num_shards)
        for i in range(num_shards)
    ]


def resolve_shard_index(shard_index: int | None, num_shards: int) -> int | None:
    """The shard to run: the flag, else ``$SLURM_ARRAY_TASK_ID``, else None (= all shards)."""
    if shard_index is None:
        env = os.environ.get("SLURM_ARRAY_TASK_ID")
        if env is not None and env.strip() != "":
            try:
                shard_index = int(env)
            except ValueError:
                raise ValueError(f"SLURM_ARRAY_TASK_ID={env!r} is not an integer") from None
    if shard_index is not None and not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is outside 0..{num_shards - 1} (--num-shards {num_shards})")
    return shard_index


@dataclass
class ShardRunSummary:
    done: list[int]  # shards this call completed
    skipped: list[int]  # already complete per the manifest
    busy: list[int]  # locked by another live job


def run_shards(
    out_dir: str | Path,
    shards: list[Shard],
    shard_index: int | None,
    process: Callable[[Shard], None],
    manifest: Manifest,
) -> ShardRunSummary:
    """Run ``process`` on the selected shard (or every shard) unless the manifest says done.

    ``process`` writes its output and records completion in the manifest itself (after the data
    is durable). A shard locked by another live job is an error when it was asked for by index,
    and is passed over when looping over all shards (another worker is on it).
    """
    out_dir = Path(out_dir)
    selected = shards if shard_index is None else [shards[shard_index]]
    summary = ShardRunSummary([], [], [])
    for shard in selected:
        if manifest.shard_done(shard.index):
            log.info("%s: complete in %s, skipping", shard.name, manifest.path)
            summary.skipped.append(shard.index)
            continue
        lock = FileLock(out_dir / "locks" / f"{shard.name}.lock")
        try:
            lock.acquire()
        except LockHeld as err:
            if shard_index is not None:
                raise
            log.warning("%s: %s; leaving it to that job", shard.name, err)
            summary.busy.append(shard.index)
            continue
        try:
            # re-check under the lock: another job may have finished it since the first look
            if manifest.shard_done(shard.index):
                summary.skipped.append(shard.index)
                continue
            process(shard)
            summary.done.append(shard.index)
        finally:
            lock.release()
    return summary
