"""Conversation jsonl files (README "Data format"), one record per non-blank line."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.durable import sha256_file
from pipeline.data.sources.base import Format, Row


class JsonlFormat(Format):
    name = "jsonl"

    def count(self, file: Path) -> int:
        with open(file, "rb") as fh:
            return sum(1 for raw in fh if raw.strip())

    def rows(self, file: Path, start: int, stop: int) -> Iterator[Row]:
        position = 0
        with open(file, "rb") as fh:
            for line_no, raw in enumerate(fh, start=1):
                if not raw.strip():
                    continue
                if position >= stop:
                    return
                if position >= start:
                    yield _row(file, line_no, raw)
                position += 1

    def ids(self, file: Path) -> Iterator[str | None]:
        with open(file, "rb") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                try:
                    obj = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError):
                    yield None
                    continue
                rid = obj.get("id") if isinstance(obj, dict) else None
                yield str(rid) if isinstance(rid, (str, int)) else None

    def fingerprint(self, file: Path) -> str:
        return sha256_file(file)  # text: small enough to hash whole, as stage 1 always did


def _row(file: Path, line_no: int, raw: bytes) -> Row:
    digest = hashlib.sha256(raw.rstrip(b"\r\n")).hexdigest()[:16]
    row = Row(file, line_no, None, f"{file.stem}-{line_no}", digest)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        row.error = ("line", f"not valid UTF-8 ({err.reason} at byte {err.start})")
        return row
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        row.error = ("line", f"malformed JSON ({err.msg} at column {err.colno})")
        return row
    if not isinstance(obj, dict):
        row.error = ("record", f"must be a JSON object, got {type(obj).__name__}")
        return row
    row.values, row.is_json = obj, True
    return row
