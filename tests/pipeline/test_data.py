"""The conversation reader: every bad record rejected with its precise reason, good ones intact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pipeline.data.audio import SAMPLE_RATE, AudioError, AudioLimits, load_audio
from pipeline.data.records import read_conversations

DATA = Path(__file__).resolve().parents[1] / "data"


def test_bad_records_each_rejected_with_reason():
    result = read_conversations(DATA / "bad_records.jsonl")
    expect = json.loads((DATA / "bad_records.expect.json").read_text())
    assert result.total == len(expect)
    assert len(result.records) + len(result.rejected) == result.total
    rejected = {r.index: r for r in result.rejected}
    good = {r.index: r for r in result.records}
    for index, exp in enumerate(expect):
        if exp is None or exp.get("after_reading"):  # well-formed: a later stage rejects it
            assert index in good, f"line {index + 1} should be accepted, got {rejected.get(index)}"
            continue
        assert index in rejected, f"line {index + 1} should be rejected ({exp})"
        rej = rejected[index]
        assert rej.field == exp["field"], rej.message()
        assert exp["reason"] in rej.reason, rej.message()
        assert rej.line == index + 1 and rej.source.endswith("bad_records.jsonl")
        assert f"bad_records.jsonl:{index + 1}" in rej.message()


def test_good_records_intact():
    result = read_conversations(DATA / "bad_records.jsonl")
    ids = [r.id for r in result.records]
    assert ids == ["good-1", "good-2", "over-long"]
    first = result.records[0]
    assert first.audio_paths == [(DATA / "audio" / "clip-00.flac").resolve()]
    assert first.turns[1].text == "the quick brown fox"
    assert result.records[1].turns[0].content_is_string


def test_fixture_speech_set_is_clean():
    result = read_conversations(DATA / "speech.jsonl")
    assert result.rejected == []
    assert sum(bool(r.audio_paths) for r in result.records) >= 20


@pytest.mark.parametrize("rate,channels,subtype,ext", [
    (22050, 1, "PCM_16", "wav"), (44100, 2, "PCM_24", "flac"), (8000, 1, "FLOAT", "wav"), (48000, 2, "VORBIS", "ogg"),
])
def test_any_format_rate_channels_to_16k_mono(tmp_path, rate, channels, subtype, ext):
    seconds = 1.5
    t = np.arange(int(rate * seconds)) / rate
    tone = (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    data = np.stack([tone] * channels, axis=1)
    path = tmp_path / f"x.{ext}"
    sf.write(path, data, rate, subtype=subtype)
    (audio,) = load_audio(path)
    assert audio.dtype == np.float32 and audio.ndim == 1
    assert abs(audio.shape[0] - seconds * SAMPLE_RATE) <= 2
    assert 0.2 < float(np.abs(audio).max()) < 0.4


def test_long_audio_split_only_when_asked(tmp_path):
    path = tmp_path / "long.flac"
    sf.write(path, (0.1 * np.random.default_rng(0).standard_normal(16000 * 65)).astype(np.float32), 16000)
    with pytest.raises(AudioError, match="longer than the encoder's 30 s window"):
        load_audio(path)
    pieces = load_audio(path, AudioLimits(split_long=True))
    assert [p.shape[0] for p in pieces] == [480000, 480000, 80000]


def test_hours_of_audio_refused_from_the_header_without_decoding(monkeypatch):
    import pipeline.data.audio

    huge = DATA / "bad" / "huge.flac"  # 20 minutes at 8 kHz (a constant level: 30 KB)

    def no_decode(path):
        raise AssertionError(f"{path} was decoded")

    monkeypatch.setattr(pipeline.data.audio, "_decode", no_decode)
    with pytest.raises(AudioError, match=r"audio is 1200\.0 s, longer than the encoder's 30 s window"):
        load_audio(huge)
    with pytest.raises(AudioError, match=r"1200\.0 s, longer than the 600 s that --split-long-audio splits"):
        load_audio(huge, AudioLimits(split_long=True))
    # near the limit the decoded length decides (a header can be off by a resampling rounding)
    with pytest.raises(AssertionError, match="was decoded"):
        load_audio(DATA / "bad" / "too-long.flac")
