"""The Qwen2-Audio audio path on unpadded mel frames: what training runs instead of the 30 s window.

The stock encoder always takes 3000 mel frames (30 s) and masks the padding out of attention, so
for a 3 s clip 90% of its work is on padding. Outputs at the clip's own positions depend only on
mel frames ``0 .. L+1`` (L valid frames: conv1 and conv2 have kernel 3; padded keys are masked),
so running the same modules on the first ``L + 2`` frames gives the same audio embeddings. Training
the tiny ASR target this way is ~10x cheaper; ``tests/pipeline/test_asr_target.py`` checks the
result against the stock 3000-frame forward, which is what transformers and vLLM run at inference.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from modeling.targets.qwen2_audio import Qwen2AudioFamily, num_mel_frames

EXTRA_FRAMES = 2  # frames past the last valid one that still reach a valid output (conv receptive field)


def clip_features(extractor: Any, wave: np.ndarray) -> np.ndarray:
    """Mel features [128, L + 2] of one clip, equal to the first L + 2 frames of the 3000-frame window
    (the extractor's normalisation uses the clip's maximum, which the window's padding cannot change)."""
    hop = extractor.hop_length
    frames = num_mel_frames(wave.shape[0], hop) + EXTRA_FRAMES
    out = extractor(wave, sampling_rate=16_000, padding="max_length", max_length=(frames + 1) * hop + extractor.n_fft,
                    return_tensors="np")
    return out["input_features"][0, :, :frames].astype(np.float32)


def encode_audio(model: Any, feats: torch.Tensor, num_samples: list[int],
                 family: type[Qwen2AudioFamily] = Qwen2AudioFamily) -> torch.Tensor:
    """Projected audio embeddings of a batch of clips: [sum of audio tokens, hidden], clip by clip.

    ``feats`` [N, 128, T] holds each clip's :func:`clip_features` left-aligned (any values past them);
    ``num_samples`` the clips' lengths in samples; ``family`` as the checkpoint frames its audio
    (``Qwen2AudioFamily.for_target``). Mirrors ``Qwen2AudioModel.get_audio_features``.
    """
    from transformers.masking_utils import create_bidirectional_mask

    tower = model.model.audio_tower
    x = nn.functional.gelu(tower.conv1(feats.to(tower.conv1.weight.dtype)))
    x = nn.functional.gelu(tower.conv2(x)).permute(0, 2, 1)
    x = x + tower.embed_positions.weight[: x.shape[1]]
    valid = torch.tensor([(family.num_mel_frames(n) - 1) // 2 + 1 for n in num_samples], device=x.device)
    mask_2d = (torch.arange(x.shape[1], device=x.device)[None] < valid[:, None]).long()
    mask = create_bidirectional_mask(config=tower.config, inputs_embeds=x[..., :1], attention_mask=mask_2d)
    for layer in tower.layers:
        x = layer(x, mask)
        x = x[0] if isinstance(x, tuple) else x
    x = tower.avg_pooler(x.permute(0, 2, 1)).permute(0, 2, 1)
    keep = torch.arange(x.shape[1], device=x.device)[None] < torch.tensor(
        [family.num_audio_tokens(n) for n in num_samples], device=x.device)[:, None]
    # one boolean index (row-major: clip by clip), not a slice per clip: each slice's backward
    # would allocate and zero a whole [N, T, H] gradient (1.4 s of a 7 s step at batch 32)
    return model.model.multi_modal_projector(tower.layer_norm(x[keep]))
