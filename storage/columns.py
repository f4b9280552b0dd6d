"""One growing zarr array of a shard being written, with write-once chunks.

Only *full* chunks go to zarr while a shard is written; the rows after the last full chunk (the
tail, < one chunk) stay in memory and are snapshotted raw at each flush. So a chunk file that
holds committed rows is written exactly once and never rewritten, which is what makes a resumed
shard byte-identical to an uninterrupted one and keeps committed data safe from a crash during
a rewrite. The last, partial chunk is written once, by ``finish``.

zarr keeps the metadata (``zarr.json``: shape, chunk grid, codecs), but chunk files are written
here, by a :class:`ChunkWriter` pool of ``compression_threads`` threads that compress, hash and
write whole chunks while the caller encodes the next sample (Blosc, hashlib and file writes drop
the GIL). They are the bytes zarr would write, so zarr reads every shard.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.durable import fsync_dir, fsync_file
from storage.array_encoding import ArraySpec
from storage.checksum import LEGACY, digest_fn
from storage.layout import ARRAYS_DIR, chunk_key

# Compression threads per writer. Measured at H=4096 (bench_store's writer sweep, lossless zstd):
# one thread compresses ~250-300 MB/s of raw bf16, two ~1.8x that on two cores. Two per GPU is what
# a 16-core node with 8 GPUs has to give; stage 2's --compression-threads sets it.
DEFAULT_COMPRESSION_THREADS = 2

# flat chunk keys ("c.12.0"): one directory per array instead of one per chunk
CHUNK_KEY_ENCODING = {"name": "default", "separator": "."}


def create_array(group: zarr.Group, spec: ArraySpec) -> zarr.Array:
    itemsize = np.dtype(spec.dtype).itemsize
    return group.create_array(
        spec.name,
        shape=(0, *spec.shape_tail),
        chunks=(spec.chunk_rows, *spec.shape_tail),
        dtype=spec.dtype,
        compressors=spec.compressor.to_zarr(itemsize),
        fill_value=0,
        chunk_key_encoding=CHUNK_KEY_ENCODING,
        # every chunk exists as a file, even an all-zero loss_mask chunk: validate() can then
        # check the exact file set, and the reader never has to guess about a missing key
        config={"write_empty_chunks": True},
    )


class ChunkWriter:
    """Compresses, hashes (sha256 + the store's read checksum) and writes chunk files on a pool.

    At most ``2 x threads + 2`` chunks are in flight (~1.5 MiB raw each at H=4096), so a slow
    disk holds the caller back instead of filling memory.
    """

    def __init__(self, threads: int, checksum: str):
        if threads < 1:
            raise ValueError(f"compression threads must be >= 1, got {threads}")
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="compress")
        self._fast = None if checksum == LEGACY else digest_fn(checksum)
        self._slots = threading.BoundedSemaphore(2 * threads + 2)

    def submit(self, path: Path, spec: ArraySpec, rows: np.ndarray) -> Future:
        """Write one whole chunk; the future gives its ``[size, sha256(, fast digest)]``."""
        self._slots.acquire()
        future = self._pool.submit(self._write, path, spec, rows)
        future.add_done_callback(lambda _f: self._slots.release())
        return future

    def _write(self, path: Path, spec: ArraySpec, rows: np.ndarray) -> list[Any]:
        data = spec.compressor.encode(rows)
        entry: list[Any] = [len(data), hashlib.sha256(data).hexdigest()]
        if self._fast is not None:
            entry.append(self._fast(data))
        with open(path, "wb") as fh:
            fh.write(data)
        return entry

    def shutdown(self) -> None:
        self._pool.shutdown()


class Column:
    """Appends rows to one array; ``rows`` = all appended, ``full_rows`` = rows in zarr."""

    def __init__(self, root: Path, array: zarr.Array, spec: ArraySpec, writer: ChunkWriter, full_rows: int = 0,
                 tail: np.ndarray | None = None):
        self.root, self.array, self.spec, self.writer = root, array, spec, writer
        self.full_rows = full_rows
        self._pending: list[np.ndarray] = [] if tail is None or not len(tail) else [tail]
        self.rows = full_rows + (0 if tail is None else len(tail))
        self.unsynced: list[tuple[str, Future]] = []  # chunks written since the last sync()

    def append(self, rows: np.ndarray) -> None:
        """Queue ``rows``; every chunk they complete goes to the writer pool at once. Only the
        chunk that earlier rows began is assembled by a copy: copying whole samples into one
        block first was ~30% of the writer's CPU at H=4096 (raw codec)."""
        if not len(rows):
            return
        c = self.spec.chunk_rows
        held = self.rows - self.full_rows  # rows of an unfinished chunk, from earlier appends
        self.rows += len(rows)
        if held + len(rows) < c:
            self._pending.append(rows)
            return
        blocks = []
        if held:
            blocks.append(np.concatenate([*self._pending, rows[:c - held]]))
            rows = rows[c - held:]
        n_full = len(rows) // c * c
        if n_full:
            blocks.append(rows[:n_full])
        self._pending = [rows[n_full:]] if len(rows) > n_full else []
        self._write(blocks)

    def tail(self) -> np.ndarray:
        """Rows after the last full chunk (raw stored dtype)."""
        if not self._pending:
            return np.zeros((0, *self.spec.shape_tail), dtype=self.spec.dtype)
        if len(self._pending) > 1:
            self._pending = [np.concatenate(self._pending)]
        return self._pending[0]

    def _write(self, blocks: list[np.ndarray]) -> None:
        """Write ``blocks`` (whole chunks; the very last rows of the shard are zero-padded to a
        chunk, as zarr does)."""
        start = self.full_rows
        stop = start + sum(len(b) for b in blocks)
        # grow first, write second: a chunk never exists beyond the recorded shape
        self.array.resize((stop, *self.spec.shape_tail))
        c = self.spec.chunk_rows
        ndim = 1 + len(self.spec.shape_tail)
        for block in blocks:
            for i in range(0, len(block), c):
                rows = block[i:i + c]
                if len(rows) < c:
                    rows = np.concatenate([rows, np.zeros((c - len(rows), *rows.shape[1:]), dtype=rows.dtype)])
                key = chunk_key(self.spec.name, self.full_rows // c, ndim)
                self.unsynced.append((key, self.writer.submit(self.root / key, self.spec, rows)))
                self.full_rows += len(block[i:i + c])
        self.full_rows = stop

    def write_last_chunk(self) -> None:
        """Write the partial tail chunk and set the exact final shape (``finish`` only)."""
        tail = self.tail()
        if len(tail):
            self._write([tail])
            self._pending = []
        elif self.array.shape[0] != self.rows:
            self.array.resize((self.rows, *self.spec.shape_tail))

    def take_unsynced(self) -> tuple[list[tuple[str, Future]], Path]:
        """Chunks written since the last call (key, future of its hashes), and the array's
        directory: the caller makes them durable in parallel with the other arrays' files."""
        chunks, self.unsynced = self.unsynced, []
        return chunks, self.root / ARRAYS_DIR / self.spec.name


def sync_columns(columns: list[Column], pool: ThreadPoolExecutor) -> dict[str, list[Any]]:
    """Wait for the chunks written since the last call, fsync them and each array's metadata.

    fsync costs ~3 ms per file here even when the file is clean (one journal commit each), so
    files go through a thread pool (200 x 1 MiB: 0.56 s serial, 0.30 s with 8-32 threads). The
    hashes were taken from the bytes as they were written (no re-read). Raises the first write
    error. Returns ``{key: [size, sha256(, fast digest)]}`` for the chunks.
    """
    chunks, dirs = [], []
    for col in columns:
        new, array_dir = col.take_unsynced()
        chunks += new
        dirs += [array_dir] if new else []
        fsync_file(array_dir / "zarr.json")
    entries = [future.result() for _key, future in chunks]
    root = columns[0].root if columns else Path()
    list(pool.map(lambda kf: fsync_file(root / kf[0]), chunks))
    for d in dirs:
        fsync_dir(d)
    return {key: entry for (key, _f), entry in zip(chunks, entries, strict=True)}
