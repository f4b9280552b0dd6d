"""One input of any format as a numbered, streamable sequence of records (or rejections).

:meth:`InputSource.plan` counts the records of every file (cheaply, see each format), applies
``--skip/--take/--take-fraction`` to that order, and finds duplicate ids over the selection, so
record ``index`` (0-based, within the selection) and shard membership depend only on the files
and the subset flags: every job of a Slurm array computes the same. :meth:`InputSource.read`
then yields one :class:`Record` or :class:`Rejection` per index of a range, reading only the files
that range touches, one record at a time.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.config import ConfigError
from pipeline.data.records import Record, Rejection
from pipeline.data.sources.base import Format
from pipeline.data.sources.mapping import ColumnMapping, Mapper
from pipeline.data.sources.resolve import resolve


@dataclass(frozen=True)
class Subset:
    skip: int = 0
    take: int | None = None
    take_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.skip < 0 or (self.take is not None and self.take < 0):
            raise ConfigError("--skip and --take must be >= 0")
        if self.take is not None and self.take_fraction is not None:
            raise ConfigError("give --take or --take-fraction, not both")
        if self.take_fraction is not None and not 0 < self.take_fraction <= 1:
            raise ConfigError(f"--take-fraction must be in (0, 1], got {self.take_fraction}")

    def range(self, total: int) -> tuple[int, int]:
        lo = min(self.skip, total)
        if self.take is not None:
            return lo, min(total, lo + self.take)
        if self.take_fraction is not None:
            return lo, lo + int(self.take_fraction * (total - lo))
        return lo, total


@dataclass
class Plan:
    counts: list[int]  # records per file, before the subset
    lo: int  # the selection: source positions lo..hi-1
    hi: int
    duplicates: dict[int, int]  # selected index -> index of the first record with the same id

    @property
    def total(self) -> int:
        return self.hi - self.lo


class InputSource:
    """``spec`` (see :mod:`pipeline.data.sources.resolve`) read through ``mapping`` and ``subset``."""

    def __init__(self, spec: str | Path, *, mapping: ColumnMapping | None = None, subset: Subset | None = None,
                 split: str = ""):
        mapping, subset = mapping or ColumnMapping(), subset or Subset()
        self.spec = str(spec)
        fmt_cls, files, base, self.split = resolve(self.spec, split)
        self.format: Format = fmt_cls(files, base, mapping.id_column)
        self.mapping, self.subset = mapping, subset
        self._plan: Plan | None = None

    @property
    def files(self) -> list[Path]:
        return self.format.files

    def plan(self) -> Plan:
        if self._plan is None:
            counts = [self.format.count(f) for f in self.files]
            lo, hi = self.subset.range(sum(counts))
            self._plan = Plan(counts, lo, hi, self._duplicates(lo, hi))
        return self._plan

    @property
    def total(self) -> int:
        return self.plan().total

    def _duplicates(self, lo: int, hi: int) -> dict[int, int]:
        """Selected records whose explicit id an earlier selected record has (first one wins)."""
        hashes, indices, position = [], [], 0
        for file in self.files:
            for rid in self.format.ids(file):
                if lo <= position < hi and rid is not None:
                    hashes.append(int.from_bytes(hashlib.blake2b(rid.encode(), digest_size=8).digest(), "little"))
                    indices.append(position - lo)
                position += 1
                if position >= hi:
                    break
        if not hashes:
            return {}
        h, idx = np.array(hashes, dtype=np.uint64), np.array(indices, dtype=np.int64)
        order = np.lexsort((idx, h))
        h, idx = h[order], idx[order]
        same = np.flatnonzero(h[1:] == h[:-1]) + 1
        out: dict[int, int] = {}
        for k in same:  # idx[k - 1] is this group's earlier record (or its first, by induction)
            out[int(idx[k])] = out.get(int(idx[k - 1]), int(idx[k - 1]))
        return out

    def read(self, start: int = 0, stop: int | None = None, *,
             require_assistant: bool = False) -> Iterator[Record | Rejection]:
        """One record or rejection per selected index ``start..stop-1``, in order."""
        plan = self.plan()
        stop = plan.total if stop is None else min(stop, plan.total)
        mapper = Mapper(self.mapping, self.format.base, require_assistant)
        a, b = plan.lo + start, plan.lo + stop
        offset = 0
        for file, n in zip(self.files, plan.counts, strict=True):
            lo, hi = max(a, offset), min(b, offset + n)
            if lo < hi:
                for k, row in enumerate(self.format.rows(file, lo - offset, hi - offset)):
                    index = lo - plan.lo + k
                    out = mapper.record(row, index)
                    if index in plan.duplicates and isinstance(out, Record):
                        first = plan.duplicates[index]
                        out = out.reject("id", f"duplicate id {out.id!r} (first seen at record {first} of the input)")
                    yield out
            offset += n
            if offset >= b:
                return

    def fingerprint(self) -> str:
        """The input's identity for the manifest (a single jsonl: its sha256, as before)."""
        parts = [self.format.fingerprint(f) for f in self.files]
        return parts[0] if len(parts) == 1 and self.format.name == "jsonl" else \
            hashlib.sha256("".join(parts).encode()).hexdigest()

    def describe(self) -> dict[str, Any]:
        """What the manifest records about the input: format, files, split, subset."""
        plan = self.plan()
        return {"format": self.format.name, "split": self.split,
                "files": [{"path": str(f), "records": n} for f, n in zip(self.files, plan.counts, strict=True)],
                "source_records": sum(plan.counts),
                "subset": {"skip": self.subset.skip, "take": self.subset.take,
                           "take_fraction": self.subset.take_fraction, "first": plan.lo, "stop": plan.hi}}
