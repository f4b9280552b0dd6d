"""A Qwen2-Audio checkpoint's mel framing is read from its own processor: the published hop (160
samples, 25 audio tokens a second) or a coarser one that keeps the encoder's 3000-frame window (the
SmolLM2 target's 480: 8.3 a second), and a window vLLM's input schema cannot take is refused by file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from modeling.targets import UnsupportedTarget, family_of
from modeling.targets.qwen2_audio import Qwen2AudioFamily, framed


def _with_framing(tiny_target: Path, tmp_path: Path, **fields: int) -> Path:
    out = tmp_path / "target"
    out.mkdir()
    for name in ("config.json", "processor_config.json"):
        shutil.copy(tiny_target / name, out / name)
    processor = json.loads((out / "processor_config.json").read_text())
    processor["feature_extractor"] |= fields
    (out / "processor_config.json").write_text(json.dumps(processor))
    return out


def test_published_hop_is_the_plain_family(tiny_target):
    assert family_of(tiny_target) is Qwen2AudioFamily
    assert Qwen2AudioFamily.num_audio_tokens(16_000) == 25


def test_a_coarser_hop_frames_fewer_tokens(tiny_target, tmp_path):
    target = _with_framing(tiny_target, tmp_path, hop_length=480, chunk_length=90, n_fft=960, n_samples=1_440_000,
                           nb_max_frames=3000)
    family = family_of(target)
    assert family is framed(480) and issubclass(family, Qwen2AudioFamily) and family.hop_samples == 480
    # one mel frame per 30 ms: 2 s -> 67 frames -> 34 after the stride-2 conv -> 17 after pooling
    assert family.num_mel_frames(32_000) == 67 and family.num_audio_tokens(32_000) == 17
    assert Qwen2AudioFamily.num_audio_tokens(32_000) == 50  # the plain family is unchanged
    assert family.max_audio_seconds == 30.0  # vLLM sizes an item from at most a 30 s chunk


def test_a_window_other_than_3000_frames_is_refused_by_file(tiny_target, tmp_path):
    target = _with_framing(tiny_target, tmp_path, hop_length=480, n_fft=960)  # 30 s chunk: 1000 frames
    with pytest.raises(UnsupportedTarget, match=r"processor_config.json.*1000 mel frames.*3000"):
        family_of(target)
