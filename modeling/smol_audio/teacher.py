"""The teacher: SmolLM2's own greedy answers to the prompts as *text*, from vLLM (fp32).

The target's encoder is trained so that the frozen LLM, hearing a prompt, answers what it answers when
it reads the prompt (cross-modal distillation), and the target's quality is measured against the same
answers. A text-only prompt never reaches the audio tower, so the untrained target serves them.

    python -m modeling.smol_audio.teacher --target work/smol-audio-target --split target --max-tokens 48 --out F

writes one JSON line per prompt: ``{"id", "text", "answer_ids"}`` (ids without the closing end token
when the answer was cut by ``--max-tokens``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from modeling.smol_audio.prompts import Prompt, prompts
from pipeline.core.durable import atomic_write_text
from pipeline.data.records import Part, Turn


def text_turns(text: str) -> list[Turn]:
    return [Turn("user", [Part("text", text=text)])]


def answer_texts(target: str | Path, items: list[Prompt], *, max_tokens: int, dtype: str = "fp32",
                 batch_size: int = 64, llm: Any = None) -> list[list[int]]:
    """Greedy answer ids for each prompt read as text (prompt ids from the pipeline's chat tokenizer)."""
    from vllm import SamplingParams

    from modeling.targets import chat_tokenizer_for
    from pipeline.engine.offline import build_llm

    chat = chat_tokenizer_for(target)
    own = llm is None
    if own:
        llm = build_llm(target, max_model_len=1024, dtype=dtype, max_num_seqs=batch_size)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, detokenize=False)
    reqs = [{"prompt_token_ids": chat.encode(text_turns(p.text), until_turn=1).input_ids.tolist()} for p in items]
    try:
        outs = llm.generate(reqs, params, use_tqdm=False)
    finally:
        if own:
            llm.llm_engine.engine_core.shutdown()
    return [list(o.outputs[0].token_ids) for o in outs]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, type=Path)
    parser.add_argument("--split", required=True, choices=("target", "train", "eval"))
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    items = prompts(args.split)
    start = time.perf_counter()
    answers = answer_texts(args.target, items, max_tokens=args.max_tokens)
    seconds = time.perf_counter() - start
    lines = [json.dumps({"id": p.id, "text": p.text, "answer_ids": a}) + "\n" for p, a in zip(items, answers, strict=True)]
    atomic_write_text(args.out, "".join(lines))
    tokens = sum(len(a) for a in answers)
    print(f"{len(items)} prompts, {tokens} answer tokens in {seconds:.0f} s ({tokens / seconds:.0f} tokens/s)")


if __name__ == "__main__":
    main()
