"""Store codecs, read checksums and the fast read path: every codec round-trips exactly and is
zarr-readable, format-1 stores (sha256, written before format 2) still read and check, corrupt
chunks are caught whatever the codec, the NaN/Inf test agrees with a brute-force one on every bit
pattern, compression threads do not change a byte, and fp8 rows dequantized on the "device" equal
the loader's own dequantization. Real zarr/Arrow files under tmp_path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from test_store import LENGTHS, bits, build, make_samples

from modeling.training.data import PackedRows, dequantize_row, read_or_skip
from pipeline.core.manifest import Manifest
from storage.chunk_compression import nonfinite_count
from storage.layout import SHARDS_DIR
from storage.reader import ChunkReadError
from storage.store import open_store

HIDDEN = ("aux_hidden", "last_hidden", "audio_embeds")


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted((root / SHARDS_DIR).rglob("*")) if p.is_file()}


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
def test_every_codec_round_trips_bit_exact_and_zarr_reads_it(tmp_path: Path, codec: str) -> None:
    samples = make_samples()
    shards = build(tmp_path, samples, codec=codec)
    header = Manifest(tmp_path).load()
    assert (header["format_version"], header["checksum"], header["codec"]) == (2, "xxh3_64", codec)
    store = open_store(tmp_path, verify_chunks=True, read_threads=2)
    for got, ref in zip(store.iter_samples(), samples, strict=True):
        for name in HIDDEN:
            assert torch.equal(bits(got[name]), bits(getattr(ref, name))), name
        assert got["nonfinite"] == {}
    # a sample changed in place (raw chunks are mapped: copy on write) leaves the store as it was
    store[3]["aux_hidden"].view(torch.int16).zero_()
    assert torch.equal(bits(store[3]["aux_hidden"]), bits(samples[3].aux_hidden))
    group = zarr.open_group(str(tmp_path / SHARDS_DIR / shards[0].name / "arrays"), mode="r")
    assert np.array_equal(group["aux_hidden"][: LENGTHS[0]].reshape(LENGTHS[0], 3, -1),
                          samples[0].aux_hidden.view(torch.uint16).numpy())
    assert store.validate(deep=True) == []


def test_compression_threads_do_not_change_a_byte(tmp_path: Path) -> None:
    samples = make_samples()
    for threads in (1, 3):
        build(tmp_path / f"t{threads}", samples, background=True, compression_threads=threads)
    one, three = _shard_bytes(tmp_path / "t1"), _shard_bytes(tmp_path / "t3")
    assert one.keys() == three.keys() and one == three


def test_format_1_store_reads_and_checks_sha256(tmp_path: Path) -> None:
    """sha256 + zstd is the header stores had before format 2, key for key (so they resume)."""
    samples = make_samples()
    shards = build(tmp_path, samples, checksum="sha256", codec="zstd")
    header = Manifest(tmp_path).load()
    assert header["format_version"] == 1 and "checksum" not in header and "codec" not in header
    sums = json.loads((tmp_path / SHARDS_DIR / shards[0].name / "checksums.json").read_text())
    assert "read_checksum" not in sums and all(len(v) == 2 for v in sums["files"].values())
    store = open_store(tmp_path, verify_chunks=True)
    assert store.checksum == "sha256"
    assert torch.equal(bits(store.by_id("s004")["aux_hidden"]), bits(samples[4].aux_hidden))
    chunk = tmp_path / SHARDS_DIR / shards[0].name / "arrays/aux_hidden/c.1.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    with pytest.raises(ChunkReadError, match=r"aux_hidden chunk 1 .*c\.1\.0\): ValueError: sha256 differs"):
        open_store(tmp_path, verify_chunks=True)[1]


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_flipped_and_truncated_chunks_are_caught(tmp_path: Path, codec: str) -> None:
    samples = make_samples()
    shards = build(tmp_path, samples, codec=codec)
    chunk = tmp_path / SHARDS_DIR / shards[0].name / "arrays/aux_hidden/c.1.0"
    pristine = chunk.read_bytes()
    flipped = bytearray(pristine)
    flipped[len(flipped) // 3] ^= 0x40  # one bit: same size, and a raw chunk "decodes" fine
    chunk.write_bytes(bytes(flipped))
    store = open_store(tmp_path, verify_chunks=True)
    with pytest.raises(ChunkReadError, match=r"aux_hidden chunk 1 .*xxh3_64 differs from checksums.json"):
        store[1]  # sample 1 (rows 37-126) covers chunk 1 (rows 32-63)
    assert any("c.1.0 does not match its xxh3_64" in p for p in store.validate(deep=True))
    chunk.write_bytes(pristine[: len(pristine) // 2])
    for verify in (True, False):  # a raw chunk of the wrong size is refused even unchecked
        with pytest.raises(ChunkReadError, match="aux_hidden chunk 1"):
            open_store(tmp_path, verify_chunks=verify)[1]


def test_nonfinite_count_agrees_with_brute_force_on_every_bit_pattern() -> None:
    every16 = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        values = torch.from_numpy(every16.view(np.int16)).view(torch_dtype)
        expected = ~torch.isfinite(values.float())
        assert nonfinite_count(every16, "bits", dtype) == int(expected.sum())
        for i in np.flatnonzero(expected.numpy())[::97]:  # one bad value among clean ones
            clean = np.zeros(1000, dtype=np.uint16)
            clean[321] = every16[i]
            assert nonfinite_count(clean, "bits", dtype) == 1
    every8 = np.arange(256, dtype=np.uint16).astype(np.uint8)
    as_fp8 = torch.from_numpy(every8).view(torch.float8_e4m3fn).float()
    assert nonfinite_count(every8, "fp8", "") == int((~torch.isfinite(as_fp8)).sum()) == 2
    assert nonfinite_count(np.array([1.0, np.inf, 0.0, 2.0], np.float32), "scale", "") == 2


@pytest.mark.parametrize("codec", ["none", "zstd"])
def test_fp8_rows_dequantized_on_the_device_equal_the_loaders(tmp_path: Path, codec: str) -> None:
    samples = make_samples()
    build(tmp_path, samples, quantization="fp8", codec=codec)
    store = open_store(tmp_path, verify_chunks=True)
    raw = store.sample(4, dequantize=False)
    assert raw["aux_hidden"].dtype == torch.uint8 and raw["aux_hidden_scale"].shape == (LENGTHS[4], 3)
    rows = [np.arange(len(samples))]
    cpu = PackedRows(store, rows, batch_tokens=400, with_audio=True)[0]
    device = dequantize_row(PackedRows(store, rows, batch_tokens=400, with_audio=True, dequantize=False)[0],
                            torch.bfloat16)
    assert set(cpu) == set(device)
    for key in ("aux_hidden", "target_hidden", "audio_embeds", "input_ids", "loss_mask"):
        assert cpu[key].dtype == device[key].dtype and torch.equal(cpu[key].view(-1), device[key].view(-1)), key
    # a NaN byte in the stored fp8 rows is found on the raw path too
    shard = store.shard_readers()[0]
    chunk = Path(shard.chunk_path(store.specs["aux_hidden"], 0))
    spec = store.specs["aux_hidden"]
    q = np.empty((spec.chunk_rows, spec.width), np.uint8)
    spec.compressor.decode(chunk.read_bytes(), q)
    q[3, 5] = 0x7F  # e4m3fn NaN; row 3 belongs to sample 0
    chunk.write_bytes(bytes(spec.compressor.encode(q)))
    _sample, why = read_or_skip(open_store(tmp_path), 0, dequantize=False)
    assert why is not None and why["reason"] == "aux_hidden has 1 non-finite values"


def test_stage_2_continues_a_format_1_store_in_its_own_format(tmp_path: Path, tiny_target: Path,
                                                               fixtures_dir: Path) -> None:
    """A rerun of stage 2 into a store begun before format 2 keeps sha256 and its codec (auto);
    asking for another codec is refused with the keys that differ."""
    from pipeline.core.manifest import ManifestMismatch
    from pipeline.data.inputs import read_input
    from stages.dump import DumpConfig, Target, open_store_for

    cfg = DumpConfig(target=str(tiny_target), input=str(fixtures_dir / "speech.jsonl"), store=str(tmp_path / "s"))
    target, inputs = Target(cfg), read_input(cfg.input)
    open_store_for(cfg, target, inputs)
    assert Manifest(cfg.store).load()["checksum"] == "xxh3_64"
    Manifest(cfg.store).update(lambda m: [m.pop("checksum"), m.pop("codec"), m.update(format_version=1)])
    before = {k: v for k, v in Manifest(cfg.store).load().items() if k != "updated"}
    open_store_for(cfg, target, inputs)
    assert {k: v for k, v in Manifest(cfg.store).load().items() if k != "updated"} == before
    assert open_store(cfg.store).checksum == "sha256"
    cfg.store_codec = "none"
    with pytest.raises(ManifestMismatch, match="format_version"):
        open_store_for(cfg, target, inputs)
