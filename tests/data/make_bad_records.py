"""Write tests/data/bad_records.jsonl and the broken audio files it points to.

Each bad line carries the field and reason the reader must report in ``expect`` (a test checks
them); two good lines in between must come through intact. An entry with ``after_reading`` is
a record the reader accepts and every stage must reject (a conversation over the context). Run from anywhere:
``python tests/data/make_bad_records.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import soundfile as sf

HERE = Path(__file__).resolve().parent
BAD = HERE / "bad"


def user(audio: str | None, text: str = "Transcribe the speech.") -> dict:
    content = ([{"type": "audio", "audio": audio}] if audio else []) + [{"type": "text", "text": text}]
    return {"role": "user", "content": content}


def assistant(text: str = "hello") -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def write_audio_files() -> None:
    BAD.mkdir(exist_ok=True)
    (BAD / "empty.flac").write_bytes(b"")
    (BAD / "corrupt.flac").write_bytes(b"fLaC" + bytes(range(256)) * 4)
    sf.write(BAD / "zero-length.wav", np.zeros((0,), dtype=np.float32), 16000, subtype="PCM_16")
    sf.write(BAD / "silent.wav", np.zeros((2000,), dtype=np.int16), 16000, subtype="PCM_16")
    # float WAV holding NaN: soundfile writes the floats as they are
    nan = np.sin(np.arange(2000, dtype=np.float32) / 10)
    nan[100:200] = np.nan
    sf.write(BAD / "nan.wav", nan, 16000, subtype="FLOAT")
    # 31 s of a constant (non-zero) level at 8 kHz: over the 30 s window, and FLAC stores
    # constant blocks in a few bytes each, so the fixture stays tiny
    sf.write(BAD / "too-long.flac", np.full((31 * 8000,), 300, dtype=np.int16), 8000, subtype="PCM_16")
    # 20 minutes (30 KB): refused from its header, never decoded
    sf.write(BAD / "huge.flac", np.full((20 * 60 * 8000,), 300, dtype=np.int16), 8000, subtype="PCM_16")


def lines() -> list[bytes | dict]:
    good = "audio/clip-00.flac"
    return [
        (b'{"id": "bad-json", "conversations": [', {"field": "line", "reason": "malformed JSON"}),
        ({"id": "no-conversations"}, {"field": "conversations", "reason": "missing"}),
        ({"id": "empty-conversations", "conversations": []}, {"field": "conversations", "reason": "non-empty list"}),
        ({"id": "good-1", "conversations": [user(good), assistant("the quick brown fox")]}, None),
        ({"id": "unknown-role", "conversations": [{"role": "robot", "content": "hi"}, assistant()]},
         {"field": "conversations[0].role", "reason": "unknown role"}),
        ({"id": "missing-audio", "conversations": [user("bad/does-not-exist.flac"), assistant()]},
         {"field": "conversations[0].content[0].audio", "reason": "does not exist"}),
        ({"id": "corrupt-audio", "conversations": [user("bad/corrupt.flac"), assistant()]},
         {"field": "conversations[0].content[0].audio", "reason": "unreadable"}),
        ({"id": "empty-audio-file", "conversations": [user("bad/empty.flac"), assistant()]},
         {"field": "conversations[0].content[0].audio", "reason": "empty (0 bytes)"}),
        ({"id": "zero-length-audio", "conversations": [user("bad/zero-length.wav"), assistant()]},
         {"field": "conversations[0].content[0].audio", "reason": "no samples"}),
        ({"id": "nan-audio", "conversations": [user("bad/nan.wav"), assistant()]},
         {"field": "conversations[0].content[0].audio", "reason": "NaN"}),
        ({"id": "silent-audio", "conversations": [user("bad/silent.wav"), assistant()]},
         {"field": "conversations[0].content[0].audio", "reason": "silence"}),
        ({"id": "too-long-audio", "conversations": [user("bad/too-long.flac"), assistant()]},
         {"field": "conversations[0].content[0].audio", "reason": "longer than the encoder's 30 s window"}),
        ({"id": "no-assistant", "conversations": [user(good)]},
         {"field": "conversations", "reason": "no assistant turn"}),
        ({"id": "wrong-type", "conversations": [{"role": "user", "content": 42}, assistant()]},
         {"field": "conversations[0].content", "reason": "must be a string or a list"}),
        ({"id": "empty-turn", "conversations": [user(None, ""), assistant()]},
         {"field": "conversations[0].content", "reason": "empty turn"}),
        (b'{"id": "not-utf8", "conversations": [{"role": "user", "content": "caf\xe9"}]}',
         {"field": "line", "reason": "not valid UTF-8"}),
        ({"id": "good-2", "conversations": [{"role": "user", "content": "Say hi."}, assistant("hi")]}, None),
        ({"id": "good-1", "conversations": [user(good), assistant("dup")]},
         {"field": "id", "reason": "duplicate id 'good-1'"}),
        ({"id": "late-system", "conversations": [user(good), {"role": "system", "content": "x"}, assistant()]},
         {"field": "conversations[1].role", "reason": "only allowed first"}),
        ({"id": "assistant-audio", "conversations": [user(None, "hi"), {"role": "assistant", "content": [
            {"type": "audio", "audio": good}]}]},
         {"field": "conversations[1].content", "reason": "audio in a assistant turn"}),
        ({"id": "unknown-part", "conversations": [{"role": "user", "content": [{"type": "video", "video": "x"}]},
                                                  assistant()]},
         {"field": "conversations[0].content[0].type", "reason": "unknown content type"}),
        # well-formed, so the reader accepts it; ~9,000 tokens (3 byte-fallback tokens per character
        # in the tiny target's vocab) are over the 8,192-token context: every stage rejects it
        ({"id": "over-long", "conversations": [{"role": "user", "content": "\u8bed" * 3000}, assistant()]},
         {"field": "conversations", "reason": "longer than", "after_reading": True}),
        ({"id": "huge-audio", "conversations": [user("bad/huge.flac"), assistant()]},
         {"field": "conversations[0].content[0].audio", "reason": "audio is 1200.0 s, longer than the encoder's"}),
    ]


def main() -> None:
    write_audio_files()
    out, expect = [], []
    for payload, expected in lines():
        out.append(payload if isinstance(payload, bytes) else json.dumps(payload, ensure_ascii=False).encode())
        expect.append(expected)
    (HERE / "bad_records.jsonl").write_bytes(b"\n".join(out) + b"\n")
    (HERE / "bad_records.expect.json").write_text(json.dumps(expect, indent=1) + "\n")


if __name__ == "__main__":
    main()
