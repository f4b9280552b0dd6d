"""Audio loading: any common format, rate and channel count becomes 16 kHz mono float32.

Every failure is an :class:`AudioError` whose message says what is wrong with which file, so a
batch job can reject the record and go on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16_000
# Whisper-style encoders (Qwen2-Audio) see at most a 30 s window; longer audio is cut silently by
# the feature extractor, which would train the draft on audio the target never heard.
MAX_AUDIO_SECONDS = 30.0


class AudioError(ValueError):
    """A clip cannot be used; the message names the file and the reason."""


@dataclass(frozen=True, eq=False)
class Clip:
    """Audio held in a dataset rather than in its own file: encoded bytes (any format soundfile or
    librosa reads: flac, wav, ogg, mp3, ...) or a decoded array with its sampling rate (the forms of
    the ``datasets`` Audio feature). ``name`` says where it came from (file, row/key, column) and
    ``suffix`` is the format's file suffix, used when stage 1 writes the clip out."""

    name: str
    data: bytes | None = None
    array: np.ndarray | None = None
    sampling_rate: int | None = None
    suffix: str = ".wav"

    def __str__(self) -> str:
        return self.name


# with --split-long-audio, clips longer than this are still refused (20 pieces of 30 s are
# already 15,000 audio tokens): a multi-hour recording is not decoded just to be rejected later
MAX_SPLIT_SECONDS = 600.0


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = MAX_AUDIO_SECONDS
    split_long: bool = False  # split over-long clips into max_seconds pieces instead of rejecting
    max_split_seconds: float = MAX_SPLIT_SECONDS
    vad: bool = False  # with split_long: cut at pauses (pipeline.data.vad) instead of every max_seconds
    vad_detector: str = "silero"  # pipeline.data.vad.DEFAULT_DETECTOR


@dataclass
class Piece:
    """A piece of a clip: 16 kHz mono float32 samples and where they lie in the clip (seconds)."""

    samples: np.ndarray
    start_s: float
    end_s: float


def _header_seconds(path: Path | Clip) -> float | None:
    """Duration from the file header without decoding (None when soundfile cannot tell)."""
    import io

    import soundfile as sf

    if isinstance(path, Clip):
        if path.array is not None:
            return None
        if path.data is None:
            return None
    try:
        info = sf.info(io.BytesIO(path.data) if isinstance(path, Clip) else str(path))
    except Exception:  # noqa: BLE001 - not a format soundfile knows: decoded below, or rejected there
        return None
    return info.frames / info.samplerate if info.samplerate > 0 and info.frames > 0 else None


def _too_long(path: Path | Clip, seconds: float, limits: AudioLimits) -> AudioError | None:
    if limits.split_long and seconds > limits.max_split_seconds:
        return AudioError(f"{path}: audio is {seconds:.1f} s, longer than the {limits.max_split_seconds:.0f} s "
                          f"that {'--vad-split' if limits.vad else '--split-long-audio'} splits")
    if not limits.split_long and seconds > limits.max_seconds:
        return AudioError(
            f"{path}: audio is {seconds:.1f} s, longer than the encoder's {limits.max_seconds:.0f} s "
            f"window (pass --split-long-audio to split it into {limits.max_seconds:.0f} s pieces, or --vad-split "
            "to cut it at pauses)")
    return None


def _decode_array(clip: Clip) -> tuple[np.ndarray, int]:
    try:
        data = np.asarray(clip.array, dtype=np.float32)
    except (TypeError, ValueError) as err:
        raise AudioError(f"{clip}: audio array is not numeric ({err})") from None
    if data.ndim not in (1, 2):
        raise AudioError(f"{clip}: audio array has {data.ndim} dimensions (expected 1, or 2 = channels x samples)")
    if not isinstance(clip.sampling_rate, (int, np.integer)) or clip.sampling_rate <= 0:
        raise AudioError(f"{clip}: audio array needs a positive integer sampling_rate, got {clip.sampling_rate!r}")
    # the datasets Audio feature keeps multi-channel arrays as (channels, samples)
    data = data[:, None] if data.ndim == 1 else data.T
    return data, int(clip.sampling_rate)


