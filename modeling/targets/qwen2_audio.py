"""The Qwen2-Audio target family (Qwen/Qwen2-Audio-7B-Instruct): one adapter for the whole pipeline.

transformers 5.19 and vLLM 0.32 ``Qwen2AudioForConditionalGeneration``: a Whisper encoder over a
fixed 30 s window (3000 mel frames, padding masked), average-pooled to 25 audio tokens a second
(a checkpoint whose feature extractor hops further gets fewer: :func:`Qwen2AudioFamily.for_target`),
a linear projector and a Qwen2 decoder with an untied lm_head. Its chat template, segment by
segment (``[...]`` = loss mask 1)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n        (default system turn)
    <|im_start|>user\\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\nTranscribe.<|im_end|>\\n
    <|im_start|>assistant\\n[THE ANSWER<|im_end|>]\\n

vLLM lacks EAGLE-3 for it: :mod:`modeling.targets.vllm_classes` adds the interface and the
``image_token_index`` shim.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from modeling.targets.base import TargetFamily
from modeling.targets.vllm_classes import VllmSpec
from pipeline.data.records import Turn
from pipeline.data.template import Segment

ARCHITECTURE = "Qwen2AudioForConditionalGeneration"
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
SAMPLING_RATE = 16_000
HOP_SAMPLES = 160  # Whisper feature extractor: one mel frame per 10 ms at 16 kHz (Qwen2-Audio-7B's)
# the encoder's window in mel frames: 30 s at the published hop. vLLM 0.32's input schema fixes it
# (TensorShape(..., 3000)), so a checkpoint with a longer hop must lengthen its chunk to match
MAX_MEL_FRAMES = 3000
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def num_mel_frames(num_samples: int, hop_samples: int = HOP_SAMPLES) -> int:
    """Mel frames the feature extractor marks valid for a clip of ``num_samples`` at 16 kHz."""
    return min(-(-num_samples // hop_samples), MAX_MEL_FRAMES)


def mel_hop_samples(target_dir: str | Path) -> int:
    """The hop of the checkpoint's Whisper feature extractor (``preprocessor_config.json`` or, as
    transformers 5 writes it, ``processor_config.json``, read by transformers' class; 160 without
    either); a window other than 3000 frames is refused by name."""
    files = [Path(target_dir) / name for name in PROCESSOR_FILES if (Path(target_dir) / name).is_file()]
    if not files:
        return HOP_SAMPLES
    path = files[0]
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor.from_pretrained(str(target_dir))
    if extractor.sampling_rate != SAMPLING_RATE or extractor.nb_max_frames != MAX_MEL_FRAMES:
        raise ValueError(f"{path}: sampling_rate {extractor.sampling_rate}, chunk_length {extractor.chunk_length} s "
                         f"and hop_length {extractor.hop_length} give {extractor.nb_max_frames} mel frames; "
                         f"Qwen2-Audio (and vLLM's input schema) needs {SAMPLING_RATE} Hz and {MAX_MEL_FRAMES}")
    return int(extractor.hop_length)


class Qwen2AudioFamily(TargetFamily):
    """Everything the pipeline needs to know about Qwen2-Audio targets."""

    name: ClassVar[str] = "qwen2-audio"
    architectures: ClassVar[tuple[str, ...]] = (ARCHITECTURE,)
    special_tokens: ClassVar[dict[str, str]] = {"audio": AUDIO_TOKEN, "audio_start": AUDIO_BOS,
                                                "audio_end": AUDIO_EOS, "turn_end": IM_END}
    end_tokens: ClassVar[tuple[str, ...]] = (IM_END, END_OF_TEXT)
    max_audio_seconds: ClassVar[float] = 30.0
    # transformers treats a batch with no two adjacent audio tokens as unexpanded ("legacy") input and
    # re-expands every placeholder, which would silently shift all positions
    min_audio_tokens: ClassVar[int] = 2
    default_system_prompt: ClassVar[str | None] = DEFAULT_SYSTEM_PROMPT
    inline_audio_placeholders: ClassVar[bool] = True
    # one mel frame per hop_samples; the published checkpoints' 160 (25 audio tokens a second). A
    # checkpoint may frame coarser (the project's SmolLM2 target: 480, 8.3 tokens a second)
    hop_samples: ClassVar[int] = HOP_SAMPLES

    config_class: ClassVar[str] = "Qwen2AudioConfig"
    embedding_weight: ClassVar[str] = "language_model.model.embed_tokens.weight"
    lm_head_weight: ClassVar[str] = "language_model.lm_head.weight"
    # vLLM lacks EAGLE-3 for it: the plugin adds the interface and the image_token_index shim
    vllm: ClassVar[VllmSpec] = VllmSpec("vllm.model_executor.models.qwen2_audio", ARCHITECTURE, "audio_token_index")

    @staticmethod
    def render_segments(turns: list[Turn], *, until_turn: int | None = None,
                        system_prompt: str | None = None) -> list[Segment]:
        """Segments of the chat template. ``until_turn``: stop at that assistant turn's content,
        i.e. the generation prompt for regenerating it."""
        segs: list[Segment] = []
        if turns and turns[0].role != "system":
            segs.append(Segment("text", f"{IM_START}system\n{system_prompt or DEFAULT_SYSTEM_PROMPT}{IM_END}\n"))
        audio_count = 0
        for i, turn in enumerate(turns):
            segs.append(Segment("text", f"{IM_START}{turn.role}\n", i))
            if i == until_turn:
                return segs
            if turn.role == "assistant":
                segs.append(Segment("answer", turn.text, i))
                segs.append(Segment("text", "\n", i))
                continue
            for part in turn.parts:
                if part.kind == "audio":
                    audio_count += 1
                    segs.append(Segment("text", f"Audio {audio_count}: {AUDIO_BOS}", i))
                    segs.append(Segment("audio", AUDIO_TOKEN, i))
                    segs.append(Segment("text", f"{AUDIO_EOS}\n", i))
                else:
                    segs.append(Segment("text", part.text or "", i))
            segs.append(Segment("text", f"{IM_END}\n", i))
        if until_turn is not None and until_turn >= len(turns):
            segs.append(Segment("text", f"{IM_START}assistant\n", len(turns)))
        return segs

    @classmethod
    def for_target(cls, target_dir: str | Path) -> type[Qwen2AudioFamily]:
        hop = mel_hop_samples(target_dir)
        return cls if hop == cls.hop_samples else framed(hop)

    @classmethod
    def num_mel_frames(cls, num_samples: int) -> int:
        return num_mel_frames(num_samples, cls.hop_samples)

    @classmethod
    def num_audio_tokens(cls, num_samples: int) -> int:
        """Tokens the encoder emits for a clip: conv stride 2, then avg-pool stride 2."""
        frames = cls.num_mel_frames(num_samples)
        return (((frames - 1) // 2 + 1) - 2) // 2 + 1

    @staticmethod
    def audio_inputs(feature_extractor: Any, waveforms: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Whisper log-mel features padded to the 30 s window, as the processor makes them:
        ``input_features`` [N, 128, 3000] float32 and ``feature_attention_mask`` [N, 3000]."""
        if not waveforms:  # a text-only batch passes no features, or the audio tower runs on nothing
            return {}
        out = feature_extractor(waveforms, sampling_rate=SAMPLING_RATE, return_attention_mask=True,
                                padding="max_length", return_tensors="np")
        return {"input_features": out["input_features"].astype(np.float32),
                "feature_attention_mask": out["attention_mask"].astype(np.int64)}


@functools.cache
def framed(hop_samples: int) -> type[Qwen2AudioFamily]:
    """The family for checkpoints whose feature extractor hops ``hop_samples`` (one class per hop). Clips
    stay within 30 s: vLLM 0.32 sizes an audio item's placeholders from at most a 30 s chunk."""
    return type(f"Qwen2AudioFamilyHop{hop_samples}", (Qwen2AudioFamily,),
                {"hop_samples": hop_samples, "__module__": __name__})
