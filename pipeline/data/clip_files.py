"""Audio that has no file of its own, written out so that later stages read it as a path, and
``--vad-split``'s records: one per piece of a long recording.

Stage 1's output is a conversation jsonl whose audio items are paths; clips held inside a dataset
(bytes, arrays) and the pieces ``--vad-split`` cuts are written next to it, under
``OUT/audio/<shard>/``. Bytes are written as they are (the same decoder reads the same bytes, so
stage 2 hears exactly what stage 1's prompt held); arrays and pieces as 32-bit float WAV at 16 kHz,
which round-trips float32 samples exactly.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.data.audio import SAMPLE_RATE, AudioError, AudioLimits, Clip, load_pieces
from pipeline.data.records import Part, Record, RecordError

# write(record, file name, content) -> the durable file's path
Writer = Callable[[Record, str, bytes], Path]


def float_wav(samples: np.ndarray, rate: int = SAMPLE_RATE) -> bytes:
    import soundfile as sf

    buf = io.BytesIO()
    data = np.asarray(samples, dtype=np.float32)
    sf.write(buf, data.T if data.ndim == 2 else data, rate, format="WAV", subtype="FLOAT")
    return buf.getvalue()


def clip_file(clip: Clip) -> tuple[bytes, str]:
    """(file content, suffix) of a clip."""
    if clip.data is not None:
        return clip.data, clip.suffix
    return float_wav(np.asarray(clip.array), int(clip.sampling_rate or SAMPLE_RATE)), ".wav"


def with_clip_files(rec: Record, write: Writer) -> Record:
    """The record with each in-dataset clip written out and named by its path."""
    turns, n = [], 0
    for turn in rec.turns:
        parts = []
        for part in turn.parts:
            if isinstance(part.audio, Clip):
                data, suffix = clip_file(part.audio)
                part = Part("audio", audio=write(rec, f"{n}{suffix}", data))
                n += 1
            parts.append(part)
        turns.append(replace(turn, parts=parts))
    return replace(rec, turns=turns) if n else rec


def vad_records(rec: Record, limits: AudioLimits, write: Writer) -> list[Record]:
    """A record whose one clip is over ``limits.max_seconds`` as one record per piece cut at pauses
    (id ``<id>@<k>``, ``parent_id``, ``offset_s``/``end_s`` in the clip, the piece written as a
    float WAV); any other record as it is. Raises RecordError for unusable audio."""
    clips = [(t, p) for t, turn in enumerate(rec.turns) for p, part in enumerate(turn.parts) if part.kind == "audio"]
    if len(clips) != 1:
        return [rec]
    t, p = clips[0]
    try:
        pieces = load_pieces(rec.turns[t].parts[p].audio, limits)
    except AudioError as err:
        raise RecordError(f"conversations[{t}].content[{p}].audio", str(err)) from None
    if len(pieces) == 1:
        return [rec]
    out = []
    for k, piece in enumerate(pieces):
        turns = list(rec.turns)
        parts = list(turns[t].parts)
        parts[p] = Part("audio", audio=write(rec, f"piece{k:03d}.wav", float_wav(piece.samples)))
        turns[t] = replace(turns[t], parts=parts)
        raw = {**rec.raw, "id": f"{rec.id}@{k}", "parent_id": rec.id, "offset_s": round(piece.start_s, 3),
               "end_s": round(piece.end_s, 3)}
        out.append(replace(rec, id=f"{rec.id}@{k}", turns=turns, raw=raw))
    return out
