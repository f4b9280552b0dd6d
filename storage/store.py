"""Create a hidden-state store and read it back: ``create_store`` / ``open_store``.

Opening reads ``manifest.json`` and one Arrow index per done shard, nothing else: no directory
listing, so a store of 1M samples in 500 shards opens in well under a second (SpecForge #733:
hours of start-up listing per-sample files). Shards not marked done in the manifest do not
exist for the reader. Samples are read by decoding the needed Zarr chunks directly (Blosc
frames or raw rows, :mod:`storage.reader`) rather than through zarr's async machinery; the store
is plain data (paths, numpy offsets, Arrow tables), so it pickles into DataLoader workers and
each worker opens its own files.

Several stores of one target read as one (:func:`join_stores`): a training set mixed from caches
made by separate stage-2 runs (spoken and typed prompts, greedy and sampled answers) without
copying a byte.

Format 2 (new stores) records ``checksum`` (the digest reads check, default xxh3_64) and
``codec`` (zstd, lz4 or none) in the header. A format-1 store has neither: it is read, checked
(sha256) and extended exactly as it was written.
"""

from __future__ import annotations

import bisect
import copy
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import torch

from pipeline.core.manifest import Manifest
from storage import checksum as checksums
from storage.array_encoding import QUANTIZATIONS, TARGET_CHUNK_BYTES, ArraySpec, array_specs
from storage.chunk_compression import CODECS, DEFAULT_CODEC
from storage.layout import CHECKSUMS_NAME, FORMAT_VERSION, INDEX_NAME, SHARDS_DIR, read_index, spans_of
from storage.reader import ShardReader

# a store written with other settings must not be extended: these keys must agree on resume
STORE_MUST_MATCH = ("kind", "format_version", "target", "aux_layers", "hidden_size", "num_aux_layers",
                    "dtype", "quantization", "arrays", "checksum", "codec")


def make_header(*, target_path: str, target_config_hash: str, hidden_size: int, layer_ids: list[int],
                layer_convention: str, layer_ids_by_convention: dict[str, list[int]],
                dtype: str = "bfloat16", quantization: str = "none", fp8_last_hidden: bool = False,
                chunk_bytes: int = TARGET_CHUNK_BYTES, codec: str = DEFAULT_CODEC,
                checksum: str = checksums.DEFAULT) -> dict[str, Any]:
    """The store header: target identity, aux layers (ids in every convention), codecs.

    ``checksum="sha256"`` with a Blosc codec gives exactly the format-1 header of the stores
    written before format 2 (so they can be resumed and extended as they are).

    ``layer_ids_by_convention`` maps each convention (e.g. ``hf_hidden_states``, where 0 is the
    embedding output, and ``decoder_layer``, 0 = first layer's output) to the same layers' ids;
    it must include ``layer_convention`` with ``layer_ids``.
    """
    if layer_ids_by_convention.get(layer_convention) != list(layer_ids):
        raise ValueError(f"layer_ids_by_convention[{layer_convention!r}] must equal layer_ids {layer_ids}, "
                         f"got {layer_ids_by_convention.get(layer_convention)}")
    if dtype not in ("bfloat16", "float16"):
        raise ValueError(f"dtype must be bfloat16 or float16, got {dtype!r}")
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    if codec not in CODECS:
        raise ValueError(f"codec must be one of {CODECS}, got {codec!r}")
    checksums.digest_fn(checksum)  # known?
    specs = array_specs(hidden_size, len(layer_ids), quantization, fp8_last_hidden, chunk_bytes, codec)
    lossy = [s.name for s in specs if s.encoding == "fp8"]
    format_1 = checksum == checksums.LEGACY and codec != "none"  # what a format-1 reader reads
    header = {
        "kind": "hidden_state_store",
        "format_version": 1 if format_1 else FORMAT_VERSION,
        "target": {"path": target_path, "config_hash": target_config_hash},
        "aux_layers": {"convention": layer_convention, "ids": list(layer_ids),
                       "by_convention": {k: list(v) for k, v in layer_ids_by_convention.items()}},
        "num_aux_layers": len(layer_ids),
        "hidden_size": hidden_size,
        "dtype": dtype,
        "quantization": {"mode": quantization, "arrays": lossy,
                         "format": "float8_e4m3fn, per-row float32 scale = amax/448" if lossy else None},
        "arrays": [s.to_json() for s in specs],
        "index_format": "arrow-ipc",
    }
    if not format_1:
        header.update(checksum=checksum, codec=codec)
    return header


