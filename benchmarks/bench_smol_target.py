"""How well the SmolLM2 audio target listens, on held-out spoken prompts, in vLLM (README "A real LLM target").

    python -m benchmarks.bench_smol_target --target work/smol-audio-target \\
        [--prompts 100 --max-tokens 128 --speed-tokens 64 --out benchmarks/results/smol_target.json]

For each held-out (``eval`` split) prompt, spoken by espeak-ng in a voice the dataset draws:
- **answer agreement**: the greedy answer to the clip vs the LLM's answer to the same words as text
  (computed in the same engine, as :mod:`modeling.smol_audio.teacher` does): exact (all ``--max-tokens`` tokens) and first 16
  tokens equal, and word error rate of the spoken answer against the written one;
- **transcription WER**: the clip + "Transcribe the audio." against the prompt's words;
- **peakedness**: mean probability of each greedy token (vLLM logprobs), answer length distribution;
- **plain decode speed** at batch 1 in fp32 and bf16 (tokens/s over ``--speed-prompts`` prompts, median
  of ``--repeats`` passes with range).
All in fp32 but the bf16 speed row. One engine at a time (2-core machines).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np


def _engine(target: str, dtype: str, max_num_seqs: int) -> Any:
    from pipeline.engine.offline import build_llm

    return build_llm(target, max_model_len=1024, dtype=dtype, max_num_seqs=max_num_seqs)


def _close(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


def _requests(chat: Any, waves: list[np.ndarray], instruction: str | None) -> list[dict[str, Any]]:
    from pathlib import Path as P

    from pipeline.data.records import Part, Turn

    out = []
    for wave in waves:
        parts = [Part("audio", audio=P("clip.flac"))] + ([Part("text", text=instruction)] if instruction else [])
        ids = chat.encode([Turn("user", parts)], until_turn=1).input_ids.tolist()
        out.append({"prompt_token_ids": ids, "multi_modal_data": {"audio": [(wave, 16000)]}})
    return out


def main(argv: list[str] | None = None) -> None:
    from vllm import SamplingParams

    from modeling.asr_target.speech import synthesize
    from modeling.smol_audio.dataset import items
    from modeling.smol_audio.prompts import TRANSCRIBE, WPM_RANGE, names_topic
    from modeling.smol_audio.teacher import text_turns
    from modeling.targets import chat_tokenizer_for
    from pipeline.data.wer import corpus_wer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="work/smol-audio-target")
    parser.add_argument("--prompts", type=int, default=100)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--speed-prompts", type=int, default=8)
    parser.add_argument("--speed-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per dtype; 0: skip the speed rows "
                        "(the quality figures do not depend on the machine's load, the speed does)")
    parser.add_argument("--out", default="benchmarks/results/smol_target.json")
    args = parser.parse_args(argv)

    chat = chat_tokenizer_for(args.target)
    tok = chat.tokenizer
    clips = items("eval", args.prompts, seed=0)
    waves = [synthesize(p.text, voice, wpm) for _, p, voice, wpm in clips]
    result: dict[str, Any] = {"prompts": len(clips), "max_tokens": args.max_tokens, "wpm": WPM_RANGE,
                              "machine": platform.processor() or platform.machine()}

    llm = _engine(args.target, "float32", 16)
    greedy = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, logprobs=0, detokenize=False)
    answers = llm.generate(_requests(chat, waves, None), greedy, use_tqdm=False)
    written = llm.generate([{"prompt_token_ids": chat.encode(text_turns(p.text), until_turn=1).input_ids.tolist()}
                            for _, p, _, _ in clips], greedy, use_tqdm=False)
    transcripts = llm.generate(_requests(chat, waves, TRANSCRIBE),
                               SamplingParams(max_tokens=48, temperature=0.0, detokenize=False), use_tqdm=False)
    _close(llm)
    exact = first16 = 0
    probs, lengths, hyps, refs = [], [], [], []
    for out, ref in zip(answers, written, strict=True):
        got, want = list(out.outputs[0].token_ids), list(ref.outputs[0].token_ids)
        exact += got == want
        first16 += got[:16] == want[:16]
        lengths.append(len(got))
        probs += [math.exp(next(iter(lp.values())).logprob) for lp in out.outputs[0].logprobs or []]
        hyps.append(tok.decode(got, skip_special_tokens=True))
        refs.append(tok.decode(want, skip_special_tokens=True))
    heard = [tok.decode(o.outputs[0].token_ids, skip_special_tokens=True) for o in transcripts]
    result |= {
        "answer_exact_equal": round(exact / len(clips), 3), "answer_first16_equal": round(first16 / len(clips), 3),
        "answer_wer_vs_text_answer": round(corpus_wer(refs, hyps), 3),
        # the text answer's own rate is the ceiling of this rough check (some answers never name the topic)
        "answer_names_topic": round(np.mean([names_topic(p.text, h) for (_, p, _, _), h in zip(clips, hyps, strict=True)]), 3),
        "text_answer_names_topic": round(np.mean([names_topic(p.text, r) for (_, p, _, _), r in zip(clips, refs, strict=True)]), 3),
        "transcription_wer": round(corpus_wer([p.text for _, p, _, _ in clips], heard), 3),
        "mean_top1_probability": round(float(np.mean(probs)), 3),
        "answer_tokens": {"mean": round(float(np.mean(lengths)), 1), "p10": int(np.percentile(lengths, 10)),
                          "median": int(np.median(lengths)), "p90": int(np.percentile(lengths, 90)),
                          "hit_max_tokens": sum(n >= args.max_tokens for n in lengths)},
        "examples": [{"prompt": p.text, "heard": h, "spoken_answer": a[:200], "text_answer": r[:200]}
                     for (_, p, _, _), h, a, r in list(zip(clips, heard, hyps, refs, strict=True))[:5]],
    }
    speed = {}
    for dtype in ("float32", "bfloat16") if args.repeats else ():  # --repeats 0: quality only
        llm = _engine(args.target, dtype, 1)
        reqs = _requests(chat, waves[: args.speed_prompts], None)
        params = SamplingParams(max_tokens=args.speed_tokens, min_tokens=args.speed_tokens, temperature=0.0,
                                detokenize=False)
        llm.generate(reqs[:1], params, use_tqdm=False)  # warm-up
        rates = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            n = sum(len(o.outputs[0].token_ids) for r in reqs for o in llm.generate([r], params, use_tqdm=False))
            rates.append(n / (time.perf_counter() - start))
        _close(llm)
        speed[dtype] = {"tokens_per_s_median": round(statistics.median(rates), 1),
                        "range": [round(min(rates), 1), round(max(rates), 1)]}
    result["plain_decode_batch1"] = speed
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "examples"}, indent=1))


if __name__ == "__main__":
    main()
