"""Reading the samples of one committed shard straight from its Zarr chunk files.

A sample's rows of an array are a contiguous range (offset, count from the Arrow index). Chunks
the range covers completely are decoded straight into the output buffer. The edge chunks are
decoded once and kept (one per array), so reading consecutive samples decodes each chunk once.
Raw (``none`` codec) chunk files are not read at all: they are mapped side by side
(:mod:`storage.mapped`) and the sample's rows are handed out from the page cache, copy-free.

Per chunk, optionally: its checksum (the store's read checksum, see :mod:`storage.checksum`) on
the bytes as read, and a NaN/Inf count of the sample's rows right after decoding, while they
are still in cache (~40 GB/s there vs ~15 GB/s over the whole sample afterwards). Compressed
chunk files are read into one reusable buffer per thread: a fresh 1.5 MiB ``bytes`` per chunk
costs an allocation and its page faults on every read. ``read_threads`` > 1 decodes the chunks
of an array in parallel (file reads, Blosc, hashing and numpy reductions all drop the GIL).
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numcodecs.blosc
import numpy as np
import pyarrow as pa
import torch
from fsspec.implementations.local import LocalFileSystem

from storage import buffers
from storage.array_encoding import ArraySpec, decode_arrays
from storage.checksum import LEGACY, digest_fn
from storage.chunk_compression import nonfinite_count
from storage.layout import ROW_SPACES, chunk_key
from storage.mapped import ChunkSizeError, MappedChunks, can_map

# Parallelism is the reader's (read_threads, DataLoader workers): Blosc's own threads on top of
# it oversubscribe the cores, and made the old in-process numbers use 2 cores for "1 process".
numcodecs.blosc.use_threads = False


class ChunkReadError(ValueError):
    """A chunk file is missing, truncated or corrupt; the message names the array and the file."""


def _read_file(path: str, dest: memoryview | None, tls: threading.local) -> memoryview:
    """The bytes of a file: into ``dest`` when given (its size must match), else into this
    thread's reusable buffer."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if dest is not None:
            if size != len(dest):
                raise ValueError(f"raw chunk has {size:,} bytes, expected {len(dest):,}")
            view = dest
        else:
            buf = getattr(tls, "buf", None)
            if buf is None or len(buf) < size:
                buf = tls.buf = bytearray(max(size, 1 << 20))
            view = memoryview(buf)[:size]
        done = 0
        while done < size:
            n = os.readv(fd, [view[done:]])
            if n == 0:
                raise ValueError(f"file shrank while read ({done:,} of {size:,} bytes)")
            done += n
        return view
    finally:
        os.close(fd)


