"""Can the frozen SmolLM2 read a prompt placed in its audio slot as the words' own embeddings?

    python -m benchmarks.probe_smol_reading --target work/smol-audio-target [--prompts 8 --layout once --rank 0]

An upper bound for what an encoder trained toward the LLM's embeddings (``modeling.smol_audio.train``'s
align phase) can give: each held-out prompt's audio rows (as many as its clip would have) are filled
with the embeddings of the prompt's tokens, spread evenly over the rows:

- ``once``: each token at the first row of its share, the filler (" ") elsewhere: what a CTC path
  (one spike a token, blanks between) aligned to embeddings looks like;
- ``repeat``: each token over its whole share.

``--rank R`` first projects the prompt tokens' embeddings onto their top R principal directions: the
error a projector of rank R (the encoder's width) cannot avoid. The LLM answers greedily
(transformers, fp32, 16 tokens), read as text it answers the same prompt; printed per prompt, with
how many answers name the prompt's topic, start with the same token, and equal the text answer in all
16 tokens. Written to ``--out`` (default ``benchmarks/results/smol_reading_probe.json``, one entry per
layout and rank, merged).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import torch


def _greedy(model: Any, emb: torch.Tensor, end_id: int, max_tokens: int = 16) -> list[int]:
    table = model.model.get_input_embeddings()
    out: list[int] = []
    for _ in range(max_tokens):
        token = int(model.lm_head(model.model.language_model(inputs_embeds=emb).last_hidden_state[:, -1]).argmax(-1))
        out.append(token)
        if token == end_id:
            break
        emb = torch.cat([emb, table(torch.tensor([[token]]))], 1)
    return out


def _rows(layout: str, tokens: list[int], frames: int, filler: int) -> list[int]:
    share = frames / len(tokens)
    rows = []
    for j in range(frames):
        k = min(int(j / share), len(tokens) - 1)
        rows.append(tokens[k] if layout == "repeat" or j == int(k * share) else filler)
    return rows


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from modeling.asr_target.speech import synthesize
    from modeling.smol_audio.dataset import items
    from modeling.smol_audio.hearing import PromptVocab
    from modeling.smol_audio.teacher import text_turns
    from modeling.targets.qwen2_audio import Qwen2AudioFamily
    from pipeline.data.records import Part, Turn
    from pipeline.data.template import ChatTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="work/smol-audio-target")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--layout", choices=("once", "repeat"), default="once")
    parser.add_argument("--rank", type=int, default=0, help="0: the exact embeddings")
    parser.add_argument("--out", default="benchmarks/results/smol_reading_probe.json")
    args = parser.parse_args(argv)

    torch.set_num_threads(2)
    proc = AutoProcessor.from_pretrained(args.target)
    tok = proc.tokenizer
    chat = ChatTokenizer(tok, Qwen2AudioFamily)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(args.target, dtype=torch.float32).eval()
    table = model.model.get_input_embeddings().weight.detach().clone()
    filler = tok(" ", add_special_tokens=False).input_ids[0]
    used = PromptVocab(tok).llm_ids + [filler]
    relative_error = 0.0
    if args.rank:
        x = table[used]
        mean = x.mean(0)
        basis = torch.linalg.svd(x - mean, full_matrices=False).Vh[: args.rank]
        table[used] = mean + (x - mean) @ basis.T @ basis
        relative_error = float(((table[used] - x) ** 2).sum(-1).mean() / (x**2).sum(-1).mean())
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    counts = {"on_topic": 0, "first_token_equal": 0, "first16_equal": 0}
    examples = []
    for _, prompt, voice, wpm in items("eval", args.prompts, seed=0):
        frames = Qwen2AudioFamily.num_audio_tokens(len(synthesize(prompt.text, voice, wpm)))
        rows = _rows(args.layout, tok(prompt.text, add_special_tokens=False).input_ids, frames, filler)
        ids = torch.tensor(chat.encode([Turn("user", [Part("audio", audio=Path("clip.flac"))])], until_turn=1,
                                       audio_token_counts=[frames]).input_ids)[None]
        written = torch.tensor(chat.encode(text_turns(prompt.text), until_turn=1).input_ids)[None]
        with torch.no_grad():
            emb = model.model.get_input_embeddings()(ids)
            emb = emb.masked_scatter((ids == model.config.audio_token_id)[..., None], table[torch.tensor(rows)])
            heard, read = _greedy(model, emb, end_id), _greedy(model, model.model.get_input_embeddings()(written), end_id)
        topic = re.sub(r"[^a-z ]", "", prompt.text.lower()).split()[-1]
        counts["on_topic"] += topic[:5] in tok.decode(heard).lower()
        counts["first_token_equal"] += heard[:1] == read[:1]
        counts["first16_equal"] += heard == read
        examples.append({"prompt": prompt.text, "audio_rows": frames, "answer": tok.decode(heard),
                         "text_answer": tok.decode(read)})
        print(f"{prompt.text!r}: {tok.decode(heard)[:70]!r} | as text: {tok.decode(read)[:50]!r}")
    entry = {"layout": args.layout, "rank": args.rank, "relative_error": round(relative_error, 4),
             "prompts": args.prompts, **counts, "examples": examples}
    print(json.dumps({k: v for k, v in entry.items() if k != "examples"}))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results[f"{args.layout}-rank{args.rank}"] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
