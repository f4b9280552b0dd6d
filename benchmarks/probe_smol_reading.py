"""Can the frozen SmolLM2 read a prompt placed in its audio slot as the words' own embeddings?

    python -m benchmarks.probe_smol_reading --target work/smol-audio-target [--prompts 12 --layout once --rank 0]
    python -m benchmarks.probe_smol_reading --layout once --learn-filler 150   # a trained gap row

An upper bound for what an encoder trained toward the LLM's embeddings (``modeling.smol_audio.train``'s
align phase) can give: each held-out prompt's audio rows (as many as its clip would have) are filled
with the embeddings of the prompt's tokens:

- ``once``: each token at the first row of its even share, the filler elsewhere: what a CTC path
  (one spike a token, blanks between) aligned to embeddings looks like;
- ``repeat``: each token over its whole share;
- ``packed``: the tokens in the first rows, one each, the filler after them (the words contiguous, as in
  the text prompt: an encoder would have to count and gather the spoken words to write this);
- ``encoder``: no upper bound but the real thing: the rows the target's encoder writes for the clip
  (``--checkpoint`` loads a training checkpoint's encoder, projector and boundary rows first:
  ``modeling.smol_audio.train``'s ``resume.pt``), with ``token_readback``: the share of the prompt's
  tokens that the clip's first rows, each read as its nearest prompt-token embedding, spell (1.0 for
  an encoder that writes ``packed``), and ``spelled_in_runs``: the clips whose rows, read so with each
  run of equal rows once, spell the prompt (an encoder that writes ``repeat``). ``--snap nearest``
  replaces each row by that nearest embedding (the encoder's timing, no residual error); ``--snap even``
  also spreads those tokens evenly over the rows (neither error nor timing: what is left is hearing).

The rows a clip gets follow the target's mel framing (``--target``'s feature extractor): 25 a second at
Whisper's hop, 8.3 at the coarser one (``python -m modeling.smol_audio.build --mel-hop-samples 480``).

``--rank R`` first projects the prompt tokens' embeddings onto their top R principal directions: the
error a projector of rank R (the encoder's width) cannot avoid. The filler is ``--filler-row``: the
``" "`` token's row, zeros or the vocabulary's mean row. ``--learn-filler N`` trains the filler and
the ``<|audio_bos|>``/``<|audio_eos|>`` rows from there for N Adam steps (batch 8, lr 3e-3) through
the frozen LLM on the teacher's answers (first 24 tokens) to ``--train-prompts`` spoken
``target``-split prompts in the same layout: can one learned gap row make the LLM skip the gaps?
The LLM answers greedily (transformers, fp32, 16 tokens), read as text it answers the same prompt;
printed per prompt, with how many answers name the prompt's topic, start with the same
token, and equal the text answer in all 16 tokens. Written to ``--out`` (default
``benchmarks/results/smol_reading_probe.json``, one entry per layout, rank and filler, merged).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

import torch

from pipeline.data.records import Part, Turn

FILLER = -1  # a row slot that takes the filler vector


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


def _rows(layout: str, tokens: list[int], frames: int) -> list[int]:
    """The token id each audio row holds, ``FILLER`` where it holds the filler."""
    if layout == "packed":
        return tokens[:frames] + [FILLER] * (frames - len(tokens))
    share = frames / len(tokens)
    rows = []
    for j in range(frames):
        k = min(int(j / share), len(tokens) - 1)
        rows.append(tokens[k] if layout == "repeat" or j == int(k * share) else FILLER)
    return rows


class SlotFiller(torch.nn.Module):
    """The prompt in the audio slot: token rows from ``table``, the filler and the boundary rows as vectors
    (trainable when ``--learn-filler``)."""

    def __init__(self, model: Any, chat: Any, table: torch.Tensor, filler: torch.Tensor, boundary_ids: list[int]):
        super().__init__()
        self.model, self.chat, self.table, self.boundary_ids = model, chat, table, boundary_ids
        self.filler = torch.nn.Parameter(filler.clone())
        self.boundary = torch.nn.Parameter(model.model.get_input_embeddings().weight[boundary_ids].detach().clone())

    def embed(self, layout: str, tokens: list[int], frames: int, answer: list[int],
              encoded: torch.Tensor | None = None) -> torch.Tensor:
        ids = torch.tensor(self.chat.encode([Turn("user", [Part("audio", audio=Path("clip.flac"))])], until_turn=1,
                                            audio_token_counts=[frames]).input_ids.tolist() + answer)
        emb = self.model.model.get_input_embeddings()(ids)
        for k, token in enumerate(self.boundary_ids):
            emb = torch.where((ids == token)[:, None], self.boundary[k], emb)
        audio = encoded if encoded is not None else \
            torch.stack([self.table[t] if t != FILLER else self.filler for t in _rows(layout, tokens, frames)])
        return emb.masked_scatter((ids == self.model.config.audio_token_id)[:, None], audio)


def learn_filler(slot: SlotFiller, layout: str, examples: list[tuple[list[int], int, list[int]]], steps: int) -> list[float]:
    """Adam on the filler and boundary rows: teacher-forced cross-entropy of the answers through the LLM."""
    opt = torch.optim.Adam([slot.filler, slot.boundary], lr=3e-3)
    rng, losses = random.Random(0), []
    for step in range(steps):
        batch = rng.sample(examples, 8)
        embs = [slot.embed(layout, tokens, frames, answer) for tokens, frames, answer in batch]
        width = max(e.shape[0] for e in embs)
        x = torch.stack([torch.nn.functional.pad(e, (0, 0, 0, width - e.shape[0])) for e in embs])
        mask = torch.tensor([[1] * e.shape[0] + [0] * (width - e.shape[0]) for e in embs])
        labels = torch.full(mask.shape, -100)
        for i, (e, (_, _, answer)) in enumerate(zip(embs, batch, strict=True)):
            labels[i, e.shape[0] - len(answer): e.shape[0]] = torch.tensor(answer)
        hidden = slot.model.model.language_model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        loss = torch.nn.functional.cross_entropy(slot.model.lm_head(hidden[:, :-1]).flatten(0, 1), labels[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 25 == 0 or step + 1 == steps:
            print(f"learn-filler step {step}: loss {sum(losses[-25:]) / len(losses[-25:]):.3f}", flush=True)
    return losses


def main(argv: list[str] | None = None) -> None:
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    from modeling.asr_target.encoder import clip_features, encode_audio
    from modeling.asr_target.speech import synthesize
    from modeling.smol_audio.build import ROW_TOKENS
    from modeling.smol_audio.dataset import items
    from modeling.smol_audio.hearing import PromptVocab, nearest_prompt_tokens, runs
    from modeling.smol_audio.prompts import names_topic
    from modeling.smol_audio.teacher import text_turns
    from modeling.targets import family_of
    from pipeline.data.template import ChatTokenizer

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="work/smol-audio-target")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--layout", choices=("once", "repeat", "packed", "encoder"), default="once")
    parser.add_argument("--checkpoint", default="", help="--layout encoder: a trainer's resume.pt to load first")
    parser.add_argument("--snap", choices=("none", "nearest", "even"), default="none",
                        help="--layout encoder: replace each row by its nearest prompt token's exact embedding "
                             "(nearest), or spread those tokens, each run once, evenly over the rows (even)")
    parser.add_argument("--rank", type=int, default=0, help="0: the exact embeddings")
    parser.add_argument("--filler-row", choices=("space", "zero", "mean"), default="space",
                        help="the filler's vector: the \" \" token's row, zeros, or the mean of the vocabulary's rows")
    parser.add_argument("--learn-filler", type=int, default=0, help="Adam steps on the filler and boundary rows (0: off)")
    parser.add_argument("--train-prompts", type=int, default=400)
    parser.add_argument("--teacher", default="work/smol/teacher-target.jsonl")
    parser.add_argument("--out", default="benchmarks/results/smol_reading_probe.json")
    args = parser.parse_args(argv)
    if args.learn_filler and args.train_prompts < 8:
        parser.error(f"--train-prompts {args.train_prompts}: --learn-filler draws batches of 8 prompts")
    if args.snap != "none" and args.layout != "encoder":
        parser.error(f"--snap {args.snap}: needs --layout encoder")
    if args.checkpoint and (args.layout != "encoder" or not Path(args.checkpoint).is_file()):
        parser.error(f"--checkpoint {args.checkpoint}: needs --layout encoder and an existing file")
    if args.learn_filler and not Path(args.teacher).is_file():
        parser.error(f"--teacher {args.teacher}: no such file (python -m modeling.smol_audio.teacher writes it)")

    torch.set_num_threads(2)
    proc = AutoProcessor.from_pretrained(args.target)
    tok = proc.tokenizer
    family = family_of(args.target)  # as the target frames its audio (its mel hop)
    chat = ChatTokenizer(tok, family)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(args.target, dtype=torch.float32).eval()
    model.requires_grad_(False)
    table = model.model.get_input_embeddings().weight.detach().clone()
    filler = tok(" ", add_special_tokens=False).input_ids[0]
    vocab = PromptVocab(tok)
    used = vocab.llm_ids + [filler]
    relative_error = 0.0
    if args.rank:
        x = table[used]
        mean = x.mean(0)
        basis = torch.linalg.svd(x - mean, full_matrices=False).Vh[: args.rank]
        table[used] = mean + (x - mean) @ basis.T @ basis
        relative_error = float(((table[used] - x) ** 2).sum(-1).mean() / (x**2).sum(-1).mean())
    filler_row = {"space": table[filler], "zero": torch.zeros_like(table[filler]),
                  "mean": table[: tok.vocab_size].mean(0)}[args.filler_row]
    slot = SlotFiller(model, chat, table, filler_row, tok.convert_tokens_to_ids(list(ROW_TOKENS)))
    if args.checkpoint:
        try:
            state = torch.load(args.checkpoint, weights_only=False)
        except Exception as err:  # any unreadable file: name it and the reason
            parser.error(f"--checkpoint {args.checkpoint}: not a torch checkpoint ({type(err).__name__}: {err})")
        if not isinstance(state, dict) or not {"tower", "proj", "rows", "step"} <= state.keys():
            parser.error(f"--checkpoint {args.checkpoint}: not a modeling.smol_audio.train resume.pt "
                         "(no tower/proj/rows/step entries)")
        model.model.audio_tower.load_state_dict(state["tower"])
        model.model.multi_modal_projector.load_state_dict(state["proj"])
        slot.boundary.data.copy_(state["rows"]["rows"])
    waves: dict[str, Any] = {}

    def spoken(split: str, count: int) -> list[tuple[Any, list[int], int]]:
        out = []
        for _, p, voice, wpm in items(split, count, seed=0):
            waves[p.id] = synthesize(p.text, voice, wpm)
            out.append((p, tok(p.text, add_special_tokens=False).input_ids,
                        family.num_audio_tokens(len(waves[p.id]))))
        return out

    final_loss = None
    if args.learn_filler:
        answers = {r["id"]: r["answer_ids"][:24] for r in map(json.loads, Path(args.teacher).read_text().splitlines())}
        chosen = spoken("target", args.train_prompts)
        missing = [p.id for p, _, _ in chosen if p.id not in answers]
        if missing:
            raise SystemExit(f"{args.teacher}: no answer for {len(missing)} target prompts (e.g. {missing[:3]})")
        train = [(tokens, frames, answers[p.id]) for p, tokens, frames in chosen]
        tail = learn_filler(slot, args.layout, train, args.learn_filler)[-25:]
        final_loss = round(sum(tail) / len(tail), 3)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    counts = {"on_topic": 0, "first_token_equal": 0, "first16_equal": 0}
    examples = []
    read_right = read_total = spelled = 0
    for prompt, tokens, frames in spoken("eval", args.prompts):
        written = torch.tensor(chat.encode(text_turns(prompt.text), until_turn=1).input_ids)[None]
        with torch.no_grad():
            encoded = None
            if args.layout == "encoder":
                wave = waves[prompt.id]
                encoded = encode_audio(model, torch.from_numpy(clip_features(proc.feature_extractor, wave))[None],
                                       [len(wave)], family)
                got = nearest_prompt_tokens(encoded, vocab, table)
                read_right += sum(g == t for g, t in zip(got[: len(tokens)], tokens, strict=True))
                read_total += len(tokens)
                spelled += runs(got) == tokens
                if args.snap == "nearest":
                    encoded = table[got]
                elif args.snap == "even":
                    encoded = table[_rows("repeat", runs(got), len(got))]
            heard = _greedy(model, slot.embed(args.layout, tokens, frames, [], encoded)[None], end_id)
            read = _greedy(model, model.model.get_input_embeddings()(written), end_id)
        counts["on_topic"] += names_topic(prompt.text, tok.decode(heard))
        counts["first_token_equal"] += heard[:1] == read[:1]
        counts["first16_equal"] += heard == read
        examples.append({"prompt": prompt.text, "audio_rows": frames, "answer": tok.decode(heard),
                         "text_answer": tok.decode(read)})
        print(f"{prompt.text!r}: {tok.decode(heard)[:70]!r} | as text: {tok.decode(read)[:50]!r}")
    entry = {"layout": args.layout, "mel_hop_samples": family.hop_samples, "rank": args.rank,
             "filler_row": args.filler_row,
             "relative_error": round(relative_error, 4),
             "learn_filler_steps": args.learn_filler, "final_train_loss": final_loss,
             "prompts": args.prompts, **counts, "examples": examples}
    if args.layout == "encoder":
        entry |= {"checkpoint": args.checkpoint or None, "token_readback": round(read_right / read_total, 3),
                  "spelled_in_runs": spelled}
    print(json.dumps({k: v for k, v in entry.items() if k != "examples"}))
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    suffix = (f"-{args.filler_row}" if args.filler_row != "space" else "") + \
        (f"-learned{args.learn_filler}" if args.learn_filler else "")
    if args.snap != "none":
        suffix += f"-snap-{args.snap}"
        entry["snap"] = args.snap
    if family.hop_samples != 160:
        suffix += f"-hop{family.hop_samples}"
    if args.checkpoint:
        suffix += f"-step{state['step']}"
    results[f"{args.layout}-rank{args.rank}{suffix}"] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
