"""Training or evaluation conversations as one record list: a jsonl file or stage 1's output directory.

Stage 1's directory counts only through its manifest: the shards marked ``done``, in shard order,
each still holding the sha256 stage 1 recorded. Record ``index`` is global across those shards, and
ids must be unique across them (later stages key resume and results by id).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.data import Record, Rejection, read_conversations
from pipeline.durable import sha256_file
from pipeline.manifest import Manifest

log = logging.getLogger(__name__)


@dataclass
class InputSet:
    """Every input record in one stable order (``index`` is global across stage 1 shards)."""

    records: list[Record]
    rejected: list[Rejection]
    total: int
    files: list[Path]
    sha256: str  # over the input files' contents, in order: what the store was made from


def stage1_files(directory: Path) -> list[Path]:
    """The jsonl files of stage 1's completed shards, in shard order, checked against their hashes."""
    manifest = Manifest(directory)
    if not manifest.exists():
        raise ValueError(f"--input {directory} is a directory without manifest.json: give a jsonl file "
                         f"or a stage 1 output directory")
    data = manifest.load()
    done = sorted((int(k), v) for k, v in data.get("shards", {}).items() if v.get("status") == "done")
    expected = data.get("num_shards")
    if expected is not None and len(done) < int(expected):
        log.warning("%s: only %d of %s stage 1 shards are complete; dumping those", directory, len(done), expected)
    files = []
    for index, entry in done:
        names = [n for n in entry.get("files", {}) if n.startswith(f"shard-{index:05d}-")]
        found = [directory / n for n in names] or sorted(directory.glob(f"shard-{index:05d}-of-*.jsonl"))
        if len(found) != 1 or not found[0].is_file():
            raise ValueError(f"{directory}: stage 1 shard {index} is marked done but its jsonl is missing")
        recorded = entry.get("files", {}).get(found[0].name, {}).get("sha256")
        if recorded is not None and recorded != sha256_file(found[0]):
            raise ValueError(f"{found[0]} changed after stage 1 completed it (sha256 differs from the manifest)")
        files.append(found[0])
    return files


def read_input(path: str | Path, *, require_assistant: bool = True) -> InputSet:
    """Read a jsonl or a stage 1 directory. Audio is decoded later by the consumer (prepare_sample).
    ``require_assistant=False`` accepts records without an answer (prompts to generate from)."""
    path = Path(path)
    files = stage1_files(path) if path.is_dir() else [path]
    records: list[Record] = []
    rejected: list[Rejection] = []
    first_seen: dict[str, Record] = {}
    offset = 0
    for file in files:
        result = read_conversations(file, check_audio=False, require_assistant=require_assistant)
        rejected += [replace(r, index=r.index + offset) for r in result.rejected]
        for rec in result.records:
            rec = replace(rec, index=rec.index + offset)
            if rec.id in first_seen:  # ids key resume: they must be unique across stage 1 shards
                seen = first_seen[rec.id]
                rejected.append(rec.reject("id",
                                          f"duplicate id {rec.id!r} (first seen at {seen.source}:{seen.line})"))
                continue
            first_seen[rec.id] = rec
            records.append(rec)
        offset += result.total
    digest = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
    return InputSet(records, sorted(rejected, key=lambda r: r.index), offset, files, digest)
