"""From a validated record to what the target model consumes: ids, loss mask, waveforms.

Shared by stage 2 (dump), the viewer and the tests, so that every consumer expands audio and
masks the loss the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.audio import AudioError, AudioLimits, load_audio
from pipeline.data.records import Record, RecordError
from pipeline.data.template import ChatTokenizer, Encoded


@dataclass
class PreparedSample:
    record: Record
    encoded: Encoded
    waveforms: list[np.ndarray]  # 16 kHz mono float32, one per audio placeholder

    @property
    def length(self) -> int:
        return int(self.encoded.input_ids.shape[0])


def load_record_audio(record: Record, limits: AudioLimits) -> list[np.ndarray]:
    """All clips of a record, in conversation order; raises RecordError naming the bad one."""
    out: list[np.ndarray] = []
    for t_i, turn in enumerate(record.turns):
        for p_i, part in enumerate(turn.parts):
            if part.kind != "audio":
                continue
            try:
                out.extend(load_audio(part.audio, limits))
            except AudioError as err:
                raise RecordError(f"conversations[{t_i}].content[{p_i}].audio", str(err)) from None
    return out


def split_audio_parts(record: Record, limits: AudioLimits) -> Record:
    """With ``split_long``, one over-long clip becomes several audio parts (one placeholder
    each), so the template and the waveforms stay one-to-one."""
    if not limits.split_long:
        return record
    from dataclasses import replace

    from pipeline.data.records import Part

    turns = []
    for turn in record.turns:
        parts: list[Part] = []
        for part in turn.parts:
            if part.kind == "audio":
                pieces = load_audio(part.audio, limits)
                parts.extend(Part("audio", audio=part.audio) for _ in pieces)
            else:
                parts.append(part)
        turns.append(replace(turn, parts=parts))
    return replace(record, turns=turns)


def prepare_sample(record: Record, chat: ChatTokenizer, *, limits: AudioLimits = AudioLimits(),
                   max_length: int | None = None, truncate: bool = False) -> PreparedSample:
    """Tokenize with audio expanded to the encoder's token counts; raises RecordError."""
    # pieces come from the original clips; the split record only gives each piece its placeholder
    waveforms = load_record_audio(record, limits)
    record = split_audio_parts(record, limits)
    counts = [chat.num_audio_tokens(w.shape[0]) for w in waveforms]
    encoded = chat.encode(record.turns, audio_token_counts=counts)
    length = int(encoded.input_ids.shape[0])
    if max_length is not None and length > max_length:
        if not truncate:
            raise RecordError("conversations", f"{length} tokens, longer than --max-length {max_length}")
        cut_audio = [s for s in encoded.audio_spans if s[1] > max_length]
        if cut_audio:
            raise RecordError("conversations", f"{length} tokens; truncating to {max_length} would cut an audio span {cut_audio[0]}")
        encoded = Encoded(encoded.input_ids[:max_length], encoded.loss_mask[:max_length], encoded.audio_spans,
                          [(t, s, min(e, max_length)) for t, s, e in encoded.answer_spans if s < max_length])
    if not encoded.loss_mask.any():
        raise RecordError("conversations", "no loss tokens (no assistant content within the length limit)")
    return PreparedSample(record, encoded, waveforms)


def load_target_processor(target_dir: str | Path) -> tuple[Any, Any]:
    """The target's tokenizer and audio feature extractor (from its processor files)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(target_dir))
    return processor.tokenizer, processor.feature_extractor
