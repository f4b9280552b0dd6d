"""Spoken-instruction conversations for the pipeline on the SmolLM2 audio target.

    python -m modeling.smol_audio.dataset --split train --count 440 --out DIR [--teacher work/smol/teacher-eval.jsonl]

writes ``DIR/data.jsonl`` and ``DIR/audio/*.flac``: one clip per conversation, a prompt of the split
(:mod:`modeling.smol_audio.prompts`) spoken by espeak-ng (voice and speed drawn per clip; prompts are
reused with new voices when ``count`` exceeds the split). The user turn is the clip alone, as in a
voice chat. The assistant turn is what stage 1 replaces; with ``--teacher`` it holds the LLM's answer
to the same words as *text*, so the benchmark's WER column says how far the spoken answer is from the
written one; without, the prompt's words (a placeholder stage 1 overwrites), and none in the ``eval``
split (no WER reference). Deterministic for one espeak-ng build.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from modeling.asr_target.speech import SAMPLE_RATE, VOICES, espeak_version, synthesize
from modeling.smol_audio.prompts import WPM_RANGE, Prompt, prompts
from pipeline.core.durable import ensure_dir

DATASET_INFO = "dataset.json"


def items(split: str, count: int, seed: int) -> list[tuple[str, Prompt, str, int]]:
    """(clip id, prompt, voice, wpm) for ``count`` clips of ``split``."""
    pool = prompts(split)
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


def _write(tmp: Path, split: str, count: int, seed: int, answers: dict[str, str]) -> None:
    import soundfile as sf

    (tmp / "audio").mkdir()
    lines = []
    for clip_id, p, voice, wpm in items(split, count, seed):
        sf.write(tmp / "audio" / f"{clip_id}.flac", synthesize(p.text, voice, wpm), SAMPLE_RATE, subtype="PCM_16")
        turns: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "audio", "audio": f"audio/{clip_id}.flac"}]}]
        if p.id in answers or split != "eval":  # held-out prompts without a teacher: no reference at all
            turns.append({"role": "assistant", "content": [{"type": "text", "text": answers.get(p.id, p.text)}]})
        record = {"id": clip_id, "prompt": p.text, "voice": voice, "wpm": wpm, "conversations": turns}
        lines.append(json.dumps(record) + "\n")
    (tmp / "data.jsonl").write_text("".join(lines))
    info = {"split": split, "count": count, "seed": seed, "espeak": espeak_version(), "teacher": bool(answers)}
    (tmp / DATASET_INFO).write_text(json.dumps(info, indent=1) + "\n")  # last: the dataset is complete


def ensure_dataset(out: str | Path, split: str, count: int, seed: int = 0, *, teacher: Path | None = None,
                   tokenizer_dir: Path | None = None) -> Path:
    """``out`` with ``count`` clips of ``split``, built atomically unless a complete build is there."""
    want = {"split": split, "count": count, "seed": seed, "teacher": teacher is not None}

    def complete(path: Path) -> bool:
        try:
            info = json.loads((path / DATASET_INFO).read_text())
        except (OSError, ValueError):
            return False
        return {k: info.get(k) for k in want} == want

    return ensure_dir(out, complete, lambda tmp: _write(tmp, split, count, seed, teacher_texts(teacher, tokenizer_dir)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--split", choices=("train", "eval", "target"), required=True)
    parser.add_argument("--count", type=int, required=True, help="clips")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--teacher", type=Path, help="teacher answers (jsonl of modeling.smol_audio.teacher)")
    parser.add_argument("--target", type=Path, help="the target whose tokenizer decodes the teacher's ids")
    args = parser.parse_args(argv)
    print(ensure_dataset(args.out, args.split, args.count, args.seed, teacher=args.teacher, tokenizer_dir=args.target))


if __name__ == "__main__":
    main()
