"""The Qwen2-Audio target family (Qwen/Qwen2-Audio-7B-Instruct): one adapter for the whole pipeline.

transformers 5.19 and vLLM 0.32 ``Qwen2AudioForConditionalGeneration``: a Whisper encoder over a
fixed 30 s window (3000 mel frames, padding masked), average-pooled to 25 audio tokens a second,
a linear projector and a Qwen2 decoder with an untied lm_head. Its chat template, segment by
segment (``[...]`` = loss mask 1)::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n        (default system turn)
    <|im_start|>user\\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\nTranscribe.<|im_end|>\\n
    <|im_start|>assistant\\n[THE ANSWER<|im_end|>]\\n

vLLM lacks EAGLE-3 for it: :mod:`modeling.targets.vllm_classes` adds the interface and the
``image_token_index`` shim.
"""

from __future__ import annotations

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
HOP_SAMPLES = 160  # Whisper feature extractor: one mel frame per 10 ms at 16 kHz
MAX_MEL_FRAMES = 3000  # the encoder's 30 s window


def num_mel_frames(num_samples: int) -> int:
    """Mel frames the feature extractor marks valid for a clip of ``num_samples`` at 16 kHz."""
    return min(-(-num_samples // HOP_SAMPLES), MAX_MEL_FRAMES)


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

    @staticmethod
    def num_audio_tokens(num_samples: int) -> int:
        """Tokens the encoder emits for a clip: conv stride 2, then avg-pool stride 2."""
        frames = num_mel_frames(num_samples)
        return (((frames - 1) // 2 + 1) - 2) // 2 + 1

    @staticmethod
    def audio_inputs(feature_extractor: Any, waveforms: list[np.ndarray]) -> dict[str, np.ndarray]:
        """Whisper log-mel features padded to the 30 s window, as the processor makes them:
        ``input_features`` [N, 128, 3000] float32 and ``feature_attention_mask`` [N, 3000]."""
        if not waveforms:  # a text-only batch passes no features, or the audio tower runs on nothing
            return {}
        out = feature_extractor(waveforms, sampling_rate=16_000, return_attention_mask=True,
                                padding="max_length", return_tensors="np")
        return {"input_features": out["input_features"].astype(np.float32),
                "feature_attention_mask": out["attention_mask"].astype(np.int64)}
