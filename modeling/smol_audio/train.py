"""Teach SmolLM2 to listen: train the audio encoder, projector and audio-token rows; the LLM stays frozen.

    python -m modeling.smol_audio.train --target work/smol-audio-target --teacher work/smol/teacher-target.jsonl \\
        [--renditions 2 --ctc-steps 150 --steps 600 --batch-size 8 --seed 0]

Data: each ``target``-split prompt (:mod:`modeling.smol_audio.prompts`) spoken by espeak-ng in
``--renditions`` voices and speeds. Two tasks, drawn per sample:

| task | share | user turn | trained answer |
|---|---|---|---|
| answer | 1 - ``--transcribe-share`` | the clip alone (a spoken instruction) | the LLM's own greedy answer to the same words as text, first ``--answer-tokens`` tokens (:mod:`modeling.smol_audio.teacher`) |
| transcribe | ``--transcribe-share`` | the clip + "Transcribe the audio." | the prompt's words |

Three phases, each with its own warm-up and cosine:

| phase | steps | loss | cost a step (2 cores) |
|---|---|---|---|
| ``ctc`` | ``--ctc-steps`` | CTC on the prompt's LLM tokens from the projected audio rows (:mod:`modeling.smol_audio.hearing`) | ~0.5 s (encoder only, batch 16) |
| ``align`` | ``--align-steps`` | CTC + ``--align-weight`` x the distance of each audio row to the LLM embedding it should hold (``--align-layout``: ``spike``, the token the CTC path puts there; ``packed``, the prompt's tokens in the first rows; ``--filler``'s elsewhere; ``repeat``, each token over its spoken span) | ~0.5 s |
| ``llm`` | ``--steps`` | cross-entropy of the answer tokens through the frozen 30-layer LLM (teacher-forced) + ``--ctc-weight`` x CTC + the align loss | ~4.5 s (batch 8; ~1.7 s at 30 ms frames) |

Why the align phase: after the CTC phase the encoder heard (held-out token WER 0.11) but the LLM
phase alone, 150 steps in, had not taught the LLM to read it (answers on the wrong topic, CTC WER
rising to 0.24); rows shaped like the words' own embeddings are readable from the start, if each
token spans about two rows: the committed encoder (run 4) frames audio at 30 ms (a target built with
``--mel-hop-samples 480``, 8.3 rows a second; the hop is read from ``--target`` and written into the
result's metadata) and uses ``--align-layout repeat`` before 600 LLM steps. Every ``--eval-every`` steps
the CTC head's greedy transcripts of ``--eval-clips`` held-out clips give the encoder's WER (the
history's ``hearing_wer``) and, for ``packed``/``repeat``, the share of clips whose rows read back as
the prompt.

Training starts from the parts in ``--target`` (a build from the committed file continues that
training; a ``--trained none`` build starts from the seeded random encoder); ``training.json`` keeps
the earlier runs' records under ``previous``. The audio path runs on unpadded mel frames
(:mod:`modeling.asr_target.encoder`: the same embeddings as the stock 3000-frame window).

Resumable: a checkpoint every ``--save-every`` steps in ``--work``; a rerun continues from it with the
same batches. The result is ``--out`` (default ``tests/data/smol-audio/trained.safetensors``, bf16)
and ``training.json`` beside it (config, times, machine, loss curve).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling.asr_target.clip_batches import ClipSet, load_clips, make_batch, padded_features
from modeling.asr_target.encoder import encode_audio
from modeling.asr_target.speech import VOICES, espeak_version
from modeling.smol_audio import build, llm
from modeling.smol_audio.dataset import items
from modeling.smol_audio.hearing import (
    PromptVocab,
    TokenCTCHead,
    ctc_spikes,
    hearing_wer,
    readback,
    spoken_spans,
)
from modeling.smol_audio.prompts import TRANSCRIBE, WPM_RANGE, prompts
from modeling.targets.qwen2_audio import Qwen2AudioFamily
from pipeline.core.durable import atomic_write_text
from pipeline.data.records import Part, Turn
from pipeline.data.template import ChatTokenizer

log = logging.getLogger("smol_audio.train")


@dataclass
class TrainConfig:
    target: str = "work/smol-audio-target"
    teacher: str = "work/smol/teacher-target.jsonl"
    out: str = str(build.TRAINED_FILE)
    work: str = "work/smol/train"
    renditions: int = 4
    answer_tokens: int = 16
    transcribe_share: float = 0.3
    ctc_steps: int = 2000
    ctc_batch_size: int = 16
    align_steps: int = 1400
    align_weight: float = 1.0
    align_layout: str = "spike"
    align_ce_weight: float = 0.0
    filler: str = " "
    steps: int = 250
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 30
    ctc_weight: float = 0.2
    seed: int = 0
    eval_every: int = 100
    eval_clips: int = 64
    save_every: int = 50
    log_every: int = 10
    threads: int = 2


@dataclass
class Clip:
    prompt_id: str
    text: str
    voice: str
    wpm: int


def clips_for(renditions: int, seed: int) -> list[Clip]:
    rng = random.Random(seed)
    return [Clip(p.id, p.text, rng.choice(VOICES), rng.randint(*WPM_RANGE))
            for p in prompts("target") for _ in range(renditions)]


def load_features(work: Path, clips: list[Clip], extractor: Any) -> ClipSet:
    """Mel features and lengths of every clip, synthesised once and cached under ``work``."""
    path = work / f"clips-{len(clips)}-{clips[0].prompt_id}-{clips[-1].voice}{clips[-1].wpm}-hop{extractor.hop_length}.npz"
    return load_clips(path, [(c.text, c.voice, c.wpm) for c in clips], extractor)


def turns(clip: Clip, task: str, answer_ids: list[int]) -> list[Turn]:
    if task == "transcribe":
        return [Turn("user", [Part("audio", audio=Path("clip.flac")), Part("text", text=TRANSCRIBE)]),
                Turn("assistant", [Part("text", text=clip.text)])]
    return [Turn("user", [Part("audio", audio=Path("clip.flac"))]),
            Turn("assistant", [Part("text", text="")], token_ids=answer_ids)]


class AudioRows(torch.nn.Module):
    """The trainable embedding rows of the audio tokens, written over the frozen table's rows."""

    def __init__(self, table: torch.Tensor, ids: list[int]):
        super().__init__()
        self.ids = ids
        self.rows = torch.nn.Parameter(table[ids].clone())

    def forward(self, input_ids: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        for k, token in enumerate(self.ids):
            emb = torch.where((input_ids == token)[..., None], self.rows[k], emb)
        return emb


def batch_of(idx: list[int], tasks: list[str], clips: list[Clip], features: ClipSet, teacher: dict[str, list[int]],
             chat: ChatTokenizer, pad_id: int) -> dict[str, Any]:
    conversations = [turns(clips[i], t, teacher.get(clips[i].prompt_id, [])) for i, t in zip(idx, tasks, strict=True)]
    return {**make_batch(conversations, features, idx, chat, pad_id), "texts": [clips[i].text for i in idx]}


def encode(model: Any, features: torch.Tensor, num_samples: list[int],
           family: type[Qwen2AudioFamily]) -> tuple[torch.Tensor, list[int]]:
    return encode_audio(model, features, num_samples, family), [family.num_audio_tokens(n) for n in num_samples]


def align_targets(audio: torch.Tensor, counts: list[int], texts: list[str], ctc: TokenCTCHead, filler_id: int,
                  layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(LLM id each audio row should embed, which rows carry a word) for the clips' rows back to back.

    ``spike``: each token at the frame its CTC path starts it, the filler elsewhere. ``packed``: the
    prompt's tokens in the clip's first rows, the filler after them: the one layout the frozen LLM reads
    as the prompt at 25 rows a second (12/12 held-out answers on topic with exact embeddings, against
    3/12 for words with rows between them; ``benchmarks/probe_smol_reading.py``). ``repeat``: each token
    over its spoken span (:func:`spoken_spans`), no filler: at 8.3 rows a second (mel hop 480, about two
    rows a token) the LLM reads that as the prompt too (12/12), and it asks the encoder for no routing
    across the clip, only for what is being said where."""
    target_ids = torch.full((audio.shape[0],), filler_id, dtype=torch.long)
    word = torch.zeros(audio.shape[0], dtype=torch.bool)
    offsets = [0, *np.cumsum(counts)[:-1]]
    with torch.no_grad():
        for k, (offset, text) in enumerate(zip(offsets, texts, strict=True)):
            ids = ctc.vocab.ids_of(text)
            if len(ids) > counts[k]:
                raise ValueError(f"{text!r}: {len(ids)} tokens do not fit in {counts[k]} audio rows")
            if layout == "packed":
                frames = [int(offset) + t for t in range(len(ids))]
            elif layout == "repeat":
                logp = ctc.log_probs(audio[int(offset): int(offset) + counts[k]], [counts[k]])[0]
                spans = spoken_spans(logp, ctc.vocab.labels(text))
                target_ids[int(offset): int(offset) + counts[k]] = torch.tensor([ids[j] for j in spans])
                word[int(offset): int(offset) + counts[k]] = True
                continue
            else:
                logp = ctc.log_probs(audio[int(offset): int(offset) + counts[k]], [counts[k]])[0]
                frames = [int(offset) + t for t in ctc_spikes(logp, ctc.vocab.labels(text))]
            target_ids[frames] = torch.tensor(ids)
            word[frames] = True
    return target_ids, word


def align_loss(audio: torch.Tensor, counts: list[int], texts: list[str], ctc: TokenCTCHead, table: torch.Tensor,
               filler_id: int, row_sq_norm: float, layout: str = "spike", ce_weight: float = 0.0) -> torch.Tensor:
    """Squared distance of each audio row to the LLM embedding it should be (:func:`align_targets`),
    word rows and filler rows weighted equally; with ``ce_weight``, plus a cross-entropy that the word
    rows' nearest prompt-token embedding is the right one (a regression alone settles the topic word's
    row at the mean of the topics, read back as the commonest ones: "snake", "flower")."""
    target_ids, word = align_targets(audio, counts, texts, ctc, filler_id, layout)
    # squared distance relative to the rows' mean squared norm (1.0: as far off as an embedding is long);
    # a mean over dimensions (0.018 for SmolLM2's rows) was too small beside CTC to move the rows
    err = ((audio.float() - table[target_ids]) ** 2).sum(-1) / row_sq_norm
    loss = err[word].mean() + (err[~word].mean() if (~word).any() else 0.0)
    if ce_weight:
        choices = table[ctc.vocab.llm_ids]
        # logits: minus the squared distance in tenths of a row's squared norm (two distinct tokens'
        # rows sit ~2 apart in those units: a margin of ~20 at an exact row)
        logits = -torch.cdist(audio[word].float(), choices) ** 2 / (row_sq_norm / 10)
        labels = torch.tensor([ctc.vocab.label_of[int(t)] - 1 for t in target_ids[word]])
        loss = loss + ce_weight * torch.nn.functional.cross_entropy(logits, labels)
    return loss


def losses(model: Any, rows: AudioRows, ctc: TokenCTCHead, batch: dict[str, Any], phase: str,
           filler_id: int, row_sq_norm: float, family: type[Qwen2AudioFamily], layout: str = "spike",
           ce_weight: float = 0.0) -> dict[str, torch.Tensor]:
    audio, counts = encode(model, batch["features"], batch["num_samples"], family)
    out = {"ctc": ctc(audio, counts, batch["texts"])}
    if phase != "ctc":
        table = model.model.get_input_embeddings().weight
        out["align"] = align_loss(audio, counts, batch["texts"], ctc, table, filler_id, row_sq_norm, layout,
                                  ce_weight)
    if phase == "llm":
        ids = batch["input_ids"]
        emb = rows(ids, model.model.get_input_embeddings()(ids))
        emb = emb.masked_scatter((ids == model.config.audio_token_id)[..., None], audio.to(emb.dtype))
        hidden = model.model.language_model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state
        sel = batch["loss_mask"][:, 1:]
        logits = model.lm_head(hidden[:, :-1][sel])
        out["ce"] = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][sel])
    return out


def phase_of(step: int, cfg: TrainConfig) -> str:
    return "ctc" if step < cfg.ctc_steps else "align" if step < cfg.ctc_steps + cfg.align_steps else "llm"


def phase_span(step: int, cfg: TrainConfig) -> tuple[int, int]:
    """(first step, length) of the phase ``step`` is in."""
    return {"ctc": (0, cfg.ctc_steps), "align": (cfg.ctc_steps, cfg.align_steps),
            "llm": (cfg.ctc_steps + cfg.align_steps, cfg.steps)}[phase_of(step, cfg)]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Warm-up then cosine to 5%, restarted at each phase (each adds a loss new to the encoder)."""
    start, length = phase_span(step, cfg)
    step -= start
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, length - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def eval_batches(work: Path, count: int, extractor: Any, size: int = 16) -> list[tuple[torch.Tensor, list[int], list[str]]]:
    """Held-out (``eval`` split) clips as the benchmark draws them, in batches for :func:`hearing_wer`."""
    held = [Clip(p.id, p.text, voice, wpm) for _, p, voice, wpm in items("eval", count, seed=0)]
    clips = load_features(work, held, extractor)
    out = []
    for lo in range(0, len(held), size):
        idx = list(range(lo, min(lo + size, len(held))))
        out.append((padded_features(clips, idx), [clips.num_samples[i] for i in idx], [held[i].text for i in idx]))
    return out


def trained_parts(model: Any, rows: AudioRows) -> dict[str, torch.Tensor]:
    parts = {f"audio_tower.{k}": v for k, v in model.model.audio_tower.state_dict().items()}
    parts |= {f"multi_modal_projector.{k}": v for k, v in model.model.multi_modal_projector.state_dict().items()}
    parts[build.ROWS_KEY] = rows.rows.detach()
    return {k: v.detach().to(torch.bfloat16).contiguous() for k, v in parts.items()}


def train(cfg: TrainConfig) -> Path:
    from safetensors.torch import save_file
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    torch.set_num_threads(cfg.threads)
    start = time.monotonic()
    work = Path(cfg.work)
    processor = AutoProcessor.from_pretrained(cfg.target)
    family = Qwen2AudioFamily.for_target(cfg.target)  # the target's mel framing (its hop)
    chat = ChatTokenizer(processor.tokenizer, family)
    filler_id = processor.tokenizer(cfg.filler, add_special_tokens=False).input_ids
    if len(filler_id) != 1:  # checked before the minutes of loading and synthesis
        raise ValueError(f"--filler {cfg.filler!r} is {len(filler_id)} tokens; it must be one")
    if cfg.align_layout not in ("spike", "packed", "repeat"):
        raise ValueError(f"--align-layout {cfg.align_layout!r}: must be spike, packed or repeat")
    teacher: dict[str, list[int]] = {}
    if cfg.steps and cfg.teacher == "none":
        raise ValueError("--teacher none: the LLM phase (--steps > 0) trains on the teacher's answers")
    for line in ([] if cfg.teacher == "none" else Path(cfg.teacher).read_text().splitlines()):
        row = json.loads(line)
        ids = row["answer_ids"][: cfg.answer_tokens]
        # an id past SmolLM2's vocabulary is an audio token the untrained build's zero head rows won at a
        # step where every real logit was negative (6 of 1,586 teacher answers): cut the answer there
        cut = next((i for i, t in enumerate(ids) if t >= llm.LLM_VOCAB), len(ids))
        teacher[row["id"]] = ids[:cut]
    clips = clips_for(cfg.renditions, cfg.seed)
    missing = {c.prompt_id for c in clips} - set(teacher)
    if missing and cfg.teacher != "none":
        raise ValueError(f"{cfg.teacher}: no teacher answer for {len(missing)} target prompts (e.g. {sorted(missing)[:3]})")
    features = load_features(work, clips, processor.feature_extractor)
    lengths = features.num_samples
    log.info("data: %d clips, %.1f h of speech (%.0f s)", len(clips), sum(lengths) / 16000 / 3600,
             time.monotonic() - start)
    model = Qwen2AudioForConditionalGeneration.from_pretrained(cfg.target, dtype=torch.float32)
    model.requires_grad_(False)
    trainable = [model.model.audio_tower, model.model.multi_modal_projector]
    for module in trainable:
        module.requires_grad_(True)
        module.train()
    model.model.audio_tower.embed_positions.requires_grad_(False)  # sinusoidal, fixed as in Whisper
    rows = AudioRows(model.model.get_input_embeddings().weight.detach(),
                     processor.tokenizer.convert_tokens_to_ids(list(build.ROW_TOKENS)))
    ctc = TokenCTCHead(model.config.text_config.hidden_size, PromptVocab(processor.tokenizer))
    held_out = eval_batches(work, cfg.eval_clips, processor.feature_extractor)
    previous = json.loads(Path(cfg.out).with_name("training.json").read_text()) \
        if Path(cfg.out).with_name("training.json").is_file() else None
    params = [p for m in (*trainable, rows, ctc) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.01)
    order = random.Random(cfg.seed)
    total = cfg.ctc_steps + cfg.align_steps + cfg.steps
    table = model.model.get_input_embeddings().weight
    row_sq_norm = float((table[: processor.tokenizer.vocab_size] ** 2).sum(-1).mean())  # 10.6 for SmolLM2
    history: list[dict[str, Any]] = []
    ckpt, first = work / "resume.pt", 0
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        for module, key in ((model.model.audio_tower, "tower"), (model.model.multi_modal_projector, "proj"),
                            (rows, "rows"), (ctc, "ctc"), (opt, "opt")):
            module.load_state_dict(state[key])
        order.setstate(state["order"])
        history, first, previous = state["history"], state["step"], state["previous"]
        log.info("resumed at step %d", first)
    window: dict[str, list[float]] = {}
    tick = time.monotonic()
    for step in range(first, total):
        phase = phase_of(step, cfg)
        with_llm = phase == "llm"
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = order.sample(range(len(clips)), cfg.batch_size if with_llm else cfg.ctc_batch_size)
        # without a teacher (encoder-only phases) every sample is a transcription: its ids go unused
        tasks = ["transcribe" if order.random() < cfg.transcribe_share or not teacher else "answer" for _ in idx]
        batch = batch_of(idx, tasks, clips, features, teacher, chat, processor.tokenizer.pad_token_id)
        parts = losses(model, rows, ctc, batch, phase, filler_id[0], row_sq_norm, family, cfg.align_layout,
                       cfg.align_ce_weight)
        loss = (parts.get("ce", 0.0) + (cfg.ctc_weight if with_llm else 1.0) * parts["ctc"]
                + cfg.align_weight * parts.get("align", 0.0))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        for k, v in parts.items():
            window.setdefault(k, []).append(float(v.detach()))
        if (step + 1) % cfg.log_every == 0:
            entry = {"step": step + 1, **{k: round(float(np.mean(v)), 4) for k, v in window.items()},
                     "s_per_step": round((time.monotonic() - tick) / cfg.log_every, 2),
                     "elapsed_s": round(time.monotonic() - start)}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == total:
                for module in (*trainable, ctc):
                    module.eval()
                entry["hearing_wer"] = round(hearing_wer(lambda f, n: encode(model, f, n, family), ctc, held_out), 4)
                if cfg.align_layout in ("packed", "repeat"):
                    entry[f"{cfg.align_layout}_readback"] = round(readback(
                        lambda f, n: encode(model, f, n, family), ctc.vocab, table.detach(), held_out,
                        cfg.align_layout), 4)
                for module in (*trainable, ctc):
                    module.train()
            history.append(entry)
            log.info("%s", entry)
            window, tick = {}, time.monotonic()
        if (step + 1) % cfg.save_every == 0 or step + 1 == total:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"tower": model.model.audio_tower.state_dict(), "proj": model.model.multi_modal_projector.state_dict(),
                        "rows": rows.state_dict(), "ctc": ctc.state_dict(), "opt": opt.state_dict(),
                        "order": order.getstate(), "history": history, "step": step + 1, "previous": previous}, tmp)
            os.replace(tmp, ckpt)
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    save_file(trained_parts(model, rows), str(tmp),
              metadata={"format": "pt", build.MEL_HOP_KEY: str(processor.feature_extractor.hop_length)})
    os.replace(tmp, out)
    info = {"config": asdict(cfg), "gguf_sha256": llm.GGUF_SHA256, "espeak": espeak_version(),
            "clips": len(clips), "speech_hours": round(sum(lengths) / 16000 / 3600, 2),
            "trained_parameters": sum(p.numel() for m in (*trainable, rows) for p in m.parameters() if p.requires_grad),
            "machine": {"cpu": platform.processor() or platform.machine(), "threads": cfg.threads},
            "history": history, "previous": previous}
    atomic_write_text(out.with_name("training.json"), json.dumps(info, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    print(train(TrainConfig(**vars(parser.parse_args(argv)))))


if __name__ == "__main__":
    main()
