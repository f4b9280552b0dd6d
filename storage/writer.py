"""``ShardWriter``: writes one shard of a hidden-state store, resumable within the shard.

Usage by stage 2::

    with ShardWriter(store, shard, resume=True, background=True) as w:
        for sample in captured(skip=w.num_committed):   # samples of this shard, stable order
            w.write(sample)
            if batch_done: w.flush()                     # durable: a kill loses < 1 batch
        entry = w.finish()
    commit_shard(Manifest(store), shard, entry)         # readers see it from now on

Everything goes to ``shards/.shard-XXXXX.tmp/``. ``flush()`` fsyncs the chunks written so far,
snapshots the rows after the last full chunk (``tail-SEQ.npz``) and then appends the batch's
index rows plus a commit line to ``progress.jsonl``; a commit line is the only thing that makes
samples count. ``finish()`` writes the last partial chunks, the Arrow index and
``checksums.json`` (written last inside the temp dir: it marks the data complete), drops the
progress files and renames the directory into place.

``checksums.json`` lists ``[size, sha256]`` of every file (``files``) and, for stores whose
header names a read checksum other than sha256 (format 2: ``xxh3_64``), that digest of every
chunk file (``read_checksum``): the one the reader checks on every chunk it reads.
"""

from __future__ import annotations

import io
import logging
import os
import queue
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.core.durable import (
    DurableJsonl,
    atomic_replace_dir,
    atomic_write_bytes,
    atomic_write_json,
    fsync_dir,
    fsync_file,
    fsync_tree,
    sha256_file,
)
from pipeline.core.manifest import Manifest
from pipeline.core.shards import Shard
from storage.array_encoding import ArraySpec
from storage.checksum import LEGACY, store_checksum
from storage.columns import DEFAULT_COMPRESSION_THREADS, ChunkWriter, Column, create_array, sync_columns
from storage.layout import (
    ARRAYS_DIR,
    CHECKSUMS_NAME,
    FORMAT_VERSION,
    INDEX_NAME,
    PROGRESS_NAME,
    SHARDS_DIR,
    index_row,
    read_index,
    tmp_dir_name,
    write_index,
)
from storage.resume import ResumeState, load_progress, recover_finished, shard_entry
from storage.sample import CapturedSample, SampleError, encode_sample

log = logging.getLogger(__name__)


class StoreWriteError(RuntimeError):
    """Writing a shard failed (disk full, permissions, ...); nothing was committed."""


