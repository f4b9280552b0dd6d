"""The Qwen2-Audio chat template as token segments, with the loss mask and audio expansion.

The rendering mirrors the model's Jinja chat template exactly (a test compares the two), but
works segment by segment so that (a) assistant spans are known without guessing from text,
(b) stage 1's generated token ids go in as generated (re-tokenizing decoded text can give other
ids), and (c) each ``<|AUDIO|>`` becomes exactly as many tokens as the audio encoder outputs.

Layout of one conversation::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n        (default system turn)
    <|im_start|>user\\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\\nTranscribe.<|im_end|>\\n
    <|im_start|>assistant\\n[THE ANSWER<|im_end|>]\\n                    ([...] = loss_mask 1)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data import Turn

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


def num_audio_tokens(num_samples: int) -> int:
    """Tokens the Qwen2-Audio encoder emits for a clip: conv stride 2, then avg-pool stride 2."""
    frames = num_mel_frames(num_samples)
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1


@dataclass
class Segment:
    kind: str  # "text": template/prompt text, "audio": one <|AUDIO|>, "answer": assistant content
    text: str = ""
    turn: int = -1  # index of the turn this segment belongs to


@dataclass
class Encoded:
    input_ids: np.ndarray  # int64 [S]
    loss_mask: np.ndarray  # uint8 [S]
    audio_spans: list[tuple[int, int]]  # [start, end) of each audio's tokens, in order
    answer_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (turn, start, end)


def render_segments(turns: list[Turn], *, until_turn: int | None = None,
                    system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> list[Segment]:
    """Segments of the chat template. ``until_turn``: stop at that assistant turn's content,
    i.e. the generation prompt for regenerating it."""
    segs: list[Segment] = []
    if turns and turns[0].role != "system":
        segs.append(Segment("text", f"{IM_START}system\n{system_prompt}{IM_END}\n"))
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


def render_text(turns: list[Turn], *, add_generation_prompt: bool = False) -> str:
    """The exact string the Jinja chat template renders (answers end with <|im_end|>)."""
    out = []
    for seg in render_segments(turns, until_turn=len(turns) if add_generation_prompt else None):
        out.append(seg.text + (IM_END if seg.kind == "answer" else ""))
    return "".join(out)


class ChatTokenizer:
    """Turns conversations into ids with a loss mask, using the target's tokenizer."""

    def __init__(self, tokenizer: Any, system_prompt: str = DEFAULT_SYSTEM_PROMPT):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (AUDIO_TOKEN, IM_END, END_OF_TEXT, IM_START)}
        missing = [t for t, i in ids.items() if i is None or i == tokenizer.unk_token_id]
        if missing:
            raise ValueError(f"tokenizer lacks the Qwen2-Audio special tokens {missing}")
        self.audio_token_id = ids[AUDIO_TOKEN]
        self.im_end_id = ids[IM_END]
        self.end_ids = {ids[IM_END], ids[END_OF_TEXT]}

    def _text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def encode(self, turns: list[Turn], *, audio_token_counts: list[int] | None = None,
               until_turn: int | None = None, use_generated_ids: bool = True) -> Encoded:
        """Token ids, loss mask and spans.

        ``audio_token_counts``: expand the i-th ``<|AUDIO|>`` to that many tokens (training);
        None keeps one placeholder per clip (a prompt for vLLM, which expands it itself).
        Assistant turns carrying stage 1's ``token_ids`` use them verbatim.
        """
        segs = render_segments(turns, until_turn=until_turn, system_prompt=self.system_prompt)
        ids: list[int] = []
        mask: list[int] = []
        audio_spans: list[tuple[int, int]] = []
        answer_spans: list[tuple[int, int, int]] = []
        pending = ""  # consecutive template text is tokenized in one piece, as a full render would

        def flush_text() -> None:
            nonlocal pending
            piece = self._text_ids(pending)
            ids.extend(piece)
            mask.extend([0] * len(piece))
            pending = ""

        for seg in segs:
            if seg.kind == "text":
                pending += seg.text
                continue
            flush_text()
            start = len(ids)
            if seg.kind == "audio":
                n = 1 if audio_token_counts is None else audio_token_counts[len(audio_spans)]
                ids.extend([self.audio_token_id] * n)
                mask.extend([0] * n)
                audio_spans.append((start, start + n))
            else:
                answer, answer_mask = self._answer_ids(turns[seg.turn], use_generated_ids)
                ids.extend(answer)
                mask.extend(answer_mask)
                answer_spans.append((seg.turn, start, len(ids)))
        flush_text()
        if audio_token_counts is not None and len(audio_token_counts) != len(audio_spans):
            raise ValueError(f"{len(audio_token_counts)} audio token counts for {len(audio_spans)} clips")
        return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8), audio_spans, answer_spans)

    def _answer_ids(self, turn: Turn, use_generated_ids: bool) -> tuple[list[int], list[int]]:
        if use_generated_ids and turn.token_ids is not None:
            answer = list(turn.token_ids)
            if answer and answer[-1] in self.end_ids:
                return answer, [1] * len(answer)
            # cut by max_new_tokens: the target never produced an end token here, so the closing
            # <|im_end|> keeps the template valid but carries no loss
            return answer + [self.im_end_id], [1] * len(answer) + [0]
        answer = self._text_ids(turn.text) + [self.im_end_id]
        return answer, [1] * len(answer)
