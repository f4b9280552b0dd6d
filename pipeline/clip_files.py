"""Audio that has no file of its own, written out so that later stages read it as a path.

Stage 1's output is a conversation jsonl whose audio items are paths; clips held inside a dataset
(bytes, arrays) and the pieces ``--vad-split`` cuts are written next to it, under
``OUT/audio/<shard>/``. Bytes are written as they are (the same decoder reads the same bytes, so
stage 2 hears exactly what stage 1's prompt held); arrays and pieces as 32-bit float WAV at 16 kHz,
which round-trips float32 samples exactly.
"""

from __future__ import annotations

import io

import numpy as np

from pipeline.audio import SAMPLE_RATE, Clip


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
