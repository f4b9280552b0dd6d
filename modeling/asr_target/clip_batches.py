"""Spoken training clips for an audio target: synthesised and featurised once (cached), then padded
into batches. Shared by the tiny ASR target's trainer and the SmolLM2 audio target's trainer."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from modeling.asr_target.encoder import clip_features
from modeling.asr_target.speech import synthesize
from pipeline.data.records import Turn
from pipeline.data.template import ChatTokenizer


@dataclass
class ClipSet:
    """Mel features of every clip (each [128, L + 2], float16 as cached: 8000 clips take 0.6 GB
    instead of 1.2; a batch casts to float32), lengths in samples, and the waveforms if asked for."""

    features: list[np.ndarray]
    num_samples: list[int]
    waves: list[np.ndarray] | None = None


def _synth(spoken: tuple[str, str, int]) -> np.ndarray:
    return synthesize(*spoken)


def load_clips(path: Path, spoken: Sequence[tuple[str, str, int]], extractor: Any, keep_waves: bool = False) -> ClipSet:
    """The clips of ``spoken`` ((text, voice, words per minute) each), synthesised (two processes) and
    featurised into the npz at ``path`` unless it is there. The features always come from that file,
    so a first run and a cached one train on the same values. ``keep_waves`` synthesises the
    waveforms again when the file is there (they are not cached)."""
    from multiprocessing import Pool

    waves = None
    if keep_waves or not path.exists():
        with Pool(2) as pool:
            waves = pool.map(_synth, list(spoken), chunksize=16)
    if not path.exists():
        feats = [clip_features(extractor, w) for w in waves]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, features=np.concatenate(feats, axis=1).astype(np.float16),
                 offsets=np.cumsum([0] + [f.shape[1] for f in feats]), num_samples=np.array([w.shape[0] for w in waves]))
        os.replace(tmp, path)
    data = np.load(path)
    offsets, features = data["offsets"], data["features"]
    if len(offsets) != len(spoken) + 1:
        raise ValueError(f"{path}: holds {len(offsets) - 1} clips, expected {len(spoken)}; delete it to rebuild")
    return ClipSet([features[:, offsets[i]:offsets[i + 1]] for i in range(len(spoken))],
                   data["num_samples"].tolist(), waves if keep_waves else None)


def make_batch(conversations: Sequence[list[Turn]], clips: ClipSet, idx: Sequence[int], chat: ChatTokenizer,
               pad_id: int) -> dict[str, Any]:
    """Right-padded ids, attention and loss masks, and left-aligned float32 mel features of clips ``idx``;
    ``conversations[b]`` is clip ``idx[b]``'s conversation (one audio part)."""
    encoded = [chat.encode(turns, audio_token_counts=[chat.num_audio_tokens(clips.num_samples[i])])
               for turns, i in zip(conversations, idx, strict=True)]
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(idx), width, dtype=torch.long)
    loss = torch.zeros(len(idx), width, dtype=torch.bool)
    for b, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[b, :n], attn[b, :n] = torch.from_numpy(e.input_ids), 1
        loss[b, :n] = torch.from_numpy(e.loss_mask.astype(bool))
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "features": padded_features(clips, idx),
            "num_samples": [clips.num_samples[i] for i in idx]}


def padded_features(clips: ClipSet, idx: Sequence[int]) -> torch.Tensor:
    """Left-aligned float32 mel features [len(idx), 128, longest] of clips ``idx`` (zeros past each clip)."""
    frames = max(clips.features[i].shape[1] for i in idx)
    feats = torch.zeros(len(idx), clips.features[idx[0]].shape[0], frames)
    for b, i in enumerate(idx):
        feats[b, :, : clips.features[i].shape[1]] = torch.from_numpy(clips.features[i].astype(np.float32))
    return feats
