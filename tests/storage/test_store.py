"""Hidden-state store: round trips, fp8, committed-only reads, kill -9 resume, write errors,
validation, sample validation, DataLoader use. Real zarr/Arrow files under tmp_path."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import zarr

from pipeline.core.manifest import Manifest, ManifestMismatch
from pipeline.core.shards import Shard, plan_shards
from storage.layout import SHARDS_DIR, tmp_dir_name
from storage.sample import CapturedSample, SampleError
from storage.store import create_store, join_stores, make_header, open_store
from storage.writer import ShardWriter, StoreWriteError, commit_shard

H = 64
# 16 KiB chunks: aux rows are 384 B, so aux chunks hold 32 rows and samples span several chunks
HEADER_KW = dict(target_path="tests/tiny-target", target_config_hash="cafe", hidden_size=H,
                 layer_ids=[2, 4, 6], layer_convention="hf_hidden_states",
                 layer_ids_by_convention={"hf_hidden_states": [2, 4, 6], "decoder_layer": [1, 3, 5]},
                 chunk_bytes=16 << 10)
LENGTHS = [37, 90, 5, 64, 130, 1, 48, 77, 33, 100, 12, 59]


def make_sample(i: int, n: int) -> CapturedSample:
    g = torch.Generator().manual_seed(i)
    loss = (torch.arange(n) >= n // 2).to(torch.uint8)
    pos = (loss[1:].nonzero().flatten() if n > 1 else torch.zeros(0, dtype=torch.int64))
    spans = [(1, 1 + n // 3)] if n >= 6 else []
    n_audio = sum(e - s for s, e in spans)
    big = torch.randn(n, 3, H, generator=g) * torch.logspace(-2, 2, H)  # wide dynamic range
    return CapturedSample(
        id=f"s{i:03d}", source_hash=f"h{i}", input_ids=torch.randint(0, 150_000, (n,), generator=g),
        loss_mask=loss, aux_hidden=big.to(torch.bfloat16),
        last_hidden=torch.randn(len(pos), H, generator=g).to(torch.bfloat16), last_hidden_positions=pos,
        audio_embeds=torch.randn(n_audio, H, generator=g).to(torch.bfloat16), audio_spans=spans,
        meta={"i": i, "lang": "en"})


def make_samples() -> list[CapturedSample]:
    return [make_sample(i, n) for i, n in enumerate(LENGTHS)]


def build(root: Path, samples: list[CapturedSample], num_shards: int = 2, commit: bool = True,
          background: bool = False, compression_threads: int = 2, **header_kw) -> list[Shard]:
    manifest = create_store(root, make_header(**{**HEADER_KW, **header_kw}))
    shards = plan_shards(len(samples), num_shards)
    for shard in shards:
        with ShardWriter(root, shard, background=background, compression_threads=compression_threads) as w:
            for i in range(shard.start, shard.stop):
                w.write(samples[i])
                if i % 3 == 2:
                    w.flush()
            entry = w.finish()
        if commit:
            commit_shard(manifest, shard, entry)
    return shards


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int16)


def test_round_trip_bit_exact(tmp_path: Path) -> None:
    samples = make_samples()
    shards = build(tmp_path, samples, background=True)
    store = open_store(tmp_path)
    assert len(store) == len(samples)
    assert store.sample_lengths().tolist() == LENGTHS
    for got, ref in zip(store.iter_samples(), samples, strict=True):
        for name in ("aux_hidden", "last_hidden", "audio_embeds"):
            assert got[name].dtype == torch.bfloat16
            assert torch.equal(bits(got[name]), bits(getattr(ref, name))), name
        assert torch.equal(got["input_ids"], ref.input_ids)
        assert torch.equal(got["loss_mask"], ref.loss_mask.long())
        assert torch.equal(got["last_hidden_positions"], ref.last_hidden_positions)
        assert (got["id"], got["source_hash"], got["audio_spans"], got["meta"]) == (
            ref.id, ref.source_hash, ref.audio_spans, ref.meta)
        assert got["num_loss_tokens"] == ref.num_loss_tokens
    assert torch.equal(bits(store.by_id("s004")["aux_hidden"]), bits(samples[4].aux_hidden))
    assert torch.equal(bits(store[-1]["aux_hidden"]), bits(samples[-1].aux_hidden))
    # the shard is a plain Zarr v3 group: zarr itself reads the same rows
    group = zarr.open_group(str(tmp_path / SHARDS_DIR / shards[0].name / "arrays"), mode="r")
    first = group["aux_hidden"][: LENGTHS[0]]
    assert np.array_equal(first.reshape(LENGTHS[0], 3, H), samples[0].aux_hidden.view(torch.uint16).numpy())
    assert store.validate(deep=True) == []
    with pytest.raises(KeyError, match="nope"):
        store.by_id("nope")
    # any fsspec filesystem works for reading: here an in-memory one standing in for s3://
    mem = fsspec.filesystem("memory")
    mem.put(str(tmp_path), "/copy", recursive=True)
    remote = open_store("memory://copy")
    assert torch.equal(bits(remote.by_id("s007")["aux_hidden"]), bits(samples[7].aux_hidden))
    assert remote.validate(deep=True) == []


def test_shard_file_set_is_pinned(tmp_path: Path) -> None:
    samples = make_samples()[:3]  # 132 tokens: 5 aux chunks of 32 rows; 43 audio, 66 last rows
    shards = build(tmp_path, samples, num_shards=1)
    shard_dir = tmp_path / SHARDS_DIR / shards[0].name
    files = sorted(str(p.relative_to(shard_dir)) for p in shard_dir.rglob("*") if p.is_file())
    arrays = ["audio_embeds", "aux_hidden", "input_ids", "last_hidden", "last_hidden_positions", "loss_mask"]
    expected = ["arrays/zarr.json", "checksums.json", "index.arrow"]
    expected += [f"arrays/{a}/zarr.json" for a in arrays]
    expected += [f"arrays/aux_hidden/c.{i}.0" for i in range(5)]
    expected += ["arrays/audio_embeds/c.0.0", "arrays/last_hidden/c.0.0", "arrays/input_ids/c.0",
                 "arrays/loss_mask/c.0", "arrays/last_hidden_positions/c.0"]
    assert files == sorted(expected)
    assert sorted(os.listdir(tmp_path)) == [".manifest.json.lock", "manifest.json", "shards"] or \
        sorted(os.listdir(tmp_path)) == ["manifest.json", "shards"]


def test_fp8_round_trip_and_manifest(tmp_path: Path) -> None:
    samples = make_samples()
    build(tmp_path, samples, quantization="fp8")
    header = Manifest(tmp_path).load()
    assert header["quantization"]["mode"] == "fp8"
    assert header["quantization"]["arrays"] == ["aux_hidden", "audio_embeds"]
    codecs = {a["name"]: a for a in header["arrays"]}
    assert codecs["aux_hidden"]["encoding"] == "fp8" and codecs["aux_hidden"]["dtype"] == "uint8"
    assert codecs["last_hidden"]["encoding"] == "bits"
    store = open_store(tmp_path)
    for got, ref in zip(store.iter_samples(), samples, strict=True):
        assert torch.equal(bits(got["last_hidden"]), bits(ref.last_hidden))  # teacher stays exact
        for name in ("aux_hidden", "audio_embeds"):
            a, b = got[name].float(), getattr(ref, name).float()
            assert got[name].dtype == torch.bfloat16 and a.shape == b.shape
            amax = b.abs().amax(-1, keepdim=True)
            # e4m3: <= 2^-4 relative rounding (+ bf16 output rounding), subnormals below amax/448*2^-6
            assert bool(((a - b).abs() <= 0.07 * b.abs() + amax / 448 * 2**-6).all()), name
    assert store.validate(deep=True) == []


def test_readers_see_only_committed_shards(tmp_path: Path) -> None:
    samples = make_samples()
    manifest = create_store(tmp_path, make_header(**HEADER_KW))
    shards = plan_shards(len(samples), 3)
    for shard in shards[:2]:
        with ShardWriter(tmp_path, shard) as w:
            for i in range(shard.start, shard.stop):
                w.write(samples[i])
            entry = w.finish()
        if shard.index == 0:
            commit_shard(manifest, shard, entry)  # shard 1: renamed into place, never committed
    w = ShardWriter(tmp_path, shards[2])
    w.write(samples[shards[2].start])
    w.flush()
    w.close()  # shard 2: a temp dir with one committed sample
    assert (tmp_path / SHARDS_DIR / shards[1].name).is_dir()
    store = open_store(tmp_path)
    assert len(store) == len(shards[0])
    assert [e["name"] for e in store.shards()] == [shards[0].name]
    assert [s["id"] for s in store.iter_samples()] == [s.id for s in samples[: len(shards[0])]]


CHILD = textwrap.dedent("""
    import os, resource, signal, sys, time
    sys.path.insert(0, {test_dir!r})
    from test_store import make_samples
    from pipeline.core.shards import plan_shards
    from storage.writer import ShardWriter, StoreWriteError
    root, mode, background = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    samples = make_samples()
    shard = plan_shards(len(samples), 1)[0]
    if mode == "fsize":
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))
    try:
        with ShardWriter(root, shard, background=background) as w:
            for i, s in enumerate(samples):
                w.write(s)
                if mode == "kill" and i == 6:  # 6 committed + 1 written: the parent kills us now
                    print("unflushed", w.num_written, flush=True)
                    time.sleep(60)
                if i % 2 == 1:
                    w.flush()
                    print("flushed", w.num_committed, flush=True)
    except StoreWriteError as err:
        print("ERROR", err, flush=True)
        sys.exit(3)
