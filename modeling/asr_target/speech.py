"""Spoken clips and conversations for the trained tiny ASR target, from :mod:`modeling.asr_target.sentences`.

Each clip is one sentence spoken by espeak-ng with a voice and speed drawn per clip, resampled to
16 kHz mono, trimmed, with 0.1 s of silence either side. Each conversation asks one of a few tasks
about its clip, so an answer depends on both the audio and the instruction:

| task | share | instruction (one of) | answer |
|---|---|---|---|
| transcribe | 55% | "Transcribe the speech." ... | the sentence as written ("Anna fixed four phones.") |
| capitals | 15% | "Transcribe the speech in capital letters." | the same in capitals |
| last word | 15% | "What is the last word?" | "Forest." |
| count | 15% | "How many words are spoken?" | "Seven words." |

``python -m modeling.asr_target.speech --split train --count 400 --out DIR`` writes ``DIR/data.jsonl`` and
``DIR/audio/*.flac`` (the pipeline's training or held-out set). The output is deterministic for a
given espeak-ng build (its version is recorded in ``DIR/dataset.json``).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from modeling.asr_target.sentences import NUMBERS, sentences, written
from pipeline.core.durable import ensure_dir

SAMPLE_RATE = 16_000
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-gb-scotland", "en-029", "en-us+f2", "en-gb-x-rp")
WPM_RANGE = (130, 200)
COUNT_WORDS = dict(enumerate(("zero", "one", *NUMBERS), start=0))
TASKS: dict[str, tuple[float, tuple[str, ...]]] = {
    "transcribe": (0.55, ("Transcribe the speech.", "Write down what is said.", "What does the speaker say?")),
    "capitals": (0.15, ("Transcribe the speech in capital letters.",)),
    "last_word": (0.15, ("What is the last word?",)),
    "count": (0.15, ("How many words are spoken?",)),
}
DATASET_INFO = "dataset.json"


def answer(task: str, sentence: str) -> str:
    """The expected answer of ``task`` for a clip speaking ``sentence``."""
    if task == "transcribe":
        return written(sentence)
    if task == "capitals":
        return written(sentence).upper()
    if task == "last_word":
        return sentence.split()[-1].capitalize() + "."
    if task == "count":
        return f"{COUNT_WORDS[len(sentence.split())].capitalize()} words."
    raise ValueError(f"unknown task {task!r}")


@dataclass(frozen=True)
class Utterance:
    """One clip to synthesise and the question asked about it."""

    id: str
    sentence: str
    voice: str
    wpm: int
    task: str
    instruction: str

    @property
    def answer(self) -> str:
        return answer(self.task, self.sentence)


def utterances(split: str, count: int, seed: int = 0) -> list[Utterance]:
    """``count`` utterances of distinct ``split`` sentences, voice, speed and task drawn per clip."""
    r = random.Random(f"asr-utterances-{split}-{seed}")
    names, weights = list(TASKS), [w for w, _ in TASKS.values()]
    out = []
    for i, text in enumerate(sentences(split, count, seed)):
        task = r.choices(names, weights)[0]
        out.append(Utterance(f"{split}-{i:05d}", text, r.choice(VOICES), r.randint(*WPM_RANGE), task,
                             r.choice(TASKS[task][1])))
    return out


def espeak_version() -> str:
    try:
        proc = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True)
    except (FileNotFoundError, subprocess.CalledProcessError) as err:
        raise RuntimeError("espeak-ng is needed to synthesise the ASR clips: apt-get install espeak-ng") from err
    return proc.stdout.strip()


def trim_silence(audio: np.ndarray, top_db: float = 40.0, frame: int = 2048, hop: int = 512) -> np.ndarray:
    """Cut leading and trailing frames whose RMS is more than ``top_db`` below the loudest frame."""
    if audio.size < frame:
        return audio
    starts = np.arange(0, audio.size - frame + 1, hop)
    rms = np.sqrt(np.mean(np.stack([audio[s:s + frame] for s in starts]) ** 2, axis=1) + 1e-20)
    loud = np.flatnonzero(20 * np.log10(rms / rms.max()) > -top_db)
    return audio[starts[loud[0]]: starts[loud[-1]] + frame]


def synthesize(text: str, voice: str, wpm: int) -> np.ndarray:
    """``text`` spoken by espeak-ng: 16 kHz mono float32, silence-trimmed, 0.1 s padding each side.
    (espeak writes 22.05 kHz WAV to stdout; soxr resamples: ~40 ms a clip, ten times librosa.load.)"""
    import io

    import soundfile as sf
    import soxr

    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "--stdout", text], check=True,
                         capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32")
    audio = soxr.resample(audio, rate, SAMPLE_RATE).astype(np.float32)
    pad = np.zeros(SAMPLE_RATE // 10, dtype=np.float32)
    return np.concatenate([pad, trim_silence(audio), pad])


def conversation(u: Utterance, audio_path: str) -> dict[str, Any]:
    return {"id": u.id, "task": u.task, "sentence": u.sentence, "voice": u.voice, "wpm": u.wpm,
            "conversations": [
                {"role": "user", "content": [{"type": "audio", "audio": audio_path},
                                             {"type": "text", "text": u.instruction}]},
                {"role": "assistant", "content": [{"type": "text", "text": u.answer}]}]}


def _write_dataset(tmp: Path, split: str, count: int, seed: int) -> dict[str, Any]:
    import soundfile as sf

    (tmp / "audio").mkdir()
    lines = []
    for u in utterances(split, count, seed):
        sf.write(tmp / "audio" / f"{u.id}.flac", synthesize(u.sentence, u.voice, u.wpm), SAMPLE_RATE, subtype="PCM_16")
        lines.append(json.dumps(conversation(u, f"audio/{u.id}.flac")) + "\n")
    (tmp / "data.jsonl").write_text("".join(lines))
    return {"espeak": espeak_version()}


def ensure_dataset_dir(out: str | Path, want: dict[str, Any], write: Callable[[Path], dict[str, Any]],
                       defaults: dict[str, Any] | None = None) -> Path:
    """``out`` built atomically by ``write(tmp)`` unless the ``dataset.json`` there records ``want``
    (``defaults``: values of keys older builds did not record). ``write`` returns what else to record
    (tool versions); ``dataset.json`` is written last, so only a complete build has one."""
    def complete(path: Path) -> bool:
        try:
            info = {**(defaults or {}), **json.loads((path / DATASET_INFO).read_text())}
        except (OSError, ValueError):
            return False
        return {k: info.get(k) for k in want} == want

    def build(tmp: Path) -> None:
        info = {**want, **write(tmp)}
        (tmp / DATASET_INFO).write_text(json.dumps(info, indent=1) + "\n")  # last: the dataset is complete

    return ensure_dir(out, complete, build)


def ensure_dataset(out: str | Path, split: str, count: int, seed: int = 0) -> Path:
    """``out`` with ``count`` clips of ``split`` (``data.jsonl``, ``audio/``, ``dataset.json``), built
    atomically only if no complete build with these arguments is there."""
    return ensure_dataset_dir(out, {"split": split, "count": count, "seed": seed},
                              lambda tmp: _write_dataset(tmp, split, count, seed))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("train", "eval", "target"), required=True)
    parser.add_argument("--count", type=int, required=True, help="clips (each a distinct sentence)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output directory (replaced)")
    args = parser.parse_args(argv)
    print(ensure_dataset(args.out, args.split, args.count, args.seed))


if __name__ == "__main__":
    main()
