"""Stage 1's output directory, the one place its layout is written down.

    OUT/shard-XXXXX-of-YYYYY.jsonl   the shard's records (regenerated answers)
    OUT/errors-XXXXX.jsonl           one line per rejected input record of the shard
    OUT/progress/<shard>.jsonl       durable batches of a shard being worked on (deleted at commit)
    OUT/manifest.json                per shard: status, counts, and each file's sha256/bytes/lines

Only shards the manifest marks ``done`` exist for readers (:func:`committed_files`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.core.durable import sha256_file
from pipeline.core.manifest import Manifest
from pipeline.core.shards import SHARD_NAME, Shard

PROGRESS_DIR = "progress"


def shard_files(out_dir: str | Path, shard: Shard) -> tuple[Path, Path, Path]:
    """(records, errors, in-progress log) paths of a shard."""
    out = Path(out_dir)
    return (out / f"{shard.name}.jsonl", out / f"errors-{shard.index:05d}.jsonl",
            out / PROGRESS_DIR / f"{shard.name}.jsonl")


def entry_files(directory: Path, entry: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """(records file, errors file) a manifest entry names."""
    names = list(entry.get("files", {}))
    records = next((n for n in names if SHARD_NAME.fullmatch(n.removesuffix(".jsonl"))), None)
    errors = next((n for n in names if n.startswith("errors-")), None)
    return (directory / records if records else None), (directory / errors if errors else None)


def committed_files(directory: Path, log: Any = None) -> list[Path]:
    """The records files of stage 1's completed shards, in shard order, checked against their hashes."""
    manifest = Manifest(directory)
    if not manifest.exists():
        raise ValueError(f"--input {directory} is a directory without manifest.json: give a jsonl file "
                         f"or a stage 1 output directory")
    data = manifest.load()
    done = sorted((int(k), v) for k, v in data.get("shards", {}).items() if v.get("status") == "done")
    expected = data.get("num_shards")
    if expected is not None and len(done) < int(expected) and log is not None:
        log.warning("%s: only %d of %s stage 1 shards are complete; reading those", directory, len(done), expected)
    files = []
    for index, entry in done:
        records, _ = entry_files(directory, entry)
        found = [records] if records else sorted(directory.glob(f"shard-{index:05d}-of-*.jsonl"))
        if len(found) != 1 or not found[0].is_file():
            raise ValueError(f"{directory}: stage 1 shard {index} is marked done but its jsonl is missing")
        recorded = entry.get("files", {}).get(found[0].name, {}).get("sha256")
        if recorded is not None and recorded != sha256_file(found[0]):
            raise ValueError(f"{found[0]} changed after stage 1 completed it (sha256 differs from the manifest)")
        files.append(found[0])
    return files