""")


def run_child(root: Path, mode: str, background: bool):
    code = CHILD.format(test_dir=str(Path(__file__).parent))
    proc = subprocess.Popen([sys.executable, "-c", code, str(root), mode, "1" if background else "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("unflushed"):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=120)
    return proc.returncode, "".join(lines) + proc.stderr.read()  # type: ignore[union-attr]


def shard_files(root: Path) -> dict[str, bytes]:
    shard_dir = root / SHARDS_DIR / plan_shards(len(LENGTHS), 1)[0].name
    return {str(p.relative_to(shard_dir)): p.read_bytes() for p in sorted(shard_dir.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("background", [False, True])
def test_kill9_resume_is_byte_identical(tmp_path: Path, background: bool) -> None:
    samples = make_samples()
    ref_root = tmp_path / "ref"
    build(ref_root, samples, num_shards=1)
    root = tmp_path / "killed"
    create_store(root, make_header(**HEADER_KW))
    rc, out = run_child(root, "kill", background)
    assert rc == -signal.SIGKILL, out
    # what else a kill can leave: a torn progress line and a zarr temp file mid-rename
    tmp_dir = root / SHARDS_DIR / tmp_dir_name(0)
    with open(tmp_dir / "progress.jsonl", "a") as fh:
        fh.write('{"kind": "sample", "id": "tor')
    (tmp_dir / "arrays/aux_hidden/c.11.0.0123abcd.partial").write_bytes(b"junk")
    shard = plan_shards(len(samples), 1)[0]
    with ShardWriter(root, shard, resume=True, background=background) as w:
        assert w.num_committed == 6  # the unflushed 7th sample is lost, nothing else
        assert w.committed_ids == [s.id for s in samples[: w.num_committed]]
        for s in samples[w.num_committed:]:
            w.write(s)
        entry = w.finish()
    commit_shard(Manifest(root), shard, entry)
    assert shard_files(root) == shard_files(ref_root)  # every array chunk, the index, checksums
    got, ref = open_store(root), open_store(ref_root)
    assert got.shard_readers()[0].table.equals(ref.shard_readers()[0].table)
    assert entry == ref.shards()[0]


def test_crash_before_rename_recovers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = make_samples()
    build(tmp_path / "ref", samples, num_shards=1)
    root = tmp_path / "crash"
    create_store(root, make_header(**HEADER_KW))
    shard = plan_shards(len(samples), 1)[0]

    def boom(*_a: object, **_k: object) -> None:
        raise OSError("simulated crash before rename")

    monkeypatch.setattr("storage.writer.atomic_replace_dir", boom)
    w = ShardWriter(root, shard)
    for s in samples:
        w.write(s)
    with pytest.raises(StoreWriteError, match="simulated crash"):
        w.finish()
    w.close()
    monkeypatch.undo()
    with ShardWriter(root, shard, resume=True) as w2:
        assert w2.num_committed == len(samples)
        assert w2.committed_ids == [s.id for s in samples]
        entry = w2.finish()
    assert shard_files(root) == shard_files(tmp_path / "ref") and entry["num_samples"] == len(samples)


@pytest.mark.parametrize("background", [False, True])
def test_write_error_commits_nothing(tmp_path: Path, background: bool) -> None:
    create_store(tmp_path, make_header(**HEADER_KW))
    rc, out = run_child(tmp_path, "fsize", background)
    assert rc == 3, out
    tmp_dir = tmp_path / SHARDS_DIR / tmp_dir_name(0)
    assert f"ERROR writing shard shard-00000-of-00001 in {tmp_dir} failed" in out
    assert "File too large" in out
    assert Manifest(tmp_path).shards() == {}
    assert not (tmp_path / SHARDS_DIR / "shard-00000-of-00001").exists()
    assert len(open_store(tmp_path)) == 0


def test_validate_finds_corruption(tmp_path: Path) -> None:
    samples = make_samples()
    shards = build(tmp_path, samples)
    shard_dir = tmp_path / SHARDS_DIR / shards[0].name
    chunk = shard_dir / "arrays/aux_hidden/c.1.0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF  # bit rot, same size: only the deep check sees it
    chunk.write_bytes(bytes(data))
    assert open_store(tmp_path).validate() == []
    deep = open_store(tmp_path).validate(deep=True)
    assert any("arrays/aux_hidden/c.1.0 does not match its sha256" in p for p in deep), deep
    # NaN written behind the writer's back is found and attributed to its sample
    group = zarr.open_group(str(shard_dir / "arrays"), mode="r+")
    row = np.asarray(group["aux_hidden"][40])
    row[7] = 0x7FC0  # bf16 NaN
    group["aux_hidden"][40] = row
    deep = open_store(tmp_path).validate(deep=True)
    assert any("sample 1 ('s001'): aux_hidden row 3 holds NaN/Inf" in p for p in deep), deep
    # a manifest checksum that no longer matches
    Manifest(tmp_path).update(lambda m: m["shards"]["00001"].update(checksums_sha256="0" * 64))
    shallow = open_store(tmp_path).validate()
    assert f"{shards[1].name}: checksums.json does not match the checksum in the manifest" in shallow
    # a truncated chunk
    last = shard_dir / "arrays/last_hidden/c.0.0"
    last.write_bytes(last.read_bytes()[:100])
    assert any("arrays/last_hidden/c.0.0 has 100 bytes" in p for p in open_store(tmp_path).validate())


def test_sample_validation_rejects_nan_and_bad_shapes(tmp_path: Path) -> None:
    bad = make_sample(0, 20)
    bad.last_hidden[3, 5] = float("nan")
    with pytest.raises(SampleError, match=r"sample 's000': last_hidden holds 1 NaN/Inf values \(first at \[3, 5\]\)"):
        bad.validate()
    wrong = make_sample(1, 20)
    wrong.audio_spans = [(1, 4)]
    assert any("audio_embeds must be [3" in p for p in wrong.problems())
    create_store(tmp_path, make_header(**HEADER_KW))
    shard = Shard(0, 1, 0, 2)
    with ShardWriter(tmp_path, shard) as w:
        with pytest.raises(SampleError, match="last_hidden"):
            w.write(bad)
        w.write(make_sample(2, 20))  # the writer is still usable
        entry = w.finish()
    commit_shard(Manifest(tmp_path), shard, entry)
    assert [s["id"] for s in open_store(tmp_path).iter_samples()] == ["s002"]


def test_store_header_guard_and_dataloader(tmp_path: Path) -> None:
    samples = make_samples()
    build(tmp_path, samples)
    with pytest.raises(ManifestMismatch, match="hidden_size"):
        create_store(tmp_path, make_header(**{**HEADER_KW, "hidden_size": 128}))
    store = pickle.loads(pickle.dumps(open_store(tmp_path)))
    loader = torch.utils.data.DataLoader(store, batch_size=None, num_workers=2, shuffle=False)
    ids = [s["id"] for s in loader]
    assert ids == [s.id for s in samples]
    assert json.loads((tmp_path / "manifest.json").read_text())["aux_layers"]["by_convention"][
        "decoder_layer"] == [1, 3, 5]


def test_joined_stores_read_as_one(tmp_path: Path) -> None:
    """Two stores of one target read as one: every sample of each, bit for bit, indices running on;
    ids may repeat; a store of another shape is refused, naming the differing header key."""
    samples = make_samples()
    build(tmp_path / "a", samples[:5])
    build(tmp_path / "b", samples[3:], num_shards=3, target_path="elsewhere/tiny-target")  # same identity hash
    a, b = open_store(tmp_path / "a"), open_store(tmp_path / "b")
    joined = pickle.loads(pickle.dumps(join_stores([a, b])))
    assert len(joined) == len(a) + len(b) == 14
    assert joined.sample_lengths().tolist() == LENGTHS[:5] + LENGTHS[3:]
    assert [sid for r in joined.shard_readers() for sid in r.ids()] == [s.id for s in samples[:5] + samples[3:]]
    for index, ref in enumerate(samples[:5] + samples[3:]):
        got = joined[index]
        assert got["id"] == ref.id and got["index"] == index
        assert torch.equal(bits(got["aux_hidden"]), bits(ref.aux_hidden))
        assert torch.equal(bits(got["last_hidden"]), bits(ref.last_hidden))
    assert len(joined.shards()) == 5 and joined.path == f"{a.path},{b.path}"
    assert join_stores([a]) is a
    # the parts are untouched
    assert len(a) == 5 and len(b) == 9
    create_store(tmp_path / "wide", make_header(**{**HEADER_KW, "hidden_size": 2 * H}))
    with pytest.raises(ValueError, match=r"wide cannot be read together with .*differ in hidden_size"):
        join_stores([a, open_store(tmp_path / "wide")])
    build(tmp_path / "other", samples[:2], target_config_hash="beef")
    with pytest.raises(ValueError, match="differ in target"):
        join_stores([a, open_store(tmp_path / "other")])
