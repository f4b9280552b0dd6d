"""The manifest: the one file that says which shards of a stage's output are complete.

Readers and resume logic trust only the manifest: a shard file without a ``done`` entry does
not exist for them. Shard jobs of a Slurm array update it concurrently, so every update is a
read-modify-write under an exclusive lock file, written atomically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.core.durable import atomic_write_json
from pipeline.core.locks import FileLock

MANIFEST_NAME = "manifest.json"


class ManifestMismatch(ValueError):
    """The output directory was made by a run with different settings."""


class Manifest:
    def __init__(self, root: str | Path, name: str = MANIFEST_NAME):
        self.root = Path(root)
        self.path = self.root / name
        self._lock_path = self.root / f".{name}.lock"

    def exists(self) -> bool:
        return self.path.exists()

    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.path}: manifest is not valid JSON ({err})") from None

    def update(self, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
        """Apply ``change`` to the manifest dict under the lock and write it atomically."""
        self.root.mkdir(parents=True, exist_ok=True)
        with FileLock(self._lock_path, wait_s=120.0, stale_after_s=120.0):
            data = self.load()
            change(data)
            data["updated"] = time.time()
            atomic_write_json(self.path, data)
            return data

    def init(self, header: dict[str, Any], must_match: tuple[str, ...]) -> dict[str, Any]:
        """Create the manifest with ``header`` or check that an existing one agrees on ``must_match``.

        Resuming into a directory made with other settings would mix incompatible outputs, so
        it fails with the keys that differ.
        """

        def change(data: dict[str, Any]) -> None:
            if not data:
                data.update(header)
                data.setdefault("shards", {})
                data["created"] = time.time()
                return
            diffs = [k for k in must_match if data.get(k) != header.get(k)]
            if diffs:
                detail = "; ".join(f"{k}: existing {data.get(k)!r} vs now {header.get(k)!r}" for k in diffs)
                raise ManifestMismatch(
                    f"{self.path} was written with different settings ({detail}). "
                    f"Use a new output directory, or rerun with the original settings."
                )

        return self.update(change)

    def shards(self) -> dict[str, dict[str, Any]]:
        return self.load().get("shards", {})

    def shard_done(self, shard_index: int) -> bool:
        return self.shards().get(shard_key(shard_index), {}).get("status") == "done"

    def mark_shard(self, shard_index: int, entry: dict[str, Any]) -> None:
        def change(data: dict[str, Any]) -> None:
            data.setdefault("shards", {})[shard_key(shard_index)] = entry

        self.update(change)

    def clear_shard(self, shard_index: int) -> None:
        """Forget a shard (``inspect verify --repair`` re-queues it this way)."""

        def change(data: dict[str, Any]) -> None:
            data.setdefault("shards", {}).pop(shard_key(shard_index), None)

        self.update(change)


def shard_key(shard_index: int) -> str:
    return f"{shard_index:05d}"


def sharded_output_complete(directory: Path) -> bool:
    """True when a sharded stage's manifest (stage 1 or 2) marks all of its planned shards done."""
    done, planned = shard_progress(directory / "manifest.json")
    return planned > 0 and done == planned


def shard_progress(manifest_path: Path) -> tuple[int, int]:
    """(done shards, planned shards) from a sharded stage's manifest (top-level ``num_shards``;
    stores of format 1 keep it only with the dump settings)."""
    import json

    try:
        data = json.loads(manifest_path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return 0, 0
    shards = data.get("shards", {})
    done = sum(1 for s in shards.values() if s.get("status") == "done")
    planned = data.get("num_shards") or data.get("dump", {}).get("settings", {}).get("num_shards") or 0
    return done, int(planned)
