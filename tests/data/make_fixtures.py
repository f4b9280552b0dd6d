"""Regenerate the speech fixtures: ``audio/clip-XX.flac`` and ``speech.jsonl`` next to this file.

Run ``.venv/bin/python tests/data/make_fixtures.py`` (needs ``espeak-ng`` on PATH). Each clip is a
known sentence (:data:`modeling.targets.qwen2_audio_tiny.FIXTURE_SENTENCES`) spoken by espeak-ng with one of several
voices and speeds, resampled to 16 kHz mono, silence-trimmed, 16-bit FLAC. ``speech.jsonl`` holds one
conversation per clip (audio + instruction -> the sentence), then text-only and two-turn conversations.
The output is deterministic for a given espeak-ng build.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import librosa
import numpy as np
import soundfile as sf

from modeling.targets.qwen2_audio_tiny import FIXTURE_SENTENCES, SAMPLING_RATE

HERE = Path(__file__).resolve().parent
# (voice, words per minute): accents, genders and speeds differ so clips differ acoustically.
VOICES: tuple[tuple[str, int], ...] = (
    ("en-us", 160),
    ("en-gb", 150),
    ("en-us+f3", 175),
    ("en-gb+m3", 140),
    ("en-gb-scotland", 165),
    ("en-029", 185),
    ("en-us+f2", 135),
    ("en-gb-x-rp", 200),
)
INSTRUCTIONS: tuple[str, ...] = (
    "Transcribe the speech.",
    "Repeat what the speaker says.",
    "What is said in the audio?",
    "Write down the words you hear.",
)
MIN_SECONDS, MAX_SECONDS = 1.5, 3.5


def synthesize(text: str, voice: str, wpm: int) -> np.ndarray:
    """Speak ``text`` with espeak-ng; return 16 kHz mono float32 with leading/trailing silence cut."""
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "speech.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(wpm), "-w", str(wav), text], check=True)
        audio, _ = librosa.load(wav, sr=SAMPLING_RATE, mono=True)
    trimmed, _ = librosa.effects.trim(audio, top_db=40)
    # Keep 0.1 s of silence either side: real recordings never start on the first phoneme.
    pad = np.zeros(SAMPLING_RATE // 10, dtype=np.float32)
    return np.concatenate([pad, trimmed, pad]).astype(np.float32)


def audio_turn(clip: str, instruction: str) -> dict[str, Any]:
    """A user message carrying one clip and a text instruction."""
    return {
        "role": "user",
        "content": [{"type": "audio", "audio": f"audio/{clip}.flac"}, {"type": "text", "text": instruction}],
    }


def text_turn(role: str, text: str) -> dict[str, Any]:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def extra_conversations() -> list[dict[str, Any]]:
    """Three text-only conversations (plain-string content) and three two-turn audio conversations."""
    text_only = [
        ("What is the capital of France?", "The capital of France is Paris."),
        ("Why is the sky blue?", "Sunlight is scattered by the air."),
        (
            "Tell me a short story about a lighthouse keeper.",
            "Once upon a time, a keeper lived alone on a rocky island.",
        ),
    ]
    records: list[dict[str, Any]] = [
        {
            "id": f"text-{i:02d}",
            "conversations": [{"role": "user", "content": q}, {"role": "assistant", "content": a}],
        }
        for i, (q, a) in enumerate(text_only)
    ]
    follow_ups = [
        ("Can you summarize it in one sentence?", "The speaker says the quick fox jumps over the dog."),
        ("How many people are speaking in this clip?", "There is only one speaker, and the voice is clear."),
        ("Is the speaker happy, sad or angry?", "The speaker sounds calm and friendly."),
    ]
    for i, (question, answer) in enumerate(follow_ups):
        clip = f"clip-{i:02d}"
        turns = [
            audio_turn(clip, INSTRUCTIONS[0]),
            text_turn("assistant", FIXTURE_SENTENCES[i]),
            text_turn("user", question),
            text_turn("assistant", answer),
        ]
        if i == 2:
            # One conversation brings its own system prompt (the template then adds no default one).
            turns.insert(0, {"role": "system", "content": "You are a careful listener who answers briefly."})
        records.append({"id": f"multi-{i:02d}", "conversations": turns})
    return records


def main() -> None:
    audio_dir = HERE / "audio"
    audio_dir.mkdir(exist_ok=True)
    records = []
    for i, sentence in enumerate(FIXTURE_SENTENCES):
        clip = f"clip-{i:02d}"
        voice, wpm = VOICES[i % len(VOICES)]
        audio = synthesize(sentence, voice, wpm)
        seconds = len(audio) / SAMPLING_RATE
        if not MIN_SECONDS <= seconds <= MAX_SECONDS:
            raise SystemExit(
                f"{clip} ({voice}, {wpm} wpm) lasts {seconds:.2f} s: change its sentence or speed"
            )
        sf.write(audio_dir / f"{clip}.flac", audio, SAMPLING_RATE, format="FLAC", subtype="PCM_16")
        turns = [audio_turn(clip, INSTRUCTIONS[i % len(INSTRUCTIONS)]), text_turn("assistant", sentence)]
        records.append({"id": clip, "conversations": turns})
        print(f"{clip}: {seconds:.2f} s  {voice:<15} {wpm} wpm  {sentence}")
    records += extra_conversations()
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (HERE / "speech.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(records)} conversations to {HERE / 'speech.jsonl'}")


if __name__ == "__main__":
    main()