def _decode(path: Path | Clip) -> tuple[np.ndarray, int]:
    import io

    import soundfile as sf

    if isinstance(path, Clip) and path.array is not None:
        return _decode_array(path)
    source = (lambda: io.BytesIO(path.data)) if isinstance(path, Clip) else (lambda: str(path))
    try:
        data, rate = sf.read(source(), dtype="float32", always_2d=True)
        return data, int(rate)
    except Exception as sf_err:  # noqa: BLE001 - fall back to ffmpeg-backed decoders (mp3, m4a, ...)
        try:
            import librosa

            data, rate = librosa.load(source(), sr=None, mono=False)
        except Exception:  # noqa: BLE001
            # soundfile names a BytesIO by its address: not part of a reproducible reason
            reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "the bytes", str(sf_err))
            raise AudioError(f"{path}: unreadable audio ({reason})") from None
        data = np.asarray(data, dtype=np.float32)
        data = data[:, None] if data.ndim == 1 else data.T
        return data, int(rate)


def load_audio(path: str | Path | Clip, limits: AudioLimits = AudioLimits()) -> list[np.ndarray]:
    """Load ``path`` (a file or an in-dataset :class:`Clip`) as 16 kHz mono float32 pieces (one
    piece unless ``limits.split_long``)."""
    return [piece.samples for piece in load_pieces(path, limits)]


def load_pieces(path: str | Path | Clip, limits: AudioLimits = AudioLimits()) -> list[Piece]:
    """:func:`load_audio` with each piece's offsets in the clip."""
    if isinstance(path, Clip):
        if path.array is None and not path.data:
            raise AudioError(f"{path}: audio bytes are empty (0 bytes)")
    else:
        path = Path(path)
        if not path.exists():
            raise AudioError(f"{path}: audio file does not exist")
        if path.is_dir():
            raise AudioError(f"{path}: is a directory, not an audio file")
        if path.stat().st_size == 0:
            raise AudioError(f"{path}: audio file is empty (0 bytes)")
    header = _header_seconds(path)
    # clearly over the limit by its header: refused unread (hours of audio would take GBs to
    # decode); a clip near the limit is decided on its decoded length below
    if header is not None and _too_long(path, header - 1.0, limits) is not None:
        raise _too_long(path, header, limits)  # type: ignore[misc]
    data, rate = _decode(path)
    if data.size == 0 or data.shape[0] == 0:
        raise AudioError(f"{path}: audio has no samples")
    if not np.isfinite(data).all():
        raise AudioError(f"{path}: audio contains NaN or Inf samples")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if rate != SAMPLE_RATE:
        import librosa

        mono = librosa.resample(mono, orig_sr=rate, target_sr=SAMPLE_RATE, res_type="soxr_hq")
    mono = np.ascontiguousarray(mono, dtype=np.float32)
    if mono.size == 0:
        raise AudioError(f"{path}: audio is shorter than one sample at {SAMPLE_RATE} Hz")
    if float(np.abs(mono).max()) == 0.0:
        raise AudioError(f"{path}: audio is digital silence (every sample is 0)")
    max_samples = int(limits.max_seconds * SAMPLE_RATE)
    if mono.size > max_samples:
        err = _too_long(path, mono.size / SAMPLE_RATE, limits)
        if err is not None:
            raise err
        if limits.vad:
            from pipeline.data.vad import pause_cuts

            cuts = pause_cuts(mono, SAMPLE_RATE, limits.max_seconds, limits.vad_detector)
        else:
            cuts = [(i, min(i + max_samples, mono.size)) for i in range(0, mono.size, max_samples)]
        return [Piece(mono[a:b], a / SAMPLE_RATE, b / SAMPLE_RATE) for a, b in cuts]
    return [Piece(mono, 0.0, mono.size / SAMPLE_RATE)]
