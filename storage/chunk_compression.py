"""One chunk file's bytes: the codec that turns rows into them and back, and the NaN/Inf test.

Codecs per store (``--store-codec``; measured by ``python -m benchmarks.bench_store``, H=4096 bf16
activations, 1.5 MiB chunks, one thread on this project's 2-core Xeon):

- ``zstd`` (default): Blosc zstd-1 + byte-shuffle, 1 MiB blocks: 71.5% of raw, compress ~0.3-0.5
  GB/s, decompress ~2.2 GB/s. The smallest store (0.63x SpecForge's bytes); decode is most of a
  read.
- ``lz4``: Blosc lz4 (level 9, byte-shuffle, 1 MiB blocks): 90.5% of raw at ~4 GB/s decompress.
  bf16 mantissa bytes are noise and lz4 has no entropy coder, so it saves little; measured for
  completeness, rarely the right choice.
- ``none``: the raw rows (the zarr ``bytes`` codec only): 100% of raw (~0.87x SpecForge's bytes at
  H=4096, since the store keeps last_hidden only where the loss needs it), no decode at all: a
  read is one copy out of the page cache (~10 GB/s) plus the checksum. For training nodes short
  of CPU.

Index arrays and fp8 scales (a few bytes per token) are always zstd-1 + byte-shuffle.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numcodecs.blosc
import numpy as np

CODECS = ("zstd", "lz4", "none")
DEFAULT_CODEC = "zstd"
SHUFFLES = {"noshuffle": numcodecs.blosc.NOSHUFFLE, "shuffle": numcodecs.blosc.SHUFFLE,
            "bitshuffle": numcodecs.blosc.BITSHUFFLE}
# exponent bits all ones = NaN/Inf, per stored half-precision dtype
NONFINITE_EXPONENT = {"bfloat16": 0x7F80, "float16": 0x7C00}


@dataclasses.dataclass(frozen=True)
class Compressor:
    """Blosc settings of one array (the zarr v3 ``blosc`` codec), or ``cname="none"``: raw rows."""

    cname: str = "zstd"
    clevel: int = 1
    shuffle: str = "shuffle"  # noshuffle | shuffle (bytes) | bitshuffle
    blocksize: int = 0  # bytes; 0 = Blosc's automatic choice

    @property
    def raw(self) -> bool:
        return self.cname == "none"

    def to_zarr(self, typesize: int) -> list[Any]:
        """zarr ``compressors``: none for raw chunks, so zarr itself reads every store."""
        if self.raw:
            return []
        from zarr.codecs import BloscCodec

        return [BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle, typesize=typesize,
                           blocksize=self.blocksize)]

    def encode(self, rows: np.ndarray) -> bytes | memoryview:
        """A chunk file's bytes; the same bytes zarr's codec pipeline writes for these rows.

        One Blosc thread per call (``_ctx`` variant off the main thread), so the output does not
        depend on how many chunks are compressed at once: resumed shards stay byte-identical.
        """
        if self.raw:
            return memoryview(np.ascontiguousarray(rows)).cast("B")
        return numcodecs.blosc.compress(np.ascontiguousarray(rows), self.cname.encode(), self.clevel,
                                        SHUFFLES[self.shuffle], self.blocksize)

    def decode(self, data: Any, out: np.ndarray) -> None:
        """Decode a chunk file's bytes into ``out`` (a whole chunk of rows)."""
        if self.raw:
            if len(data) != out.nbytes:
                raise ValueError(f"raw chunk has {len(data):,} bytes, expected {out.nbytes:,}")
            out.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, dtype=np.uint8)
        else:
            numcodecs.blosc.decompress(data, out)


def hidden_compressors(codec: str) -> tuple[Compressor, Compressor]:
    """(bf16 bits, fp8 bytes) compressors of a store with ``codec``."""
    if codec == "zstd":  # see storage/array_encoding.py for the measurements behind these two
        return Compressor("zstd", 1, "shuffle", 1 << 20), Compressor("zstd", 1, "noshuffle", 1 << 18)
    if codec == "lz4":
        return Compressor("lz4", 9, "shuffle", 1 << 20), Compressor("lz4", 9, "noshuffle", 1 << 18)
    if codec == "none":
        raw = Compressor("none", 0, "noshuffle", 0)
        return raw, raw
    raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")


def nonfinite_count(rows: np.ndarray, encoding: str, dtype: str) -> int:
    """NaN/Inf values among stored rows: half-precision ``bits`` (exponent all ones), ``fp8``
    e4m3fn bytes (0x7F/0xFF, it has no Inf), ``scale`` (not finite, or <= 0); 0 for ints.

    The clean case is two max reductions and no temporary: a value x is non-finite iff
    ``x & 0x7FFF >= E``, i.e. x >= 0x8000|E as unsigned (negative) or x >= E as signed (positive).
    ~40 GB/s on a 1.5 MiB chunk still in cache, vs ~12 GB/s for mask-then-max (one thread).
    """
    if not rows.size:
        return 0
    flat = rows.reshape(-1)
    if encoding == "bits":
        e = NONFINITE_EXPONENT[dtype]
        if int(flat.max()) < (0x8000 | e) and int(flat.view(np.int16).max()) < e:
            return 0
        return int(np.count_nonzero((flat & e) == e))
    if encoding == "fp8":
        if int(flat.max()) < 0xFF and int(flat.view(np.int8).max()) < 0x7F:
            return 0
        return int(np.count_nonzero((flat & 0x7F) == 0x7F))
    if encoding == "scale":
        return int(np.count_nonzero(~np.isfinite(flat) | (flat <= 0)))
    return 0