def store_codec(header: dict[str, Any]) -> str:
    """The codec of a store's hidden arrays (format 1: from its aux_hidden compressor)."""
    if "codec" in header:
        return str(header["codec"])
    aux = next(a for a in header["arrays"] if a["name"] == "aux_hidden")
    return "none" if aux["compressor"]["cname"] == "none" else str(aux["compressor"]["cname"])


def create_store(path: str | Path, header: dict[str, Any]) -> Manifest:
    """Create the store (or check that an existing one was made with the same header)."""
    manifest = Manifest(path)
    manifest.init(header, must_match=STORE_MUST_MATCH)
    (Path(path) / SHARDS_DIR).mkdir(exist_ok=True)
    return manifest


def open_store(path: str | Path, storage_options: dict[str, Any] | None = None, *,
               verify_chunks: bool = False, read_threads: int = 1) -> HiddenStateStore:
    """Open a store for reading; ``path`` may be a local path or an fsspec URL.

    ``verify_chunks``: check every chunk file read against the shard's ``checksums.json`` (the
    store's read checksum: xxh3_64, or sha256 for format 1) and count NaN/Inf in every sample
    read (``sample["nonfinite"]``). Blosc and zstd carry no checksum of their own, so a flipped
    byte inside a chunk can decode to wrong values without any error; training reads with this
    on. ``read_threads``: chunks decoded in parallel per read (1: in the calling thread).
    """
    return HiddenStateStore(str(path), storage_options or {}, verify_chunks=verify_chunks,
                            read_threads=read_threads)


def _join_key(header: dict[str, Any], key: str) -> Any:
    # one target spelled by two paths (relative, absolute) is one target: its identity hash decides
    return header.get("target", {}).get("config_hash") if key == "target" else header.get(key)


def join_stores(stores: list[HiddenStateStore]) -> HiddenStateStore:
    """Several stores read as one: the first one's header, every store's committed shards in the
    order given, sample indices running on across them.

    The stores must agree on every key that decides how a sample is read and what it means
    (``STORE_MUST_MATCH``: target identity, aux layers, dtype, quantization, arrays, codec); each
    mismatch is named. Sample ids may repeat across stores (two stage-1 passes over one input).
    """
    if not stores:
        raise ValueError("join_stores: no stores given")
    first = stores[0]
    for other in stores[1:]:
        differ = [k for k in STORE_MUST_MATCH if _join_key(first.header, k) != _join_key(other.header, k)]
        if differ:
            raise ValueError(f"{other.path} cannot be read together with {first.path}: their headers differ in "
                             f"{', '.join(differ)} (stores of one target dumped with the same stage-2 settings "
                             "can be joined)")
    if len(stores) == 1:
        return first
    joined = copy.copy(first)
    joined.path = ",".join(s.path for s in stores)
    joined.entries = {f"{s.path}:{name}": e for s in stores for name, e in s.entries.items()}
    joined._shards = [shard for s in stores for shard in s._shards]
    joined._starts = np.cumsum([0] + [len(shard) for shard in joined._shards]).tolist()
    joined._id_map, joined._pool = None, None
    return joined


