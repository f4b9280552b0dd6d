"""Names on disk and the per-shard Arrow index, shared by the writer and the reader.

::

    STORE/
      manifest.json                    header (format, target, layers, codecs) + done shards
      shards/
        shard-00000-of-00004/          one committed shard
          arrays/                      a Zarr v3 group (attributes: format_version, shard, arrays)
            input_ids/ loss_mask/ aux_hidden/ last_hidden/ last_hidden_positions/ audio_embeds/
              zarr.json, c.<i>[.0]     token-major chunks (flat "." chunk keys: no dir per chunk)
            (fp8 stores add aux_hidden_scale/ and audio_embeds_scale/)
          index.arrow                  one row per sample: id, offsets, counts, spans, meta
          checksums.json               size + sha256 of every other file of the shard; format 2
                                       adds the read checksum (xxh3_64) of every chunk
        .shard-00001.tmp/              a shard being written (+ progress.jsonl, tail-*.npz)

The index is an Arrow IPC file rather than Parquet: 4,000 samples load in 0.13 ms vs 2.1 ms
(160 B/sample vs 70 B; both negligible next to the activations), and a store of 1,000 shards
opens in ~0.1 s instead of ~2 s.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc

FORMAT_VERSION = 2  # 2: read checksum and codec in the header (see storage/store.py)
SHARDS_DIR = "shards"
ARRAYS_DIR = "arrays"  # the Zarr group; index and checksums sit beside it, not inside
INDEX_NAME = "index.arrow"
CHECKSUMS_NAME = "checksums.json"
PROGRESS_NAME = "progress.jsonl"
ROW_SPACES = {"tokens": "tok", "last": "last", "audio": "audio"}  # row space -> index prefix

INDEX_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("source_hash", pa.string()),
    ("num_tokens", pa.int64()),
    ("num_loss_tokens", pa.int64()),
    ("tok_offset", pa.int64()),
    ("num_last", pa.int64()),
    ("last_offset", pa.int64()),
    ("num_audio", pa.int64()),
    ("audio_offset", pa.int64()),
    ("audio_spans", pa.list_(pa.int32())),  # flattened [start0, end0, start1, end1, ...]
    ("meta", pa.string()),  # JSON object, keys sorted
])


def tmp_dir_name(shard_index: int) -> str:
    return f".shard-{shard_index:05d}.tmp"


def chunk_key(array: str, chunk: int, ndim: int) -> str:
    """Path of one chunk relative to the shard dir: ``arrays/aux_hidden/c.12.0`` (all features
    of a row live in one chunk)."""
    return f"{ARRAYS_DIR}/{array}/c.{chunk}" + ".0" * (ndim - 1)


def index_row(sample_id: str, source_hash: str, counts: dict[str, int], offsets: dict[str, int],
              num_loss_tokens: int, spans: list[tuple[int, int]], meta: dict[str, Any]) -> dict[str, Any]:
    """One index row; ``counts``/``offsets`` are keyed by row space (tokens, last, audio)."""
    return {
        "id": sample_id,
        "source_hash": source_hash,
        "num_tokens": counts["tokens"],
        "num_loss_tokens": num_loss_tokens,
        "tok_offset": offsets["tokens"],
        "num_last": counts["last"],
        "last_offset": offsets["last"],
        "num_audio": counts["audio"],
        "audio_offset": offsets["audio"],
        "audio_spans": [int(x) for span in spans for x in span],
        "meta": json.dumps(meta, sort_keys=True, ensure_ascii=False, default=str),
    }


def write_index(path: str, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    with pa.OSFile(path, "wb") as fh, ipc.new_file(fh, INDEX_SCHEMA) as writer:
        writer.write_table(table)


def read_index(data: bytes) -> pa.Table:
    return ipc.open_file(pa.BufferReader(data)).read_all()


def spans_of(flat: list[int]) -> list[tuple[int, int]]:
    return [(int(flat[i]), int(flat[i + 1])) for i in range(0, len(flat), 2)]
