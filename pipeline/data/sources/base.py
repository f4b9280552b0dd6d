"""What every input format gives the reader: files in a stable order, a count per file, and rows.

A format (one module each: jsonl, parquet, arrow, tar) knows how to count the records of one of
its files cheaply (line scan, Parquet footer, Arrow batch headers, tar headers) and how to read a
range of them as :class:`Row` objects: the record's raw values, or why it could not be read at
all. The count and the rows agree by construction (a damaged region counts as the rows it held,
or as one unreadable row when nothing says how many), so ``accepted + rejected == input`` holds
and shard membership depends only on the files.
"""

from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Row:
    """One input record as its file holds it, before column mapping."""

    file: Path
    line: int  # jsonl: the 1-based line; tables: the 0-based row; tars: the 0-based sample position
    where: str | None  # "row 3", "key clip-00": how a person finds it (None: jsonl, "file:line" says it)
    default_id: str  # the id when the record has none
    digest: str  # sha256 (16 hex) of the record's content: ties outputs to their input
    values: dict[str, Any] | None = None
    error: tuple[str, str] | None = None  # (field, reason) when the record could not be read at all
    id_hint: str | None = None  # the id a format knows without mapping (tar key)
    is_json: bool = False  # values are a JSON object (jsonl): kept whole as the record's raw form


class Format(ABC):
    """One input format over a fixed list of files."""

    name = ""

    def __init__(self, files: list[Path], base: Path, id_column: str = "id"):
        self.files = files
        self.base = base  # relative audio paths are resolved against it
        self.id_column = id_column

    @abstractmethod
    def count(self, file: Path) -> int:
        """Records in ``file``; the number of rows :meth:`rows` yields for the whole file."""

    @abstractmethod
    def rows(self, file: Path, start: int, stop: int) -> Iterator[Row]:
        """Exactly ``stop - start`` rows, the file's records ``start..stop-1``."""

    def ids(self, file: Path) -> Iterator[str | None]:
        """Each record's explicit id (None: it gets its unique default id). Default: read the rows."""
        for row in self.rows(file, 0, self.count(file)):
            values = row.values or {}
            rid = values.get(self.id_column, row.id_hint)
            yield None if rid is None else str(rid)

    def fingerprint(self, file: Path) -> str:
        """What the run's ``input_sha256`` is made of: size and the first and last MiB (binary
        formats hold GBs of audio; hashing them whole in every job of an array is not affordable)."""
        size = file.stat().st_size
        digest = hashlib.sha256(f"{file.name}:{size}".encode())
        with open(file, "rb") as fh:
            digest.update(fh.read(1 << 20))
            if size > 1 << 20:
                fh.seek(max(size - (1 << 20), 1 << 20))
                digest.update(fh.read())
        return digest.hexdigest()


def describe_error(err: BaseException) -> str:
    """``Type: message`` on one line (library messages can span several)."""
    return f"{type(err).__name__}: {' '.join(str(err).split())}"


def value_digest(values: dict[str, Any]) -> str:
    """sha256 (16 hex) of a row's values: bytes by their own sha256, the rest as JSON."""

    def enc(v: Any) -> Any:
        if isinstance(v, (bytes, bytearray, memoryview)):
            return "sha256:" + hashlib.sha256(bytes(v)).hexdigest()
        if isinstance(v, dict):
            return {str(k): enc(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [enc(x) for x in v]
        if hasattr(v, "tolist"):
            return enc(v.tolist())
        return v

    blob = json.dumps(enc(values), sort_keys=True, default=str, ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
