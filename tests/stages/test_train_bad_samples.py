"""Stage 3 on a damaged store: unreadable or non-finite samples are skipped, named and counted.

A copy of the fixture store gets one corrupt aux_hidden chunk file (64 bytes flipped, size kept:
a bad disk block; blosc decodes it without complaint, the read checksum in checksums.json catches
it) and one NaN planted in a stored value (a re-compressed chunk with its checksums updated: what
a bit flip in memory before the write would give). Which samples that touches is computed from
the Arrow index and the chunk size, independently of the reader. Each case runs on the fixture
store as stage 2 writes it now (format 2: xxh3_64 read checksums) and on the same store turned
into format 1 (sha256 only), the layout of stores written before.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numcodecs.blosc
import numpy as np
import pytest
import torch

from modeling.training.data import PackedRows, read_or_skip
from pipeline.core.durable import atomic_write_json, sha256_file
from pipeline.core.manifest import Manifest
from storage.checksum import digest_fn
from storage.store import open_store

REPO = Path(__file__).resolve().parents[2]
BF16_NAN = 0x7FC0
NAN_ROW = 5  # a token row of the first aux_hidden chunk: its sample is the NaN case


def _chunk_file(store_dir: Path, array: str, ci: int) -> Path:
    (shard,) = (store_dir / "shards").iterdir()
    return shard / "arrays" / array / f"c.{ci}.0"


def _samples_over(store_dir: Path, rows: range) -> set[str]:
    """Ids of the samples whose token range meets ``rows``, from the index alone."""
    reader = open_store(store_dir).shard_readers()[0]
    ids, off, n = reader.ids(), reader.col("tok_offset"), reader.col("num_tokens")
    return {ids[i] for i in range(len(ids)) if off[i] < rows.stop and off[i] + n[i] > rows.start}


def _rehash(chunk: Path) -> None:
    """Record a chunk file's current bytes in its shard's checksums.json (every digest it lists)."""
    sums_path = chunk.parents[2] / "checksums.json"
    sums = json.loads(sums_path.read_text())
    rel = str(chunk.relative_to(chunk.parents[2]))
    sums["files"][rel] = [chunk.stat().st_size, sha256_file(chunk)]
    if "read_checksum" in sums:
        sums["read_checksum"]["files"][rel] = digest_fn(sums["read_checksum"]["algorithm"])(chunk.read_bytes())
    sums_path.write_text(json.dumps(sums))


def _as_format_1(store_dir: Path) -> None:
    """What the writer before format 2 left: no read checksums, a header without checksum/codec."""
    shas = {}
    for sums_path in (store_dir / "shards").glob("*/checksums.json"):
        sums = json.loads(sums_path.read_text())
        del sums["read_checksum"]
        atomic_write_json(sums_path, sums)
        shas[sums_path.parent.name] = sha256_file(sums_path)

    def change(m: dict) -> None:
        for entry in m["shards"].values():
            entry["checksums_sha256"] = shas[entry["name"]]
        del m["checksum"], m["codec"]
        m["format_version"] = 1

    Manifest(store_dir).update(change)


def _copy(fixture_store: Path, dest: Path, checksum: str) -> Path:
    shutil.copytree(fixture_store, dest)
    assert open_store(dest).checksum == "xxh3_64"  # what stage 2 writes now
    if checksum == "sha256":
        _as_format_1(dest)
        assert open_store(dest).checksum == "sha256" and open_store(dest).validate(deep=True) == []
    return dest


@pytest.fixture(scope="module", params=["xxh3_64", "sha256"])
def damaged(request, fixture_store: Path, tmp_path_factory) -> tuple[Path, set[str], str, str]:
    """(store copy, ids in the corrupt chunk, id holding the NaN, the store's read checksum)."""
    store_dir = _copy(fixture_store, tmp_path_factory.mktemp("damaged") / "store", request.param)
    spec = open_store(store_dir).specs["aux_hidden"]
    c = spec.chunk_rows
    corrupt = _chunk_file(store_dir, "aux_hidden", 1)
    data = bytearray(corrupt.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2: len(data) // 2 + 64])
    corrupt.write_bytes(bytes(data))

    first = _chunk_file(store_dir, "aux_hidden", 0)
    rows = np.empty((c, *spec.shape_tail), dtype=spec.dtype)
    blob = first.read_bytes()
    numcodecs.blosc.decompress(blob, rows)
    rows[NAN_ROW, 7] = BF16_NAN
    first.write_bytes(numcodecs.blosc.compress(rows.tobytes(), b"zstd", 1, numcodecs.blosc.SHUFFLE, rows.itemsize))
    _rehash(first)
    (nan_id,) = _samples_over(store_dir, range(NAN_ROW, NAN_ROW + 1))
    return store_dir, _samples_over(store_dir, range(c, 2 * c)), nan_id, request.param


def test_rows_leave_out_exactly_the_damaged_samples(damaged, fixture_store) -> None:
    store_dir, in_chunk, nan_id, algorithm = damaged
    store, pristine = open_store(store_dir, verify_chunks=True), open_store(fixture_store)
    every = np.arange(len(store))
    batch = PackedRows(store, [every], batch_tokens=100_000, with_audio=True)[0]
    skipped = {r["id"]: r for r in batch["skipped"]}
    assert set(skipped) == in_chunk | {nan_id} and len(in_chunk) >= 2
    assert skipped[nan_id]["reason"] == "aux_hidden has 1 non-finite values"
    for sid in in_chunk:
        assert skipped[sid]["reason"].startswith("unreadable: aux_hidden chunk 1 (") and "c.1.0" in skipped[sid]["reason"]
        assert f"{algorithm} differs from checksums.json" in skipped[sid]["reason"]
        assert skipped[sid]["shard"] == "shard-00000-of-00001"
    # the rest of the row is exactly what the pristine store holds
    kept = [i for i in every if pristine[int(i)]["id"] not in skipped]
    ref = PackedRows(pristine, [np.asarray(kept)], batch_tokens=100_000, with_audio=True)[0]
    assert batch["num_samples"] == len(kept) and batch["skipped"] != ref["skipped"] == []
    for key in ("input_ids", "loss_mask", "position_ids", "aux_hidden", "target_hidden", "audio_embeds"):
        assert torch.equal(batch[key], ref[key]), key
    # a row of damaged samples only still yields a (loss-free) row for the collective step
    only_bad = np.asarray([i for i in every if pristine[int(i)]["id"] in in_chunk])
    empty = PackedRows(store, [only_bad], batch_tokens=100_000, with_audio=False)[0]
    # without the checksums the flipped bytes either stop Blosc (where they hit its block headers) or
    # decode silently into other values (where they hit the data): which one depends on where the
    # damage lands in this machine's compressed bytes; both are damage, and both are skipped
    unchecked = open_store(store_dir)
    outcomes = [read_or_skip(unchecked, int(i)) for i in only_bad]
    assert any(why is not None or not torch.equal(got["aux_hidden"], pristine[int(i)]["aux_hidden"])
               for i, (got, why) in zip(only_bad, outcomes, strict=True))
    for _got, why in outcomes:
        assert why is None or (why["reason"].startswith("unreadable: aux_hidden chunk 1 (")
                               and "blosc" in why["reason"]), why
    assert empty["num_tokens"] == 0 and int(empty["loss_mask"].sum()) == 0 and len(empty["skipped"]) == len(only_bad)


# the reader's skip decisions are checked for both checksums above; one training run is enough: the
# store as stage 2 writes it now
@pytest.mark.parametrize("damaged", ["xxh3_64"], indirect=True)
def test_training_skips_names_and_counts_them(damaged, tiny_target, tmp_path) -> None:
    store_dir, in_chunk, nan_id, algorithm = damaged
    assert algorithm == "xxh3_64"
    out = tmp_path / "run"
    # one epoch of one process visits every training row; evaluation visits every held-out row
    cmd = [sys.executable, "-m", "stages.train", "--store", str(store_dir), "--target", str(tiny_target),
           "--output", str(out), "--nproc", "1", "--zero-stage", "1", "--epochs", "1", "--save-every", "100",
           "--draft-vocab-size", "256", "--batch-tokens", "512", "--eval-fraction", "0.2", "--num-workers", "1",
           "--eval-max-batches", "0", "--log-every", "1"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    listed = [json.loads(x) for x in (out / "skipped-samples-rank00000.jsonl").read_text().splitlines()]
    assert {r["id"] for r in listed} == in_chunk | {nan_id}
    for rec in listed:
        assert f"skipped sample {rec['id']!r} (shard-00000-of-00001 row {rec['row']}): {rec['reason']}" in text
    assert f"{len(listed)} samples could not be read and were skipped" in text
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert all(np.isfinite(r["loss"]) for r in rows) and train
    run = json.loads((out / "run.json").read_text())
    skipped_train = sum(r["skipped_samples"] for r in train)
    # every training sample was either trained on or skipped, once (one epoch)
    trained_tokens = sum(r["tokens"] for r in train)
    assert 0 < skipped_train <= len(listed) and trained_tokens > 0
    # FINISHED's resources count the same trained tokens as the metrics lines; MFU is a fraction of a
    # peak read off this machine
    res = json.loads((out / "FINISHED").read_text())["resources"]
    assert res["tokens"] == trained_tokens and res["ranks"] == 1 and res["wall_s"] > 0
    assert res["achieved_flops"] == pytest.approx(res["train_flops_per_token"] * res["tokens_per_s"])
    assert res["peak_flops"] is None or 0 < res["mfu"] < 1
    assert run["split"]["train"] + run["split"]["eval"] == len(open_store(store_dir))


@pytest.mark.parametrize("checksum", ["xxh3_64", "sha256"])
def test_a_chunk_that_fails_to_decode_is_skipped_like_a_checksum_failure(fixture_store, tmp_path, checksum) -> None:
    """A truncated chunk whose checksums were (re)taken after the damage: the checksum passes, Blosc
    fails; the samples over it are skipped with the decode error, the others read as before."""
    store_dir = _copy(fixture_store, tmp_path / "store", checksum)
    spec = open_store(store_dir).specs["aux_hidden"]
    chunk = _chunk_file(store_dir, "aux_hidden", 1)
    chunk.write_bytes(chunk.read_bytes()[: chunk.stat().st_size // 2])
    _rehash(chunk)
    store = open_store(store_dir, verify_chunks=True)
    hit = _samples_over(store_dir, range(spec.chunk_rows, 2 * spec.chunk_rows))
    outcomes = {int(i): read_or_skip(store, int(i)) for i in range(len(store))}
    skipped = {why["id"]: why for _got, why in outcomes.values() if why is not None}
    assert set(skipped) == hit and hit
    for why in skipped.values():
        assert why["reason"].startswith("unreadable: aux_hidden chunk 1 (") and "differs" not in why["reason"], why
