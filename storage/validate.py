"""``HiddenStateStore.validate``: compare manifest, checksums, indexes and arrays.

Shallow (default, reads only small files): every committed shard has its ``checksums.json`` with
the sha256 the manifest recorded; every listed file exists with its size; index, metadata and
``zarr.json`` files match their sha256; index offsets are contiguous and agree with the array
shapes and the chunk files present. Deep: also hashes every chunk file (sha256, and the read
checksum of format-2 stores: what training would refuse), decodes every chunk and scans the
hidden arrays for NaN/Inf (bf16/fp16: exponent all ones; fp8 e4m3fn: 0x7F/0xFF).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from typing import Any

import numpy as np

from storage.array_encoding import ArraySpec
from storage.checksum import LEGACY, digest_fn
from storage.layout import ARRAYS_DIR, CHECKSUMS_NAME, INDEX_NAME, ROW_SPACES
from storage.reader import ShardReader

NONFINITE_BITS = {"bfloat16": 0x7F80, "float16": 0x7C00}  # exponent mask: all ones = NaN/Inf


def validate_store(store: Any, deep: bool = False) -> list[str]:
    problems: list[str] = []
    for entry, shard in zip(store.entries.values(), store.shard_readers(), strict=True):
        problems += _validate_shard(store, entry, shard, deep)
    ids = Counter(sid for shard in store.shard_readers() for sid in shard.ids())
    problems += [f"sample id {sid!r} occurs {n} times" for sid, n in ids.items() if n > 1]
    return problems


def _sha256(fs: Any, path: str) -> str:
    digest = hashlib.sha256()
    with fs.open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _validate_shard(store: Any, entry: dict[str, Any], shard: ShardReader, deep: bool) -> list[str]:
    fs, name = store.fs, shard.name
    path = f"{shard.dir}/{CHECKSUMS_NAME}"
    if not fs.exists(path):
        return [f"{name}: {CHECKSUMS_NAME} is missing"]
    out = []
    if _sha256(fs, path) != entry.get("checksums_sha256"):
        out.append(f"{name}: {CHECKSUMS_NAME} does not match the checksum in the manifest")
    listing = json.loads(fs.cat_file(path))
    summary = listing["summary"]
    for key in ("num_samples", "num_tokens", "num_last", "num_audio"):
        if summary.get(key) != entry.get(key):
            out.append(f"{name}: {key} is {summary.get(key)} in {CHECKSUMS_NAME} but {entry.get(key)} in the manifest")
    files = listing["files"]
    out += _check_files(fs, shard, files, deep)
    if deep and store.checksum != LEGACY:
        out += _check_read_checksums(fs, shard, listing, files, store.checksum)
    out += _check_index(shard, summary)
    for spec in store.specs.values():
        out += _check_array(fs, shard, spec, files)
        if deep:
            out += _scan_array(shard, spec, store.header["dtype"])
    return out


def _check_files(fs: Any, shard: ShardReader, files: dict[str, list[Any]], deep: bool) -> list[str]:
    out = []
    for rel, (size, sha) in files.items():
        path = f"{shard.dir}/{rel}"
        if not fs.exists(path):
            out.append(f"{shard.name}: {rel} is missing")
        elif fs.size(path) != size:
            out.append(f"{shard.name}: {rel} has {fs.size(path)} bytes, {CHECKSUMS_NAME} says {size}")
        elif (deep or not rel.split("/")[-1].startswith("c.")) and _sha256(fs, path) != sha:
            out.append(f"{shard.name}: {rel} does not match its sha256 in {CHECKSUMS_NAME}")
    if INDEX_NAME not in files:
        out.append(f"{shard.name}: {INDEX_NAME} is not listed in {CHECKSUMS_NAME}")
    return out


def _check_read_checksums(fs: Any, shard: ShardReader, listing: dict[str, Any], files: dict[str, list[Any]],
                          algorithm: str) -> list[str]:
    """Every chunk's read checksum, as training checks it (a chunk without one is unreadable there)."""
    listed = listing.get("read_checksum", {})
    if listed.get("algorithm") != algorithm:
        return [f"{shard.name}: {CHECKSUMS_NAME} has no {algorithm} read checksums"]
    digest, out = digest_fn(algorithm), []
    for rel in files:
        if rel.split("/")[-1].startswith("c.") and fs.exists(f"{shard.dir}/{rel}"):
            if listed["files"].get(rel) != digest(fs.cat_file(f"{shard.dir}/{rel}")):
                out.append(f"{shard.name}: {rel} does not match its {algorithm} in {CHECKSUMS_NAME}")
    return out


