"""How well the tiny ASR target answers: WER, task accuracy and how peaked its greedy choices are.

Run through transformers at batch size 1 with the stock 30 s audio window (what inference uses).
WER is over the transcription tasks (plain and capitals, scored case- and punctuation-blind);
``task_accuracy`` is exact-match over every task; ``mean_top1_prob`` is the mean probability the
target gives its own greedy token (a real model is peaked: ~0.8 and up; a random one ~0.01).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling.asr_target.speech import Utterance
from modeling.targets.qwen2_audio import Qwen2AudioFamily
from pipeline.data.records import Part, Turn
from pipeline.data.template import ChatTokenizer
from pipeline.data.wer import corpus_wer

TRANSCRIPTION_TASKS = ("transcribe", "capitals")


def prompt_ids(chat: ChatTokenizer, u: Utterance, num_samples: int | None = None) -> list[int]:
    """The generation prompt for ``u``: the audio placeholder expanded for a clip of ``num_samples``
    (what transformers takes), or a single placeholder when None (what vLLM takes)."""
    turns = [Turn("user", [Part("audio", audio=Path(f"{u.id}.flac")), Part("text", text=u.instruction)])]
    counts = None if num_samples is None else [Qwen2AudioFamily.num_audio_tokens(num_samples)]
    return chat.encode(turns, until_turn=1, audio_token_counts=counts).input_ids.tolist()


@torch.inference_mode()
def greedy_answers(model: Any, processor: Any, utts: Sequence[Utterance], waves: Sequence[np.ndarray],
                   max_new_tokens: int = 32) -> list[tuple[str, list[float]]]:
    """(decoded answer, top-1 probability of each generated token) per clip, greedy, batch 1."""
    chat = ChatTokenizer(processor.tokenizer, Qwen2AudioFamily)
    out = []
    for u, wave in zip(utts, waves, strict=True):
        ids = torch.tensor([prompt_ids(chat, u, wave.shape[0])])
        audio = Qwen2AudioFamily.audio_inputs(processor.feature_extractor, [wave])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             input_features=torch.from_numpy(audio["input_features"]).to(model.dtype),
                             feature_attention_mask=torch.from_numpy(audio["feature_attention_mask"]),
                             max_new_tokens=max_new_tokens,
                             do_sample=False, output_scores=True, return_dict_in_generate=True,
                             eos_token_id=list(chat.end_ids), pad_token_id=processor.tokenizer.pad_token_id)
        tokens = gen.sequences[0, ids.shape[1]:].tolist()
        probs = [float(torch.softmax(s[0].float(), -1).max()) for s in gen.scores]
        out.append((processor.tokenizer.decode(tokens, skip_special_tokens=True), probs))
    return out


def score(utts: Sequence[Utterance], answers: Sequence[str], probs: Sequence[list[float]]) -> dict[str, Any]:
    """WER (transcription tasks), exact-match accuracy per task and overall, mean top-1 probability."""
    pairs = [(u.answer, a) for u, a in zip(utts, answers, strict=True) if u.task in TRANSCRIPTION_TASKS]
    per_task: dict[str, list[bool]] = {}
    for u, a in zip(utts, answers, strict=True):
        per_task.setdefault(u.task, []).append(a.strip() == u.answer)
    flat = [p for ps in probs for p in ps]
    return {"wer": corpus_wer([r for r, _ in pairs], [h for _, h in pairs]),
            "task_accuracy": float(np.mean([x for v in per_task.values() for x in v])),
            "accuracy_by_task": {k: round(float(np.mean(v)), 4) for k, v in sorted(per_task.items())},
            "mean_top1_prob": float(np.mean(flat)) if flat else None, "clips": len(utts)}


def greedy_quality(model: Any, processor: Any, utts: Sequence[Utterance], waves: Sequence[np.ndarray]) -> dict[str, Any]:
    results = greedy_answers(model, processor, utts, waves)
    return score(utts, [a for a, _ in results], [p for _, p in results])
