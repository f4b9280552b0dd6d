"""The input reader on real files of every format (tests/source_datasets.py builds them with
``datasets``, ``webdataset`` and soundfile): records, audio, references, subsets, splits, shard
ranges, duplicate ids, damaged files, and the benchmark's prompts from each format."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.config import ConfigError
from pipeline.data.audio import AudioError, AudioLimits, load_audio, load_pieces
from pipeline.data.records import Record, Rejection
from pipeline.data.sources import ColumnMapping, InputSource, SourceError, Subset
from pipeline.data.vad import pause_cuts

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from source_datasets import CLIPS, GAP_S, TEXTS  # noqa: E402


def records(items):
    return [i for i in items if isinstance(i, Record)]


def rejections(items):
    return [i for i in items if isinstance(i, Rejection)]


def test_every_format_reads_records_with_decodable_audio_and_references(source_datasets):
    expect = {  # input -> ids in order (hub without --split: every file in path order, test-* first)
        "hub": [f"clip-{i:02d}" for i in (9, 10, 11, *range(9))],
        "saved": [f"clip-{i:02d}" for i in (12, 13, 14, 15)],  # a DatasetDict: train by default
        "wds": [f"clip-{i:02d}" for i in range(18, 24)],
        "arrays.parquet": ["array-0", "array-1"],
    }
    for name, ids in expect.items():
        items = list(InputSource(source_datasets / name).read())
        recs = records(items)
        assert [r.id for r in recs] == ids and not rejections(items), name
        assert [r.index for r in recs] == list(range(len(ids)))
        for rec in recs:
            clip = int(rec.id.split("-")[1])
            assert rec.raw["reference"] == TEXTS[clip], (name, rec.id)
            assert [t.role for t in rec.turns] == ["user"] and rec.turns[0].text  # audio + an instruction
            [wave] = load_audio(rec.audio_paths[0])
            ref = load_audio(CLIPS[clip])[0]
            if name == "arrays.parquet" and clip == 1:  # stored at 8 kHz: same length after resampling
                assert abs(wave.size - ref.size) <= 2
            else:  # flac bytes, or a float array at 16 kHz: exactly the clip
                np.testing.assert_array_equal(wave, ref)
    # conversations in a messages column: audio items without a path take the audio column's clips
    recs = records(InputSource(source_datasets / "messages.parquet").read())
    assert [t.role for t in recs[2].turns] == ["user", "assistant"] and recs[2].turns[1].text == TEXTS[2]
    np.testing.assert_array_equal(load_audio(recs[2].audio_paths[0])[0], load_audio(CLIPS[2])[0])
    # a glob over jsonl files in subfolders, in path order
    recs = records(InputSource(f"{source_datasets}/jsonl/**/*.jsonl").read())
    assert [r.id for r in recs] == [f"clip-{i:02d}" for i in range(6)]


def test_codecs_damaged_files_and_members_cost_only_their_records(source_datasets):
    items = list(InputSource(source_datasets / "damaged_parquet").read())
    assert len(items) == 6  # 5 rows of codecs.parquet + the truncated file as one record
    good = records(items)
    for rec, fmt in zip(good[:4], ("flac", "wav", "ogg", "mp3"), strict=True):
        wave = load_audio(rec.audio_paths[0])[0]
        assert abs(wave.size - load_audio(CLIPS[good.index(rec)])[0].size) < 0.05 * 16_000, fmt
    with pytest.raises(AudioError, match=r"codecs.parquet row 4 column audio: unreadable audio \(Error opening the bytes"):
        load_audio(good[4].audio_paths[0])
    [cut] = rejections(items)
    assert cut.source.endswith("truncated.parquet") and cut.field == "file"
    assert "not a readable Parquet file" in cut.message() and "(whole file)" in cut.message()

    items = list(InputSource(source_datasets / "wds_bad").read())
    assert len(items) == 7 and [i.index for i in items] == list(range(7))
    msgs = [i.message() for i in rejections(items)]
    assert "shard-000000.tar key clip-02 (id clip-02): json: member clip-02.json: malformed JSON" in msgs[0]
    assert "shard-000001.tar key clip-05 (id clip-05): clip-05.flac: member clip-05.flac unreadable" in msgs[1]
    assert "sample 2 on: file: tar unreadable" in msgs[2]
    recs = records(items)
    assert [r.id for r in recs] == ["clip-00", "clip-01", "clip-03", "clip-04"]
    with pytest.raises(AudioError, match="key clip-01 column audio: unreadable audio"):
        load_audio(recs[1].audio_paths[0])


def test_a_broken_row_group_or_arrow_file_costs_only_its_rows(source_datasets):
    items = list(InputSource(source_datasets / "rowgroups.parquet").read())
    assert [i.id for i in records(items)] == ["clip-00", "clip-01", "clip-04", "clip-05"]
    assert [(r.index, r.where, r.field) for r in rejections(items)] == [(2, "row 2", "row"), (3, "row 3", "row")]
    assert all("row group 1 unreadable (OSError: Couldn't deserialize thrift" in r.reason for r in rejections(items))
    items = list(InputSource(source_datasets / "saved_cut").read())
    assert [i.id for i in records(items)] == ["clip-13", "clip-14", "clip-15"]
    [cut] = rejections(items)
    assert cut.source.endswith("data-00000-of-00004.arrow") and "Arrow stream unreadable from row 0 on" in cut.reason


def test_subsets_splits_and_shard_ranges_are_stable(source_datasets):
    hub = source_datasets / "hub"
    whole = [r.id for r in records(InputSource(hub, split="train").read())]
    assert whole == [f"clip-{i:02d}" for i in range(9)]
    src = InputSource(hub, split="train", subset=Subset(skip=2, take=5))
    assert src.total == 5 and [r.id for r in src.read()] == whole[2:7]
    assert [r.index for r in src.read()] == list(range(5))
    # any partition of the index range reads the same records (what sharding relies on)
    parts = [x.id for a, b in ((0, 2), (2, 3), (3, 5)) for x in src.read(a, b)]
    assert parts == whole[2:7]
    assert src.describe()["subset"] == {"skip": 2, "take": 5, "take_fraction": None, "first": 2, "stop": 7}
    assert [f["records"] for f in src.describe()["files"]] == [5, 4]
    assert InputSource(hub, split="train", subset=Subset(skip=1, take_fraction=0.5)).total == 4
    assert [r.id for r in InputSource(source_datasets / "saved", split="test").read()] == ["clip-16", "clip-17"]
    with pytest.raises(SourceError, match=r"splits \['train', 'test'\]"):
        InputSource(source_datasets / "saved", split="validation")
    with pytest.raises(SourceError, match="no file"):
        InputSource(f"{hub}/**/*.parquet", split="validation")
    with pytest.raises(ConfigError, match="not both"):
        Subset(take=1, take_fraction=0.5)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        InputSource(f"{source_datasets}/nothing/*.tar")


def test_duplicate_ids_across_files_and_column_mapping(source_datasets, tmp_path):
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text((source_datasets / "jsonl" / "a" / "part.jsonl").read_text())
    items = list(InputSource(f"{tmp_path}/*.jsonl").read(3, 6))  # the second file: all three are duplicates
    assert [i.reason for i in items] == [f"duplicate id 'clip-{i:02d}' (first seen at record {i} of the input)"
                                         for i in range(3)]
    mapping = ColumnMapping(text_column="text", instructions=("Write it down.",), id_column="nope")
    recs = records(InputSource(source_datasets / "hub", split="test", mapping=mapping).read())
    assert [r.id for r in recs] == ["test-00000-of-00001-0", "test-00000-of-00001-1", "test-00000-of-00001-2"]
    assert {r.turns[0].text for r in recs} == {"Write it down."}
    bad = list(InputSource(source_datasets / "hub", split="test", mapping=ColumnMapping(audio_column="wav")).read())
    assert all(isinstance(i, Rejection) and i.field == "conversations" and "no audio column 'wav'" in i.reason
               and "['audio', 'id', 'text']" in i.reason for i in bad)


def test_vad_cuts_a_long_recording_at_its_pauses(source_datasets):
    long = source_datasets / "long" / "long.flac"
    pieces = load_pieces(long, AudioLimits(max_seconds=30.0, split_long=True, vad=True))
    ends = np.cumsum([load_audio(c)[0].size / 16_000 + GAP_S for c in CLIPS])
    assert len(pieces) == 3 and all(p.end_s - p.start_s <= 30.0 for p in pieces)
    assert pieces[0].start_s == 0 and pieces[-1].end_s == pytest.approx(ends[-1])
    assert all(a.end_s == b.start_s for a, b in zip(pieces[:-1], pieces[1:], strict=True))  # contiguous
    for piece in pieces[:-1]:  # every cut lies in one of the 0.5 s gaps
        assert any(e - GAP_S <= piece.end_s <= e for e in ends), piece.end_s
    # all three detectors cut in the gaps of clean speech (benchmarks/bench_vad.py adds noise)
    samples = load_audio(long, AudioLimits(max_seconds=1e4))[0]
    for detector in ("silero", "webrtc", "energy"):
        cuts = pause_cuts(samples, 16_000, 30.0, detector)
        if detector == "silero":  # the default: what load_pieces used
            assert [b for _, b in cuts[:-1]] == [round(p.end_s * 16_000) for p in pieces[:-1]]
        assert all(any(e - GAP_S <= b / 16_000 <= e for e in ends) for _, b in cuts[:-1]), detector


def test_benchmark_prompts_from_a_pair_dataset_use_its_text_as_reference(source_datasets, tiny_target, tmp_path):
    from pipeline.core.config import parse_config
    from stages.benchmark import BenchmarkConfig, build_prompts

    argv = ["--target", str(tiny_target), "--input", str(source_datasets / "wds_bad"), "--output",
            str(tmp_path / "r.json"), "--num-prompts", "3"]
    prompts, rejected = build_prompts(parse_config(BenchmarkConfig, argv, prog="b", description=""))
    assert [p.id for p in prompts] == ["clip-00", "clip-03", "clip-04"]
    assert [p.reference for p in prompts] == [TEXTS[0], TEXTS[3], TEXTS[4]]
    assert [(r.record_id, r.field.split(".")[-1]) for r in rejected] == [("clip-01", "audio"), ("clip-02", "json")]
    assert json.dumps([r.to_dict() for r in rejected])  # reasons are plain JSON