class HiddenStateStore:
    """Random access to the committed samples of a store (a map-style Dataset)."""

    def __init__(self, path: str, storage_options: dict[str, Any], verify_chunks: bool = False,
                 read_threads: int = 1):
        self.path, self.storage_options, self.verify_chunks = path, storage_options, verify_chunks
        self.read_threads = read_threads
        self._pool: ThreadPoolExecutor | None = None
        self.fs, self.root = fsspec.core.url_to_fs(path, **storage_options)
        manifest = json.loads(self.fs.cat_file(f"{self.root}/manifest.json"))
        if manifest.get("kind") != "hidden_state_store":
            raise ValueError(f"{path}: manifest.json is not a hidden-state store manifest")
        if manifest["format_version"] > FORMAT_VERSION:
            raise ValueError(f"{path}: format_version {manifest['format_version']} is newer than this "
                             f"reader ({FORMAT_VERSION}); update the code")
        self.header = {k: v for k, v in manifest.items() if k != "shards"}
        self.entries = {k: v for k, v in sorted(manifest.get("shards", {}).items()) if v.get("status") == "done"}
        self.specs = {s["name"]: ArraySpec.from_json(s) for s in self.header["arrays"]}
        self.dtype = getattr(torch, self.header["dtype"])
        self.checksum = checksums.store_checksum(self.header)
        self._shards = [self._load_shard(e["name"]) for e in self.entries.values()]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards]).tolist()
        self._id_map: dict[str, int] | None = None

    def _load_shard(self, name: str) -> ShardReader:
        shard_dir = f"{self.root}/{SHARDS_DIR}/{name}"
        table = read_index(self.fs.cat_file(f"{shard_dir}/{INDEX_NAME}"))
        digests = None
        if self.verify_chunks:
            listing = json.loads(self.fs.cat_file(f"{shard_dir}/{CHECKSUMS_NAME}"))
            if self.checksum == checksums.LEGACY:
                digests = {f"{shard_dir}/{rel}": sha for rel, (_size, sha) in listing["files"].items()}
            else:
                digests = {f"{shard_dir}/{rel}": d for rel, d in listing["read_checksum"]["files"].items()}
        return ShardReader(name, shard_dir, table, self.specs, self.fs, digests, self.checksum, self.header["dtype"])

    def __len__(self) -> int:
        return self._starts[-1]

    def shards(self) -> list[dict[str, Any]]:
        """Manifest entries of the committed shards, in store order."""
        return list(self.entries.values())

    def locate(self, index: int) -> tuple[int, int]:
        """Global sample index -> (shard position, row within shard)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample index {index} out of range for a store of {len(self)} samples")
        index %= len(self)
        pos = bisect.bisect_right(self._starts, index) - 1
        return pos, index - self._starts[pos]

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.sample(index)

    def sample(self, index: int, *, dequantize: bool = True) -> dict[str, Any]:
        """Sample ``index``; ``dequantize=False`` leaves fp8 arrays as uint8 + ``<name>_scale``
        (see :func:`storage.array_encoding.decode_arrays`)."""
        pos, row = self.locate(index)
        return self._sample(pos, row, index, dequantize)

    def _sample(self, pos: int, row: int, index: int, dequantize: bool = True) -> dict[str, Any]:
        shard = self._shards[pos]
        if self._pool is None and self.read_threads > 1:
            self._pool = ThreadPoolExecutor(self.read_threads, thread_name_prefix="read")
        out = shard.read(row, self.header["hidden_size"], self.dtype, dequantize=dequantize,
                         check_finite=self.verify_chunks, pool=self._pool)
        info = shard.row_info(row)
        out.update(info, index=index, shard=shard.name)
        out["audio_spans"] = spans_of(info["audio_spans"])
        out["meta"] = json.loads(info["meta"])
        return out

    def by_id(self, sample_id: str) -> dict[str, Any]:
        if self._id_map is None:
            self._id_map = {}
            for pos, shard in enumerate(self._shards):
                for row, sid in enumerate(shard.ids()):
                    self._id_map.setdefault(sid, self._starts[pos] + row)
        if sample_id not in self._id_map:
            raise KeyError(f"no sample with id {sample_id!r} in {self.path}")
        return self[self._id_map[sample_id]]

    def iter_samples(self) -> Iterator[dict[str, Any]]:
        """All samples in store order (consecutive reads reuse each decoded chunk)."""
        for pos, shard in enumerate(self._shards):
            for row in range(len(shard)):
                yield self._sample(pos, row, self._starts[pos] + row)

    def sample_lengths(self) -> np.ndarray:
        """Tokens per sample in store order, from the indexes alone (for length bucketing)."""
        if not self._shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([s.col("num_tokens") for s in self._shards])

    def validate(self, deep: bool = False) -> list[str]:
        """Problems found, each naming its shard (and sample); see :mod:`storage.validate`."""
        from storage.validate import validate_store

        return validate_store(self, deep=deep)

    def shard_readers(self) -> list[ShardReader]:
        return list(self._shards)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_id_map"] = None  # rebuilt on demand; can be large
        state["_pool"] = None  # threads do not cross processes; made again on first read
        return state

