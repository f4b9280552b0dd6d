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

from pipeline.core.durable import sha256_file
from pipeline.core.stage1_layout import committed_files
from pipeline.data.records import Record, Rejection, read_conversations

log = logging.getLogger(__name__)


@dataclass
class InputSet:
    """Every input record in one stable order (``index`` is global across stage 1 shards)."""

    records: list[Record]
    rejected: list[Rejection]
    total: int
    files: list[Path]
    sha256: str  # over the input files' contents, in order: what the store was made from


def read_input(path: str | Path, *, require_assistant: bool = True) -> InputSet:
    """Read a jsonl or a stage 1 directory. Audio is decoded later by the consumer (prepare_sample).
    ``require_assistant=False`` accepts records without an answer (prompts to generate from)."""
    path = Path(path)
    files = committed_files(path, log) if path.is_dir() else [path]
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