class ShardReader:
    """Index and chunk access for one shard; cheap to pickle (caches and buffers are dropped)."""

    def __init__(self, name: str, shard_dir: str, table: pa.Table, specs: dict[str, ArraySpec], fs: Any,
                 checksums: dict[str, str] | None = None, algorithm: str = LEGACY, dtype: str = "bfloat16"):
        """``checksums``: chunk path -> ``algorithm`` digest to check each chunk read against
        (None: no check). ``dtype``: the store's half-precision dtype (for the NaN/Inf test)."""
        self.name, self.dir, self.table, self.specs, self.fs = name, shard_dir, table, specs, fs
        self.checksums, self.algorithm, self.dtype = checksums, algorithm, dtype
        self._digest = digest_fn(algorithm)
        self._cols = {c: table.column(c).to_numpy() for c in
                      ("num_tokens", "tok_offset", "num_last", "last_offset", "num_audio", "audio_offset",
                       "num_loss_tokens")}
        self._local = isinstance(fs, LocalFileSystem)
        self._map = self._local and sys.platform.startswith("linux")  # storage.mapped uses Linux mmap flags
        self._cache: dict[str, tuple[int, np.ndarray]] = {}  # array -> (chunk, decoded rows)
        self._tls = threading.local()

    def __len__(self) -> int:
        return self.table.num_rows

    def col(self, name: str) -> np.ndarray:
        return self._cols[name]

    def ids(self) -> list[str]:
        return self.table.column("id").to_pylist()

    def row_info(self, row: int) -> dict[str, Any]:
        """Index fields of one sample (no tensors)."""
        return {k: self.table.column(k)[row].as_py() for k in
                ("id", "source_hash", "num_tokens", "num_loss_tokens", "audio_spans", "meta")}

    def extent(self, row: int, rows: str) -> tuple[int, int]:
        """(offset, count) of sample ``row`` in row space ``rows`` (tokens / last / audio)."""
        prefix = ROW_SPACES[rows]
        count = "num_tokens" if rows == "tokens" else f"num_{rows}"
        return int(self._cols[f"{prefix}_offset"][row]), int(self._cols[count][row])

    def read(self, row: int, hidden_size: int, dtype: torch.dtype, *, dequantize: bool = True,
             check_finite: bool = False, pool: ThreadPoolExecutor | None = None) -> dict[str, Any]:
        """One sample's tensors; with ``check_finite`` also ``nonfinite``: {array: NaN/Inf count}
        for the arrays that hold any (stored values: fp8 bytes and scales, not dequantized ones)."""
        raw, bad = {}, {}
        for name, spec in self.specs.items():
            raw[name], bad[name] = self._rows(spec, *self.extent(row, spec.rows), check_finite, pool)
        out: dict[str, Any] = decode_arrays(raw, self.specs, hidden_size, dtype, dequantize)
        if check_finite:
            out["nonfinite"] = {name: n for name, n in bad.items() if n}
        return out

    def read_rows(self, spec: ArraySpec, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) of one array, stored dtype."""
        return self._rows(spec, start, count)[0].numpy()

    def _rows(self, spec: ArraySpec, start: int, count: int, check_finite: bool = False,
              pool: ThreadPoolExecutor | None = None) -> tuple[torch.Tensor, int]:
        """(rows as a tensor of the stored dtype, NaN/Inf count among them if asked)."""
        if count and self._map and spec.compressor.raw and can_map(spec.chunk_rows * spec.row_bytes):
            return self._mapped_rows(spec, start, count, check_finite, pool)
        arr, tensor = buffers.empty((count, *spec.shape_tail), spec.dtype)
        c = spec.chunk_rows
        stop = start + count

        def one(ci: int) -> int:
            lo, hi = max(start, ci * c), min(stop, (ci + 1) * c)
            dest = arr[lo - start:hi - start]
            try:
                if hi - lo == c:  # whole chunk: decode in place
                    self._read_chunk(spec, ci, dest)
                else:
                    dest[:] = self.chunk(spec, ci)[lo - ci * c:hi - ci * c]
            except (RuntimeError, ValueError, OSError) as err:  # blosc says only "error during decompression"
                raise self._error(spec, ci, err) from err
            return nonfinite_count(dest, spec.encoding, self.dtype) if check_finite else 0

        chunks = range(start // c, -(-stop // c))
        counts = pool.map(one, chunks) if pool is not None and len(chunks) > 1 else map(one, chunks)
        return tensor, sum(counts)

    def _mapped_rows(self, spec: ArraySpec, start: int, count: int, check_finite: bool,
                     pool: ThreadPoolExecutor | None) -> tuple[torch.Tensor, int]:
        """:meth:`_rows` of a raw array: its chunk files mapped side by side, checked in place."""
        c, size = spec.chunk_rows, spec.chunk_rows * spec.row_bytes
        first, stop = start // c, start + count
        paths = [self.chunk_path(spec, ci) for ci in range(first, -(-stop // c))]
        try:
            whole = np.asarray(MappedChunks(paths, size))
        except ChunkSizeError as err:
            raise self._error(spec, first + err.position, err) from err
        except OSError as err:
            position = paths.index(err.filename) if err.filename in paths else 0
            raise self._error(spec, first + position, err) from err
        rows = whole[(start - first * c) * spec.row_bytes:(stop - first * c) * spec.row_bytes]
        rows = rows.view(spec.dtype).reshape(count, *spec.shape_tail)

        def one(i: int) -> int:
            try:
                self._check(paths[i], whole[i * size:(i + 1) * size])
            except ValueError as err:
                raise self._error(spec, first + i, err) from err
            if not check_finite:
                return 0
            lo, hi = max(0, (first + i) * c - start), min(count, (first + i + 1) * c - start)
            return nonfinite_count(rows[lo:hi], spec.encoding, self.dtype)

        n = range(len(paths))
        counts = pool.map(one, n) if pool is not None and len(paths) > 1 else map(one, n)
        return torch.from_numpy(rows), sum(counts)

    def _error(self, spec: ArraySpec, ci: int, err: BaseException) -> ChunkReadError:
        return ChunkReadError(f"{spec.name} chunk {ci} ({self.chunk_path(spec, ci)}): {type(err).__name__}: {err}")

    def chunk(self, spec: ArraySpec, ci: int) -> np.ndarray:
        """Decoded chunk ``ci`` of an array (chunk_rows rows; the last one is zero-padded)."""
        cached = self._cache.get(spec.name)
        if cached is not None and cached[0] == ci:
            return cached[1]
        data = np.empty((spec.chunk_rows, *spec.shape_tail), dtype=spec.dtype)
        self._read_chunk(spec, ci, data)
        self._cache[spec.name] = (ci, data)
        return data

    def _read_chunk(self, spec: ArraySpec, ci: int, out: np.ndarray) -> None:
        """Decode chunk ``ci`` into ``out`` (one whole chunk), checked when asked."""
        if spec.compressor.raw and self._local:  # straight from the file into the output
            view = memoryview(out.reshape(-1).view(np.uint8))
            self._check(self.chunk_path(spec, ci), _read_file(self.chunk_path(spec, ci), view, self._tls))
        else:
            spec.compressor.decode(self.fetch(spec, ci), out)

    def chunk_path(self, spec: ArraySpec, ci: int) -> str:
        return f"{self.dir}/{chunk_key(spec.name, ci, 1 + len(spec.shape_tail))}"

    def fetch(self, spec: ArraySpec, ci: int) -> Any:
        """The checked bytes of a chunk file (a view of a reusable buffer: use before the next fetch)."""
        path = self.chunk_path(spec, ci)
        data = _read_file(path, None, self._tls) if self._local else self.fs.cat_file(path)
        self._check(path, data)
        return data

    def _check(self, path: str, data: Any) -> None:
        if self.checksums is not None and self._digest(data) != self.checksums.get(path):
            raise ValueError(f"{self.algorithm} differs from checksums.json ({len(data):,} bytes read)")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": {}, "_tls": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _tls=threading.local())
