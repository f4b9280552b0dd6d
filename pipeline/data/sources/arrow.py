"""Datasets written by ``datasets``' ``save_to_disk``: Arrow IPC stream files listed in state.json.

Read batch by batch through a memory map (nothing is loaded whole). A stream that breaks off
counts as the rows before the break plus one unreadable record for the rest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import Format, Row, describe_error, value_digest


def saved_files(directory: Path) -> list[Path]:
    """The data files of one saved split, in the order ``datasets`` reads them."""
    state = json.loads((directory / "state.json").read_text())
    return [directory / f["filename"] for f in state.get("_data_files", [])]


def _batches(file: Path) -> Iterator[tuple[object, Exception | None]]:
    """(record batch, None) for every batch, then (None, error) if the stream breaks."""
    import pyarrow as pa

    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(file), "r"))
        for batch in reader:
            yield batch, None
    except Exception as err:  # noqa: BLE001 - a broken stream: the rest is one unreadable record
        yield None, err


class ArrowFormat(Format):
    name = "arrow"

    def count(self, file: Path) -> int:
        return sum(1 if batch is None else batch.num_rows for batch, _ in _batches(file))

    def rows(self, file: Path, start: int, stop: int) -> Iterator[Row]:
        position = 0
        for batch, err in _batches(file):
            if batch is None:
                if start <= position < stop:
                    yield Row(file, position, f"row {position} on", f"{file.stem}-{position}", "", error=(
                        "file", f"Arrow stream unreadable from row {position} on ({describe_error(err)}); "
                                "the rest of the file is counted as one rejected record"))
                return
            n = batch.num_rows
            if position + n > start and position < stop:
                lo, hi = max(start - position, 0), min(stop - position, n)
                for i, values in enumerate(batch.slice(lo, hi - lo).to_pylist(), start=position + lo):
                    yield Row(file, i, f"row {i}", f"{file.stem}-{i}", value_digest(values), values)
            position += n
            if position >= stop:
                return

    def ids(self, file: Path) -> Iterator[str | None]:
        for batch, _ in _batches(file):
            if batch is None:
                yield None
            elif self.id_column in batch.schema.names:
                yield from (None if v is None else str(v) for v in batch.column(self.id_column).to_pylist())
            else:
                yield from [None] * batch.num_rows
