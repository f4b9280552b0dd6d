"""Chunk checksums: a fast one checked on every read, sha256 kept for ``verify --deep``.

Blosc and zstd frames carry no checksum of their own, so the reader checks each chunk file it
reads against ``checksums.json``. Measured on this project's 2-core Xeon (SHA-NI, AVX-512), one
thread, 1.5 MiB buffers (``python -m benchmarks.bench_store`` prints the same per run):

- sha256 1.7 GB/s: next to a page-cache read (~10 GB/s) or a raw-codec chunk it is most of the
  read time, and ~1.4x an unchecked zstd read. It stays in ``checksums.json`` for every file
  (``verify --deep`` and the index/metadata checks use it), but is no longer what a read checks.
- crc32c (google-crc32c, hardware CRC) 11 GB/s, 32 bits.
- xxh3_64 (xxhash) 49 GB/s, 64 bits: ~6% of a raw read, ~2% of a zstd decode. The default.

Stores written before format 2 have only sha256 (their header has no ``checksum`` key), so
their reads go on checking sha256, as they were written to be read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

LEGACY = "sha256"  # the only checksum of format-1 stores
DEFAULT = "xxh3_64"


def _sha256(data: Any) -> str:
    return hashlib.sha256(data).hexdigest()


def _xxh3_64(data: Any) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(data)


def _crc32c(data: Any) -> str:
    import google_crc32c
    import numpy as np

    # google_crc32c takes bytes or numpy arrays, not memoryviews
    buf = data if isinstance(data, bytes | np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    return f"{google_crc32c.value(buf):08x}"


ALGORITHMS: dict[str, Callable[[Any], str]] = {"sha256": _sha256, "xxh3_64": _xxh3_64, "crc32c": _crc32c}


def digest_fn(algorithm: str) -> Callable[[Any], str]:
    """Hex digest of a bytes-like object (bytes, memoryview, contiguous numpy array)."""
    try:
        return ALGORITHMS[algorithm]
    except KeyError:
        raise ValueError(f"unknown checksum {algorithm!r}; known: {sorted(ALGORITHMS)}") from None


def store_checksum(header: dict[str, Any]) -> str:
    """The checksum a store's reads check: what it was written with (format 1: sha256)."""
    return str(header.get("checksum", LEGACY))