def _check_index(shard: ShardReader, summary: dict[str, Any]) -> list[str]:
    out = []
    if len(shard) != summary["num_samples"]:
        out.append(f"{shard.name}: index has {len(shard)} samples, {CHECKSUMS_NAME} says {summary['num_samples']}")
    for rows, prefix in ROW_SPACES.items():
        counts = shard.col("num_tokens" if rows == "tokens" else f"num_{rows}")
        offsets = shard.col(f"{prefix}_offset")
        expected = np.concatenate([[0], np.cumsum(counts)[:-1]]) if len(counts) else counts
        bad = np.flatnonzero(offsets != expected)
        if len(bad):
            out.append(f"{shard.name} sample {bad[0]} ({shard.ids()[bad[0]]!r}): {prefix}_offset "
                       f"{offsets[bad[0]]} != {expected[bad[0]]} (offsets are not contiguous)")
    all_spans = shard.table.column("audio_spans").to_pylist()
    for row, (spans, n_tok, n_audio) in enumerate(zip(all_spans, shard.col("num_tokens"), shard.col("num_audio"),
                                                      strict=True)):
        if sum(spans[1::2]) - sum(spans[0::2]) != n_audio or any(x > n_tok for x in spans):
            out.append(f"{shard.name} sample {row} ({shard.ids()[row]!r}): audio spans {spans} disagree "
                       f"with num_audio {n_audio} / num_tokens {n_tok}")
    return out


def _check_array(fs: Any, shard: ShardReader, spec: ArraySpec, files: dict[str, list[Any]]) -> list[str]:
    meta = json.loads(fs.cat_file(f"{shard.dir}/{ARRAYS_DIR}/{spec.name}/zarr.json"))
    counts = shard.col("num_tokens" if spec.rows == "tokens" else f"num_{spec.rows}")
    total = int(counts.sum())
    if meta["shape"] != [total, *spec.shape_tail]:
        return [f"{shard.name}: {spec.name} has shape {meta['shape']}, the index needs [{total}, ...]"]
    n_chunks = -(-total // spec.chunk_rows)
    missing = [ci for ci in range(n_chunks) if _rel(shard, spec, ci) not in files]
    if missing:
        return [f"{shard.name}: {spec.name} chunks {missing[:5]} are not listed in {CHECKSUMS_NAME}"]
    return []


def _rel(shard: ShardReader, spec: ArraySpec, ci: int) -> str:
    return shard.chunk_path(spec, ci)[len(shard.dir) + 1:]


def _scan_array(shard: ShardReader, spec: ArraySpec, dtype: str) -> list[str]:
    """Decode every chunk; report undecodable chunks and non-finite values by sample."""
    out = []
    offsets = shard.col(f"{ROW_SPACES[spec.rows]}_offset")
    total = int(shard.col("num_tokens" if spec.rows == "tokens" else f"num_{spec.rows}").sum())
    buf = np.empty((spec.chunk_rows, *spec.shape_tail), dtype=spec.dtype)
    for ci in range(-(-total // spec.chunk_rows)):
        rel = _rel(shard, spec, ci)
        try:
            spec.compressor.decode(shard.fetch(spec, ci), buf)
        except Exception as err:  # any decode failure is a finding, not a crash
            out.append(f"{shard.name}: {rel} cannot be decoded ({err})")
            continue
        rows = buf[: min(spec.chunk_rows, total - ci * spec.chunk_rows)]
        bad_rows = _nonfinite_rows(rows, spec, dtype)
        for r in bad_rows[:3]:
            row = ci * spec.chunk_rows + int(r)
            sample = int(np.searchsorted(offsets, row, side="right")) - 1
            out.append(f"{shard.name} sample {sample} ({shard.ids()[sample]!r}): {spec.name} row "
                       f"{row - offsets[sample]} holds NaN/Inf")
    return out


def _nonfinite_rows(rows: np.ndarray, spec: ArraySpec, dtype: str) -> np.ndarray:
    flat = rows.reshape(len(rows), -1)
    if spec.encoding == "bits":
        mask = NONFINITE_BITS[dtype]
        bad = ((flat & mask) == mask).any(axis=1)
    elif spec.encoding == "fp8":
        bad = ((flat & 0x7F) == 0x7F).any(axis=1)
    elif spec.encoding == "scale":
        bad = ~np.isfinite(flat).all(axis=1) | (flat <= 0).any(axis=1)
    else:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(bad)
