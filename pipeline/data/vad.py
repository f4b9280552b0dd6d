"""Cut a long recording at pauses into pieces that fit the encoder's window (``--vad-split``).

A voice-activity detector marks each 30 ms frame speech or not; the cutter then walks the clip
and ends each piece in the latest pause of at least 300 ms inside its window (at the pause's
middle), else in the window's longest pause (>= 90 ms), and only when the window holds no pause
at all at the window's end (a hard cut). Pieces are
contiguous, so their offsets cover the whole clip.

Detectors (``benchmarks/bench_vad.py`` measures them; docs/inputs.md has the numbers):

- ``silero`` (default): Silero VAD from the ``silero-vad`` wheel (its TorchScript model ships in
  the wheel, nothing is downloaded); the only one that still cut in the pauses under loud noise,
  25-50x real time on 2 busy cores (it runs only on clips over the window).
- ``webrtc``: the WebRTC VAD from the ``webrtcvad-wheels`` wheel, no model file, ~3000x real
  time; as good on clean speech, lost under loud noise.
- ``energy``: frame RMS against a threshold relative to the clip's loud frames; no dependency.
"""

from __future__ import annotations

import functools

import numpy as np

FRAME_S = 0.03  # webrtcvad accepts 10, 20 or 30 ms frames
MIN_PAUSE_FRAMES = 3  # a pause of at least 90 ms is a cut candidate
CLEAR_PAUSE_FRAMES = 10  # one of at least 300 ms is a sentence-like break
DETECTORS = ("silero", "webrtc", "energy")
DEFAULT_DETECTOR = "silero"


def speech_frames(samples: np.ndarray, rate: int, detector: str = DEFAULT_DETECTOR) -> np.ndarray:
    """One bool per ``FRAME_S`` frame: True where the detector hears speech."""
    frame = int(rate * FRAME_S)
    n = samples.size // frame
    if detector == "webrtc":
        import webrtcvad

        vad = webrtcvad.Vad(2)
        pcm = (np.clip(samples[: n * frame], -1, 1) * 32767).astype("<i2").tobytes()
        return np.array([vad.is_speech(pcm[i * frame * 2 : (i + 1) * frame * 2], rate) for i in range(n)], bool)
    if detector == "silero":
        import torch
        from silero_vad import get_speech_timestamps

        stamps = get_speech_timestamps(torch.from_numpy(np.ascontiguousarray(samples)), _silero(),
                                       sampling_rate=rate)
        flags = np.zeros(n, bool)
        for s in stamps:
            flags[s["start"] // frame : -(-s["end"] // frame)] = True
        return flags
    if detector == "energy":
        rms = np.sqrt((samples[: n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(axis=1))
        loud = np.quantile(rms, 0.9) if n else 0.0
        return rms > max(loud * 0.1, 1e-4)
    raise ValueError(f"unknown VAD detector {detector!r} (expected one of {list(DETECTORS)})")


@functools.lru_cache(maxsize=1)
def _silero():
    from silero_vad import load_silero_vad

    return load_silero_vad()


def pauses(flags: np.ndarray) -> list[tuple[int, int]]:
    """Runs of non-speech frames ``(first, stop)`` at least MIN_PAUSE_FRAMES long."""
    out, start = [], None
    for i, speech in enumerate([*flags.tolist(), True]):
        if not speech and start is None:
            start = i
        elif speech and start is not None:
            if i - start >= MIN_PAUSE_FRAMES:
                out.append((start, i))
            start = None
    return out


def pause_cuts(samples: np.ndarray, rate: int, max_seconds: float, detector: str = DEFAULT_DETECTOR,
               min_seconds: float = 1.0) -> list[tuple[int, int]]:
    """Sample ranges ``(start, stop)`` covering ``samples``, each at most ``max_seconds`` long,
    cut in pauses where the window holds one (module docstring)."""
    frame = int(rate * FRAME_S)
    limit = int(max_seconds * rate)
    gaps = pauses(speech_frames(samples, rate, detector))
    cuts: list[tuple[int, int]] = []
    start = 0
    while samples.size - start > limit:
        lo, hi = start + int(min_seconds * rate), start + limit
        inside = [(b - a, (a + b) // 2 * frame) for a, b in gaps if lo <= (a + b) // 2 * frame <= hi]
        # the latest clear pause keeps pieces long; a window with only short pauses takes its longest
        clear = [c for c in inside if c[0] >= CLEAR_PAUSE_FRAMES]
        stop = clear[-1][1] if clear else max(inside)[1] if inside else hi
        cuts.append((start, stop))
        start = stop
    cuts.append((start, samples.size))
    return cuts
