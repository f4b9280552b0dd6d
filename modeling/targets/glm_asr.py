"""GLM-ASR (GLM-ASR-Nano-2512) as a target family: chat template, audio token counts, HF model access.

transformers 5.19 and vLLM 0.32 both name the model ``GlmAsrForConditionalGeneration``: a Whisper-style
encoder with rotary attention (conv stride 2, then 4 frames merged into one 4*hidden vector), a
two-layer projector and a Llama decoder. The Hub checkpoint uses Qwen2-Audio's key layout
(transformers maps ``glmasr`` to the ``qwen2_audio`` renames), so ``modeling.targets.qwen2_audio_tiny.hub_key`` holds.

Conversation layout (the Jinja template below, as ``GlmAsrProcessor.apply_chat_template`` renders it)::

    <|system|>\\nBe brief.<|user|>\\n<|begin_of_audio|><|pad|><|end_of_audio|><|user|>\\nTranscribe.
    <|assistant|>\\n[THE ANSWER<|user|>]\\nNext question<|assistant|>\\n[ANSWER<|user|>]   ([...] = loss)

The template writes no token after an answer; the next ``<|user|>`` closes it, and ``<|user|>`` is one
of the model's stop ids, so it is the answer's turn-end token and carries loss. After the last answer
the template renders nothing, while a segment list ends every answer with ``<|user|>``: there the
concatenated segments are the processor's rendering plus ``<|user|>``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modeling.targets.base import TargetFamily
from modeling.targets.vllm_classes import VllmSpec
from pipeline.data.records import Turn
from pipeline.data.template import Segment

SAMPLING_RATE = 16_000
HOP_SAMPLES = 160  # Whisper features: one mel frame per 10 ms
WINDOW_SAMPLES = 30 * SAMPLING_RATE  # the encoder's window; the processor cuts longer clips into windows
MERGE_FACTOR = 4  # encoder frames merged into one audio token (audio intermediate_size = 4 * hidden)
# GlmAsrProcessor(max_audio_len=655) keeps int(655 // 30) windows and silently drops the rest.
MAX_WINDOWS = 655 // 30

SYSTEM, USER, ASSISTANT, OBSERVATION = "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>"
END_OF_TEXT = "<|endoftext|>"
AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS = "<|pad|>", "<|begin_of_audio|>", "<|end_of_audio|>"
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# The chat template transformers' convert_glmasr_weights_to_hf.py gives the processor (the converted
# Hub repo's chat_template.jinja). Note the second <|user|> after each clip and ``| trim`` on contents.
CHAT_TEMPLATE = """{%- macro to_text(content) -%}
{%- if content is string -%}
{{- content -}}
{%- elif content is iterable and content is not mapping -%}
{%- for item in content -%}
{%- if item is mapping and item.type == 'text' and item.text is defined -%}
{{- item.text -}}
{%- elif item is mapping and (item.type == 'audio' or 'audio' in item) -%}
<|begin_of_audio|><|pad|><|end_of_audio|><|user|>
{% elif item is string -%}
{{- item -}}
{%- endif -%}
{%- endfor -%}
{%- else -%}
{{- content -}}
{%- endif -%}
{%- endmacro -%}
{%- for m in messages -%}
{%- if m.role == 'system' -%}
<|system|>
{{ to_text(m.content) | trim }}
{%- elif m.role == 'user' -%}
<|user|>
{{ to_text(m.content) | trim }}
{%- elif m.role == 'assistant' -%}
<|assistant|>
{{ to_text(m.content) | trim }}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|assistant|>
{% endif -%}"""


def _tokens_per_window(frames: int) -> int:
    """Audio tokens for one window of ``frames`` valid mel frames: conv1 (stride 1), conv2 (stride 2),
    then the 4-frame merge, as ``GlmAsrModel.get_audio_features`` counts them."""
    for padding, kernel, stride in ((1, 3, 1), (1, 3, 2)):
        frames = (frames + 2 * padding - (kernel - 1) - 1) // stride + 1
    return max((frames - MERGE_FACTOR) // MERGE_FACTOR + 1, 0)


def _window_count(num_samples: int) -> int:
    """How many 30 s windows ``GlmAsrProcessor._process_audio`` cuts a clip into; raises past its cap,
    where the processor would silently drop the rest of the clip."""
    count = max(1, -(-int(num_samples) // WINDOW_SAMPLES))
    if count > MAX_WINDOWS:
        raise ValueError(f"clip of {num_samples / SAMPLING_RATE:.1f} s exceeds GLM-ASR's {MAX_WINDOWS * 30} s")
    return count


def _trim(segs: list[Segment]) -> list[Segment]:
    """Jinja's ``| trim`` (str.strip) over the concatenation of ``segs``: only text segments can hold
    the whitespace, and an audio segment stops the stripping."""
    for order, strip in ((segs, str.lstrip), (segs[::-1], str.rstrip)):
        for seg in order:
            if seg.kind != "text":
                break
            seg.text = strip(seg.text)
            if seg.text:
                break
    return [s for s in segs if s.kind != "text" or s.text]


class GlmAsrFamily(TargetFamily):
    """Everything the pipeline needs to know about GLM-ASR targets (stateless; use the class or an instance)."""

    name = "glm-asr"
    architectures = ("GlmAsrForConditionalGeneration",)
    special_tokens: dict[str, str] = {
        "audio": AUDIO_TOKEN,
        "audio_start": AUDIO_BOS,
        "audio_end": AUDIO_EOS,
        "turn_end": USER,  # closes an answer: the next turn's role token, one of the stop ids
        "pad": END_OF_TEXT,  # the converted tokenizer sets pad = eos; never the audio token
    }
    # GlmAsrConfig's default text_config eos_token_id [59246, 59253, 59255]: <|endoftext|>, <|user|>,
    # <|observation|> (GLM-4's stop set).
    end_tokens: tuple[str, ...] = (END_OF_TEXT, USER, OBSERVATION)
    # One clip is cut into 30 s windows whose tokens fill one placeholder (processor, HF model and vLLM
    # agree), up to the processor's 21 windows. Splitting a clip instead would put several clips in one
    # prompt, which GlmAsrProcessor refuses, and vLLM with it.
    max_audio_seconds: float = MAX_WINDOWS * 30.0

    config_class = "GlmAsrConfig"  # its defaults: the Nano-2512 text model, top-level tie True, Llama's False
    embedding_weight = "language_model.model.embed_tokens.weight"
    lm_head_weight = "language_model.lm_head.weight"
    # vLLM 0.32's class lacks SupportsEagle3: the plugin adds it and the image_token_index shim
    vllm = VllmSpec("vllm.model_executor.models.glmasr", "GlmAsrForConditionalGeneration", "audio_token_id")

    @staticmethod
    def render_segments(turns: list[Turn], *, until_turn: int | None = None,
                        system_prompt: str | None = None) -> list[Segment]:
        """Segments of :data:`CHAT_TEMPLATE`; ``until_turn`` stops after that turn's role header (the
        generation prompt for that assistant turn). ``system_prompt`` applies only when the first turn
        is not a system turn (the template itself adds none). Answers are stripped like the template's
        ``| trim``; an answer followed by anything but a user turn raises ValueError, since only
        ``<|user|>`` can close it."""
        segs: list[Segment] = []
        if system_prompt is not None and not (turns and turns[0].role == "system"):
            segs.append(Segment("text", f"{SYSTEM}\n{system_prompt.strip()}"))
        for i, turn in enumerate(turns):
            closes_answer = i > 0 and turns[i - 1].role == "assistant"
            if closes_answer and turn.role != "user":
                raise ValueError(f"turn {i} ({turn.role}) follows an answer; GLM-ASR closes answers with {USER}")
            # after an answer, this turn's <|user|> is that answer's turn-end token (see the module doc)
            segs.append(Segment("text", ("" if closes_answer else ROLE_TOKENS[turn.role]) + "\n", i))
            if i == until_turn:
                return segs
            if turn.role == "assistant":
                segs.append(Segment("answer", turn.text.strip(), i))
                continue
            content: list[Segment] = []
            for part in turn.parts:
                if part.kind == "audio":
                    content += [Segment("text", AUDIO_BOS, i), Segment("audio", AUDIO_TOKEN, i),
                                Segment("text", f"{AUDIO_EOS}{USER}\n", i)]
                else:
                    content.append(Segment("text", part.text or "", i))
            segs += _trim(content)
        if until_turn is not None and until_turn >= len(turns):
            if turns and turns[-1].role == "assistant":
                raise ValueError(f"a generation prompt after an answer has no {USER} to close it")
            segs.append(Segment("text", f"{ASSISTANT}\n", len(turns)))
        return segs

    @staticmethod
    def num_audio_tokens(num_samples: int) -> int:
        """``<|pad|>`` tokens for a clip of ``num_samples`` at 16 kHz (12.5 per second, 375 per window)."""
        n = int(num_samples)
        pieces = [min(n - i * WINDOW_SAMPLES, WINDOW_SAMPLES) for i in range(_window_count(n))]
        # frames the feature extractor's mask marks valid in each window, then the encoder's arithmetic
        total = sum(_tokens_per_window(-(-p // HOP_SAMPLES)) for p in pieces)
        return total

    @staticmethod
    def audio_inputs(feature_extractor: Any, waveforms: list[np.ndarray]) -> dict[str, np.ndarray]:
        """``input_features`` [W, 128, 3000] float32 and ``input_features_mask`` [W, 3000] int64, one row
        per 30 s window of each clip in order (W = number of clips when none is over 30 s), as the
        processor makes them and as ``GlmAsrForConditionalGeneration.forward`` takes them. No clips, no
        kwargs: the model must not run its audio tower on nothing."""
        if not waveforms:
            return {}
        chunks = [wave[i * WINDOW_SAMPLES : (i + 1) * WINDOW_SAMPLES]
                  for wave in waveforms for i in range(_window_count(wave.shape[0]))]
        out = feature_extractor(chunks, sampling_rate=SAMPLING_RATE, return_attention_mask=True,
                                padding="max_length", return_tensors="np")
        return {"input_features": out["input_features"].astype(np.float32),
                "input_features_mask": out["attention_mask"].astype(np.int64)}
