"""Shared by the GLM-ASR tests (and the vLLM engine script): fixture audio, segment encoding, HF greedy,
and the GLM-ASR pytest fixtures (one tiny checkpoint and what is read from it). The fixtures live here,
not in tests/targets/conftest.py, so only the modules that import them see them: a test of another
family in this folder that names ``target`` or ``processor`` without defining it fails instead of
silently getting GLM-ASR's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf

from modeling.targets.glm_asr import AUDIO_TOKEN, GlmAsrFamily
from modeling.targets.glm_asr_tiny import build_tiny
from pipeline.data.records import Turn, read_conversations
from pipeline.data.template import Segment

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "tests" / "data"
FAMILY = GlmAsrFamily()
CLIPS = ("clip-00", "clip-05", "clip-10")
PROMPT = [{"role": "user", "content": [{"type": "audio", "audio": "clip"},
                                       {"type": "text", "text": "Transcribe the speech."}]}]


def load_clip(name: str) -> np.ndarray:
    audio, rate = sf.read(DATA / "audio" / f"{name}.flac", dtype="float32")
    assert rate == 16_000
    return audio


def encode(tokenizer: Any, turns: list[Turn], waves: list[np.ndarray], **kw: Any) -> tuple[list[int], list[int]]:
    """Ids and loss mask from the segments, as a generic ChatTokenizer would build them: consecutive
    text in one piece, each audio expanded to ``num_audio_tokens``, answers + turn-end with loss."""
    ids: list[int] = []
    mask: list[int] = []
    pending = ""
    audio_id, end_id = tokenizer.convert_tokens_to_ids([AUDIO_TOKEN, FAMILY.special_tokens["turn_end"]])
    waves = list(waves)
    for seg in [*FAMILY.render_segments(turns, **kw), Segment("audio", "")]:  # sentinel flushes the text
        if seg.kind == "text":
            pending += seg.text
            continue
        piece = tokenizer.encode(pending, add_special_tokens=False) if pending else []
        ids += piece
        mask += [0] * len(piece)
        pending = ""
        if seg.kind == "answer":
            answer = [*tokenizer.encode(seg.text, add_special_tokens=False), end_id]
            ids += answer
            mask += [1] * len(answer)
        elif seg.text:
            n = FAMILY.num_audio_tokens(waves.pop(0).shape[0])
            ids += [audio_id] * n
            mask += [0] * n
    assert not waves
    return ids, mask


def render(turns: list[Turn], **kw: Any) -> str:
    """Segments joined as a generic render_text does: every answer followed by the turn-end token."""
    end = FAMILY.special_tokens["turn_end"]
    return "".join(s.text + (end if s.kind == "answer" else "") for s in FAMILY.render_segments(turns, **kw))


def loss_runs(ids: list[int], mask: list[int]) -> list[list[int]]:
    """The maximal runs of ids whose mask is 1, in order."""
    runs: list[list[int]] = [[]]
    for i, m in zip(ids, mask, strict=True):
        if m:
            runs[-1].append(i)
        elif runs[-1]:
            runs.append([])
    return [r for r in runs if r]


def record_waves(record: Any) -> list[np.ndarray]:
    from pipeline.data.audio import load_audio

    return [w for p in record.audio_paths for w in load_audio(p)]


def hf_inputs(processor: Any, audio: np.ndarray) -> Any:
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return processor(text=text, audio=[audio], return_tensors="pt")


def hf_greedy(model: Any, inputs: Any, n: int) -> list[int]:
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


def long_clip(seconds: float) -> np.ndarray:
    """Fixture speech concatenated (and cut) to ``seconds``: a clip over the 30 s window."""
    speech = np.concatenate([load_clip(f"clip-{i:02d}") for i in range(24)])
    return np.ascontiguousarray(speech[: int(seconds * 16_000)])


def two_clip_turns() -> list[Turn]:
    """One user turn with two clips (placeholder order and spans matter) and its answer."""
    from pipeline.data.records import parse_record

    two = [{"role": "user", "content": [{"type": "audio", "audio": "audio/clip-03.flac"},
                                        {"type": "text", "text": "and"},
                                        {"type": "audio", "audio": "audio/clip-04.flac"}]},
           {"role": "assistant", "content": "She sells sea shells. A cup of warm tea."}]
    return parse_record({"conversations": two}, base=DATA, require_assistant=True)[1]


# ------------------------------------------------------------------------------------------------
# fixtures: a module that imports ``glm_target`` (and the others it needs) gets the fixture ``target``;
# the names differ so that the test parameters do not shadow the imports


@pytest.fixture(scope="session", name="target")
def glm_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny GLM-ASR checkpoint. A fixed folder: each importing module gets its own instance of
    this fixture, and ``build_tiny`` returns a finished build as it is, so it is built once."""
    root = tmp_path_factory.getbasetemp() / "glm-asr"
    root.mkdir(exist_ok=True)
    return build_tiny(root / "tiny")


@pytest.fixture(scope="session", name="processor")
def glm_processor(target: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(target))


@pytest.fixture(scope="session", name="records")
def glm_records() -> list[Any]:
    result = read_conversations(DATA / "speech.jsonl")
    assert not result.rejected
    return result.records


@pytest.fixture(scope="session", name="hf_fp32")
def glm_hf_fp32(target: Path) -> Any:
    return FAMILY.load_model(target, "fp32")
