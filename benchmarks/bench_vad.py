"""Which VAD cuts a long recording where the pauses are: the fixture clips joined with known gaps.

    python -m benchmarks.bench_vad [--gap-s 0.5] [--noise 0.002] [--window-s 30] [--repeat 4]

Joins tests/data/audio/clip-*.flac with ``--gap-s`` of silence (plus white noise of std
``--noise`` over everything), then for each detector of :mod:`pipeline.data.vad`: seconds to run, real
time factor, and how many of its cuts fall inside a true gap (a cut elsewhere splits a word).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pipeline.data.audio import SAMPLE_RATE, load_audio
from pipeline.data.vad import DETECTORS, pause_cuts, speech_frames

ROOT = Path(__file__).resolve().parents[1]


def long_recording(gap_s: float, noise: float, repeat: int = 1) -> tuple[np.ndarray, list[tuple[int, int]]]:
    parts, gaps, t = [], [], 0
    for _ in range(repeat):
        for path in sorted((ROOT / "tests" / "data" / "audio").glob("clip-*.flac")):
            clip = load_audio(path)[0]
            gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
            parts += [clip, gap]
            gaps.append((t + clip.size, t + clip.size + gap.size))
            t += clip.size + gap.size
    samples = np.concatenate(parts)
    samples += np.random.default_rng(0).normal(0, noise, samples.size).astype(np.float32)
    return samples, gaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gap-s", type=float, default=0.5)
    ap.add_argument("--noise", type=float, default=0.002)
    ap.add_argument("--window-s", type=float, default=30.0)
    ap.add_argument("--repeat", type=int, default=4, help="times the 24 clips are joined (~69 s each)")
    args = ap.parse_args()
    samples, gaps = long_recording(args.gap_s, args.noise, args.repeat)
    seconds = samples.size / SAMPLE_RATE
    print(f"recording: {seconds:.1f} s, {len(gaps)} gaps of {args.gap_s} s, noise std {args.noise}; "
          f"window {args.window_s} s")
    print(f"{'detector':8s} {'first s':>8s} {'run s':>7s} {'x realtime':>10s} {'cuts':>5s} {'in a gap':>8s}")
    for detector in DETECTORS:
        t0 = time.perf_counter()
        speech_frames(samples[: SAMPLE_RATE], SAMPLE_RATE, detector)  # model load, first call
        t1 = time.perf_counter()
        cuts = pause_cuts(samples, SAMPLE_RATE, args.window_s, detector)
        t2 = time.perf_counter()
        inner = [stop for _, stop in cuts[:-1]]
        good = sum(any(a <= c <= b for a, b in gaps) for c in inner)
        print(f"{detector:8s} {t1 - t0:8.2f} {t2 - t1:7.2f} {seconds / (t2 - t1):10.0f} {len(inner):5d} "
              f"{good:5d}/{len(inner)}")


if __name__ == "__main__":
    main()