class ShardWriter:
    """Context manager writing one shard; see the module docstring.

    ``resume=True`` continues a temp dir left by a killed run after its last commit (or picks up
    a shard that was renamed into place but not yet recorded); otherwise a stale temp dir is
    removed. ``background=True`` encodes and compresses in a thread fed by a queue of
    ``queue_size`` samples, so the caller's forward pass overlaps the writes;
    ``compression_threads`` compress and write whole chunks meanwhile (the output does not
    depend on it). Writing needs a local (or POSIX shared) path: durability relies on fsync and
    rename.
    """

    def __init__(self, store: str | Path, shard: Shard, *, resume: bool = False,
                 background: bool = False, queue_size: int = 4,
                 compression_threads: int = DEFAULT_COMPRESSION_THREADS):
        self.store, self.shard = Path(store), shard
        header = Manifest(self.store).load()
        if "arrays" not in header:
            raise ValueError(f"{self.store} is not a hidden-state store (no header in manifest.json); "
                             f"call storage.store.create_store first")
        self.hidden_size, self.num_aux_layers = int(header["hidden_size"]), int(header["num_aux_layers"])
        self.dtype_name = header["dtype"]
        self.checksum = store_checksum(header)
        self.specs = [ArraySpec.from_json(d) for d in header["arrays"]]
        self.tmp_dir = self.store / SHARDS_DIR / tmp_dir_name(shard.index)
        self.final_dir = self.store / SHARDS_DIR / shard.name
        self._rows: list[dict[str, Any]] = []  # index rows, committed first
        self._files: dict[str, list[Any]] = {}  # committed chunk files -> [size, sha256(, fast)]
        self._offsets = {"tokens": 0, "last": 0, "audio": 0}
        self._seq = 0
        self._error: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")
        self._chunks = ChunkWriter(compression_threads, self.checksum)
        self._finished: dict[str, Any] | None = recover_finished(self.tmp_dir, self.final_dir) if resume else None
        if self._finished is None:
            self._guard(lambda: self._open(resume))
        else:  # complete already: its index says which samples it holds
            self._rows = read_index((self.final_dir / INDEX_NAME).read_bytes()).to_pylist()
        self.num_committed = len(self._rows)
        self._queue: queue.Queue | None = None
        if background and self._finished is None:
            self._queue = queue.Queue(maxsize=queue_size)
            self._thread = threading.Thread(target=self._worker, name=f"writer-{shard.name}", daemon=True)
            self._thread.start()

    # ---- setup -------------------------------------------------------------------------------

    def _open(self, resume: bool) -> None:
        state = load_progress(self.tmp_dir, self._header_line()) if resume else None
        if state is None:
            self._create()
        else:
            self._restore(state)

    def _header_line(self) -> dict[str, Any]:
        return {"kind": "header", "shard": self.shard.name, "arrays": [s.to_json() for s in self.specs]}

    def _create(self) -> None:
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        attrs = {"format_version": FORMAT_VERSION, "shard": self.shard.name,
                 "arrays": [s.to_json() for s in self.specs]}
        group = zarr.open_group(str(self.tmp_dir / ARRAYS_DIR), mode="w", zarr_format=3, attributes=attrs)
        self._cols = {s.name: Column(self.tmp_dir, create_array(group, s), s, self._chunks) for s in self.specs}
        fsync_tree(self.tmp_dir)
        self._log = DurableJsonl(self.tmp_dir / PROGRESS_NAME)
        self._log.append_many([self._header_line()])

    def _restore(self, state: ResumeState) -> None:
        group = zarr.open_group(str(self.tmp_dir / ARRAYS_DIR), mode="r+", zarr_format=3)
        self._cols = {}
        for s in self.specs:
            arr = group[s.name]
            full = state.full_rows[s.name]
            if arr.shape[0] != full:  # drop chunks written after the last commit
                arr.resize((full, *s.shape_tail))
            self._cols[s.name] = Column(self.tmp_dir, arr, s, self._chunks, full, state.tails[s.name])
        self._rows, self._files, self._seq = state.rows, state.files, state.seq
        if self._rows:
            last = self._rows[-1]
            self._offsets = {"tokens": last["tok_offset"] + last["num_tokens"],
                             "last": last["last_offset"] + last["num_last"],
                             "audio": last["audio_offset"] + last["num_audio"]}
        self._log = DurableJsonl(self.tmp_dir / PROGRESS_NAME)
        log.info("%s: resuming after %d committed samples", self.tmp_dir, len(self._rows))

    # ---- writing -------------------------------------------------------------------------------

    @property
    def num_written(self) -> int:
        """Samples accepted so far (committed or not)."""
        return len(self._rows)

    @property
    def committed_ids(self) -> list[str]:
        return [r["id"] for r in self._rows[: self.num_committed]]

    def write(self, sample: CapturedSample) -> None:
        """Append one sample. Raises :class:`SampleError` (writer still usable) for a malformed
        or non-finite sample, :class:`StoreWriteError` once a write has failed."""
        self._raise_if_failed()
        if self._finished is not None:
            raise ValueError(f"{self.final_dir} is already complete; nothing more can be written")
        sample.validate(hidden_size=self.hidden_size, num_aux_layers=self.num_aux_layers)
        if str(sample.aux_hidden.dtype).removeprefix("torch.") != self.dtype_name:
            raise SampleError(f"sample {sample.id!r}: store holds {self.dtype_name}, got {sample.aux_hidden.dtype}")
        counts = {"tokens": sample.num_tokens, "last": int(sample.last_hidden.shape[0]),
                  "audio": int(sample.audio_embeds.shape[0])}
        self._rows.append(index_row(sample.id, sample.source_hash, counts, dict(self._offsets),
                                    sample.num_loss_tokens, sample.audio_spans, sample.meta))
        for k, n in counts.items():
            self._offsets[k] += n
        if self._queue is not None:
            self._queue.put(sample)
        else:
            self._guard(lambda: self._append(sample))

    def _append(self, sample: CapturedSample) -> None:
        specs = {s.name: s for s in self.specs}
        for name, rows in encode_sample(sample, specs).items():
            self._cols[name].append(rows)

    def _worker(self) -> None:
        assert self._queue is not None
        while True:
            sample = self._queue.get()
            try:
                if sample is not None and self._error is None:
                    self._append(sample)
            except BaseException as err:  # re-raised by the caller's next write/flush/finish
                self._error = err
            finally:
                self._queue.task_done()
            if sample is None:
                return

    def flush(self) -> None:
        """Make every sample written so far durable; afterwards ``num_committed == num_written``."""
        self._drain()
        if self.num_committed == len(self._rows) and self._seq:
            return
        self._guard(self._commit)

    def _sync(self) -> dict[str, list[Any]]:
        return sync_columns(list(self._cols.values()), self._pool)

    def _commit(self) -> None:
        files = self._sync()
        self._seq += 1
        buf = io.BytesIO()
        np.savez(buf, **{name: col.tail() for name, col in self._cols.items()})
        tail_name = f"tail-{self._seq:06d}.npz"
        atomic_write_bytes(self.tmp_dir / tail_name, buf.getvalue())
        commit = {"kind": "commit", "seq": self._seq, "num_samples": len(self._rows),
                  "rows": {n: c.rows for n, c in self._cols.items()},
                  "full_rows": {n: c.full_rows for n, c in self._cols.items()},
                  "files": files, "tail": tail_name, "tail_sha256": sha256_file(self.tmp_dir / tail_name)}
        new_rows = [{"kind": "sample", **r} for r in self._rows[self.num_committed:]]
        self._log.append_many([*new_rows, commit])
        self._files.update(files)
        self.num_committed = len(self._rows)
        (self.tmp_dir / f"tail-{self._seq - 1:06d}.npz").unlink(missing_ok=True)

    def finish(self) -> dict[str, Any]:
        """Complete the shard, rename it into place and return its manifest entry."""
        if self._finished is not None:
            return self._finished
        self.flush()
        self._stop_worker()
        self._finished = self._guard(self._finalize)
        return self._finished

    def _finalize(self) -> dict[str, Any]:
        files = dict(self._files)
        for col in self._cols.values():
            col.write_last_chunk()
        files.update(self._sync())
        write_index(str(self.tmp_dir / INDEX_NAME), self._rows)
        fsync_file(self.tmp_dir / INDEX_NAME)
        for rel in [INDEX_NAME, f"{ARRAYS_DIR}/zarr.json", *(f"{ARRAYS_DIR}/{s.name}/zarr.json" for s in self.specs)]:
            path = self.tmp_dir / rel
            files[rel] = [path.stat().st_size, sha256_file(path)]
        summary = {
            "name": self.shard.name, "num_samples": len(self._rows),
            "num_tokens": self._offsets["tokens"], "num_last": self._offsets["last"],
            "num_audio": self._offsets["audio"],
            "num_loss_tokens": sum(r["num_loss_tokens"] for r in self._rows),
            "num_files": len(files) + 1, "data_bytes": sum(v[0] for v in files.values()),
        }
        listing: dict[str, Any] = {"summary": summary,
                                   "files": {rel: entry[:2] for rel, entry in sorted(files.items())}}
        if self.checksum != LEGACY:
            listing["read_checksum"] = {"algorithm": self.checksum, "files": {
                rel: entry[2] for rel, entry in sorted(files.items()) if len(entry) > 2}}
        # written last inside the temp dir: from here on the data is complete (see resume.py)
        atomic_write_json(self.tmp_dir / CHECKSUMS_NAME, listing)
        self._log.close()
        for name in os.listdir(self.tmp_dir):
            if name == PROGRESS_NAME or name.startswith("tail-"):
                os.unlink(self.tmp_dir / name)
        fsync_dir(self.tmp_dir)
        # every file and directory is durable by now: re-fsyncing ~1,000 files would double
        # the shard's fsync time for nothing
        atomic_replace_dir(self.tmp_dir, self.final_dir, synced=True)
        return shard_entry(self.final_dir)

    # ---- errors and the background thread ------------------------------------------------------

    def _guard(self, fn: Any) -> Any:
        try:
            return fn()
        except (SampleError, StoreWriteError):
            raise
        except Exception as err:
            self._error = err
            self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            err = self._error
            raise StoreWriteError(f"writing shard {self.shard.name} in {self.tmp_dir} failed: "
                                  f"{type(err).__name__}: {err}. Nothing of this shard was committed; a resumed "
                                  f"writer continues after its last flush.") from err

    def _drain(self) -> None:
        if self._queue is not None:
            self._queue.join()
        self._raise_if_failed()

    def _stop_worker(self) -> None:
        if self._queue is not None:
            self._queue.put(None)
            self._thread.join()
            self._queue = None

    def close(self) -> None:
        """Stop the writer without finishing (the temp dir stays for a resume)."""
        self._stop_worker()
        self._chunks.shutdown()
        self._pool.shutdown()
        if hasattr(self, "_log"):
            self._log.close()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: type | None, *exc: object) -> None:
        if exc_type is None and self._finished is None:
            self.finish()
        self.close()


def commit_shard(manifest: Manifest, shard: Shard, entry: dict[str, Any]) -> None:
    """Record a finished shard in the manifest: from now on readers see it."""
    if entry.get("status") != "done" or entry.get("name") != shard.name:
        raise ValueError(f"entry {entry.get('name')!r} is not a finished entry for {shard.name}")
    manifest.mark_shard(shard.index, entry)


