"""Parquet files (the Hugging Face Hub's format; ``datasets``' ``to_parquet``), read by row group.

The footer gives each row group's row count without reading data, so a file counts as its rows
even when a row group is damaged: that group's rows are rejected, the others are read. A file
whose footer cannot be read (truncated, not Parquet) counts as one unreadable record.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import Format, Row, describe_error, value_digest

BATCH_ROWS = 64  # rows decoded at once: a row group of long audio can be hundreds of MB


def _open(file: Path):
    import pyarrow.parquet as pq

    return pq.ParquetFile(str(file))


class ParquetFormat(Format):
    name = "parquet"

    def count(self, file: Path) -> int:
        try:
            return _open(file).metadata.num_rows
        except Exception:  # noqa: BLE001 - any unreadable footer: one record, rejected when read
            return 1

    def rows(self, file: Path, start: int, stop: int) -> Iterator[Row]:
        try:
            pf = _open(file)
        except Exception as err:  # noqa: BLE001
            if start == 0 and stop >= 1:
                yield Row(file, 0, "(whole file)", f"{file.stem}-0", "", error=(
                    "file", f"not a readable Parquet file ({describe_error(err)}); its rows are unknown "
                            "and counted as one rejected record"))
            return
        first = 0
        for group in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(group).num_rows
            lo, hi = max(start, first), min(stop, first + n)
            if lo < hi:
                yield from self._group(pf, file, group, first, lo, hi)
            first += n
            if first >= stop:
                return

    def _group(self, pf, file: Path, group: int, first: int, lo: int, hi: int) -> Iterator[Row]:
        position = first
        try:
            for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[group]):
                for values in batch.to_pylist():
                    if lo <= position < hi:
                        yield Row(file, position, f"row {position}", f"{file.stem}-{position}",
                                  value_digest(values), values)
                    position += 1
                    if position >= hi:
                        return
        except Exception as err:  # noqa: BLE001 - a damaged row group costs only its own rows
            reason = f"row group {group} unreadable ({describe_error(err)})"
            for pos in range(max(position, lo), hi):
                yield Row(file, pos, f"row {pos}", f"{file.stem}-{pos}", "", error=("row", reason))

    def ids(self, file: Path) -> Iterator[str | None]:
        n = self.count(file)
        try:
            pf = _open(file)
            if self.id_column not in pf.schema_arrow.names:
                yield from [None] * n
                return
            for group in range(pf.metadata.num_row_groups):
                rows = pf.metadata.row_group(group).num_rows
                try:
                    col = pf.read_row_group(group, columns=[self.id_column]).column(0).to_pylist()
                except Exception:  # noqa: BLE001 - rejected when read
                    col = [None] * rows
                yield from (None if v is None else str(v) for v in col)
        except Exception:  # noqa: BLE001
            yield from [None] * n
