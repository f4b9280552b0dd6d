"""Quality of the trained tiny ASR target on its held-out clips: what the README's target table shows.

    python -m benchmarks.bench_asr_target [--target tests/data/asr-target] [--clips 100] [--batch 16]

- transformers, fp32, batch 1 (:mod:`modeling.asr_target.quality`): WER over the transcription tasks,
  exact-match accuracy per task, mean top-1 probability of the target's own greedy tokens;
- vLLM, bf16 and fp32: WER of the greedy answers, and the share of prompts whose greedy output is
  identical at ``max_num_seqs`` 1 and ``--batch`` (batch invariance; a random target: ~40% in bf16
  on an AMX CPU).

The held-out clips are the generator's ``eval`` split (sentences the target never heard).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default=str(REPO / "tests" / "data" / "asr-target"))
    parser.add_argument("--clips", type=int, default=100)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--data", default=str(REPO / "work" / "asr-eval-bench"), help="held-out clips folder")
    parser.add_argument("--out", default="", help="also write the numbers as JSON here")
    args = parser.parse_args(argv)

    import soundfile as sf
    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from modeling.asr_target.quality import TRANSCRIPTION_TASKS, greedy_quality, score
    from modeling.asr_target.speech import ensure_dataset, utterances
    from modeling.targets.qwen2_audio import Qwen2AudioFamily
    from pipeline.data.template import ChatTokenizer
    from pipeline.engine.offline import GenRequest, OfflineGenerator, Sampling, build_llm

    data = ensure_dataset(args.data, "eval", args.clips)
    utts = utterances("eval", args.clips)
    waves = [sf.read(data / "audio" / f"{u.id}.flac", dtype="float32")[0] for u in utts]
    processor = AutoProcessor.from_pretrained(args.target)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(args.target, dtype=torch.float32).eval()
    report: dict = {"target": args.target, "clips": args.clips, "hf_fp32": greedy_quality(model, processor, utts, waves)}
    del model
    gc.collect()

    from modeling.asr_target.quality import prompt_ids

    chat = ChatTokenizer(processor.tokenizer, Qwen2AudioFamily)
    requests = [GenRequest(prompt_ids(chat, u), [w], Sampling(32)) for u, w in zip(utts, waves, strict=True)]
    for dtype in ("bfloat16", "float32"):
        outs = {}
        for seqs in (1, args.batch):
            engine = OfflineGenerator(build_llm(args.target, dtype=dtype, max_model_len=1024, max_num_seqs=seqs,
                                                enable_prefix_caching=False))
            try:
                outs[seqs] = [r.token_ids for r in engine.generate(requests)]
            finally:
                engine.close()
                gc.collect()
        texts = [processor.tokenizer.decode(ids, skip_special_tokens=True) for ids in outs[1]]
        same = sum(a == b for a, b in zip(outs[1], outs[args.batch], strict=True))
        scored = score(utts, texts, [[] for _ in utts])
        report[f"vllm_{dtype}"] = {"wer": scored["wer"], "task_accuracy": scored["task_accuracy"],
                                   f"identical_batch_1_vs_{args.batch}": same / len(utts)}
    hf = report["hf_fp32"]
    print(f"held-out clips: {args.clips} (transcription tasks {TRANSCRIPTION_TASKS})")
    print(f"transformers fp32: WER {hf['wer']:.3f}, task accuracy {hf['task_accuracy']:.3f} "
          f"{hf['accuracy_by_task']}, mean top-1 probability {hf['mean_top1_prob']:.3f}")
    for dtype in ("bfloat16", "float32"):
        r = report[f"vllm_{dtype}"]
        print(f"vLLM {dtype}: WER {r['wer']:.3f}, task accuracy {r['task_accuracy']:.3f}, identical at batch 1 "
              f"and {args.batch}: {r[f'identical_batch_1_vs_{args.batch}']:.0%}")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
