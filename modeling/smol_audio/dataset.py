"""Conversations for the pipeline on the SmolLM2 audio target: spoken, typed, or general text chat.

    python -m modeling.smol_audio.dataset --split train --count 440 --out DIR [--kind spoken|text|chat]
        [--teacher work/smol/teacher-eval.jsonl --target work/smol-audio-target]

writes ``DIR/data.jsonl`` (and for ``spoken``, ``DIR/audio/*.flac``). Kinds:

| kind | user turn | prompts |
|---|---|---|
| ``spoken`` | one clip, the prompt spoken by espeak-ng (voice and speed drawn per clip) | :mod:`modeling.smol_audio.prompts` |
| ``text`` | the same prompt's words, typed | :mod:`modeling.smol_audio.prompts` |
| ``chat`` | a general chat request, typed (what a text-only trainer trains on) | :mod:`modeling.smol_audio.chat_prompts` |

Prompts are reused (with new voices for ``spoken``) when ``count`` exceeds the split. The assistant
turn is what stage 1 replaces; with ``--teacher`` it holds the LLM's answer to the same words as
*text*, so the benchmark's WER column says how far the spoken answer is from the written one;
without, the prompt's words (a placeholder stage 1 overwrites), and none in the ``eval`` split (no WER
reference). Deterministic for one espeak-ng build.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from modeling.asr_target.speech import SAMPLE_RATE, VOICES, ensure_dataset_dir, espeak_version, synthesize
from modeling.smol_audio import chat_prompts
from modeling.smol_audio.prompts import DRAFT_SPLITS, SPLITS, WPM_RANGE, Prompt, prompts

KINDS = ("spoken", "text", "chat")


def items(split: str, count: int, seed: int, kind: str = "spoken") -> list[tuple[str, Prompt, str, int]]:
    """(record id, prompt, voice, wpm) for ``count`` records of ``split``; the voice draws are the same
    for every kind, so ``spoken`` and ``text`` records of one seed pair up by id."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {list(KINDS)}, got {kind!r}")
    pool = chat_prompts.prompts(split) if kind == "chat" else prompts(split)
    rng = random.Random(f"{split}-{seed}")
    out = []
    for i in range(count):
        p = pool[i % len(pool)]
        out.append((f"{p.id}-{i // len(pool)}", p, rng.choice(VOICES), rng.randint(*WPM_RANGE)))
    return out


def teacher_texts(path: Path | None, tokenizer_dir: Path | None) -> dict[str, str]:
    if path is None:
        return {}
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return {r["id"]: tok.decode(r["answer_ids"], skip_special_tokens=True) for r in rows}


def user_content(tmp: Path, kind: str, clip_id: str, p: Prompt, voice: str, wpm: int) -> list[dict[str, Any]]:
    """The user turn: the clip alone (as in a voice chat), or the words typed."""
    if kind != "spoken":
        return [{"type": "text", "text": p.text}]
    import soundfile as sf

    sf.write(tmp / "audio" / f"{clip_id}.flac", synthesize(p.text, voice, wpm), SAMPLE_RATE, subtype="PCM_16")
    return [{"type": "audio", "audio": f"audio/{clip_id}.flac"}]


def _write(tmp: Path, split: str, count: int, seed: int, answers: dict[str, str], kind: str) -> dict[str, Any]:
    if kind == "spoken":
        (tmp / "audio").mkdir()
    lines = []
    for clip_id, p, voice, wpm in items(split, count, seed, kind):
        turns: list[dict[str, Any]] = [{"role": "user", "content": user_content(tmp, kind, clip_id, p, voice, wpm)}]
        if p.id in answers or split != "eval":  # held-out prompts without a teacher: no reference at all
            turns.append({"role": "assistant", "content": [{"type": "text", "text": answers.get(p.id, p.text)}]})
        record = {"id": clip_id, "prompt": p.text, "voice": voice, "wpm": wpm, "conversations": turns}
        lines.append(json.dumps(record) + "\n")
    (tmp / "data.jsonl").write_text("".join(lines))
    return {"espeak": espeak_version() if kind == "spoken" else None}


def ensure_dataset(out: str | Path, split: str, count: int, seed: int = 0, *, teacher: Path | None = None,
                   tokenizer_dir: Path | None = None, kind: str = "spoken") -> Path:
    """``out`` with ``count`` records of ``split``, built atomically unless a complete build is there."""
    items(split, 0, seed, kind)  # a bad kind or split fails here, before any work
    want = {"split": split, "count": count, "seed": seed, "teacher": teacher is not None, "kind": kind}
    return ensure_dataset_dir(out, want, lambda tmp: _write(tmp, split, count, seed, teacher_texts(teacher, tokenizer_dir), kind),
                              defaults={"kind": "spoken"})  # builds before the kinds were all spoken


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=(*SPLITS, *DRAFT_SPLITS), required=True,
                        help="prompt split (modeling/smol_audio/prompts.py); target+train: all but the held-out eval")
    parser.add_argument("--count", type=int, required=True, help="records")
    parser.add_argument("--kind", choices=KINDS, default="spoken", help="spoken clips, the same words typed, "
                        "or general text chat (table above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, help="teacher answers (jsonl of modeling.smol_audio.teacher)")
    parser.add_argument("--target", type=Path, help="the target whose tokenizer decodes the teacher's ids")
    args = parser.parse_args(argv)
    print(ensure_dataset(args.out, args.split, args.count, args.seed, teacher=args.teacher, tokenizer_dir=args.target,
                         kind=args.kind))


if __name__ == "__main__":
    main()
