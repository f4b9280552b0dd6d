"""Synthetic hidden states with the statistics that matter for compression and quantization.

Real residual-stream states of 7B decoders (Qwen2, Llama) are not i.i.d. normal, and the
difference changes both compressed size and fp8 error:

- the bulk is roughly normal, but its scale grows with depth (std ~0.1 early, ~1-4 late) and
  differs per channel (log-normal spread, sigma ~0.5) with small per-channel offsets;
- a handful of fixed "outlier" channels (~6 of 4096) sit at 20-100x the bulk std with a fixed
  sign; they set each row's fp8 scale and so squeeze the bulk's dynamic range;
- "massive activations": the first token (and a few delimiter tokens) carry values of ~1000s in
  two or three channels;
- token norms vary (log-normal, sigma ~0.3).

The final post-norm state is RMS-normalised and multiplied by a per-channel gain, which
re-creates outlier channels. Audio embeddings (projector output) are close to normal with
per-channel scales and no massive tokens.
"""

from __future__ import annotations

import dataclasses

import torch

from storage.sample import CapturedSample


@dataclasses.dataclass
class SynthTarget:
    """Fixed per-model statistics (channel scales, outliers) shared by every sample."""

    hidden_size: int
    num_aux_layers: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(self.seed)
        h, n_layers = self.hidden_size, self.num_aux_layers
        self.layer_std = torch.tensor([0.15, 0.8, 3.0][:n_layers] + [3.0] * max(0, n_layers - 3))
        self.chan_scale = torch.exp(0.5 * torch.randn(n_layers, h, generator=g))
        self.chan_offset = 0.1 * torch.randn(n_layers, h, generator=g)
        n_out = max(2, h * 6 // 4096)
        self.outlier_idx = torch.randperm(h, generator=g)[:n_out]
        sign = torch.where(torch.rand(n_out, generator=g) < 0.5, -1.0, 1.0)
        self.outlier_mag = sign * (20 + 80 * torch.rand(n_out, generator=g))
        self.massive_idx = self.outlier_idx[:2]
        self.final_gain = torch.exp(0.3 * torch.randn(h, generator=g)) * 1.5
        self.final_gain[self.outlier_idx] *= 8.0
        self.audio_scale = torch.exp(0.3 * torch.randn(h, generator=g)) * 0.5

    def residual(self, n_tokens: int, g: torch.Generator) -> torch.Tensor:
        """[n_tokens, L, H] float32 residual-stream states."""
        n_layers, h = self.num_aux_layers, self.hidden_size
        x = torch.randn(n_tokens, n_layers, h, generator=g) * self.chan_scale + self.chan_offset
        x[:, :, self.outlier_idx] = self.outlier_mag * (1 + 0.1 * torch.randn(n_tokens, n_layers, len(self.outlier_idx), generator=g))
        x = x * self.layer_std[:, None]
        x = x * torch.exp(0.3 * torch.randn(n_tokens, 1, 1, generator=g))
        # massive activations on the first token and ~1% of "delimiter" tokens
        massive = torch.rand(n_tokens, generator=g) < 0.01
        massive[0] = True
        rows = massive.nonzero().flatten()
        x[rows[:, None], 1:, self.massive_idx] = 1500.0
        return x

    def final(self, n_tokens: int, g: torch.Generator) -> torch.Tensor:
        """[n_tokens, H] post-norm final hidden states."""
        x = self.residual(n_tokens, g)[:, -1]
        x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
        return x * self.final_gain

    def audio(self, n_tokens: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n_tokens, self.hidden_size, generator=g) * self.audio_scale


def make_conversation(target: SynthTarget, index: int, n_tokens: int, *, loss_frac: float = 0.25,
                      audio_frac: float = 0.3) -> tuple[CapturedSample, torch.Tensor]:
    """One conversation (an audio span near the start, loss tokens at the end) and the final
    hidden state at *every* position ([S, H] bf16, what SpecForge stores)."""
    g = torch.Generator().manual_seed(1000 + index)
    bf16 = torch.bfloat16
    n_loss = max(1, int(n_tokens * loss_frac))
    loss_mask = torch.zeros(n_tokens, dtype=torch.uint8)
    loss_mask[n_tokens - n_loss:] = 1
    # last_hidden is kept where the *next* token is a loss token
    next_is_loss = torch.zeros(n_tokens, dtype=torch.bool)
    next_is_loss[:-1] = loss_mask[1:].bool()
    positions = next_is_loss.nonzero().flatten()
    final = target.final(n_tokens, g).to(bf16)
    n_audio = int(n_tokens * audio_frac)
    spans = [(5, 5 + n_audio)] if n_audio and 5 + n_audio <= n_tokens - n_loss else []
    n_audio = sum(e - s for s, e in spans)
    sample = CapturedSample(
        id=f"sample-{index:06d}",
        source_hash=f"{index:016x}",
        input_ids=torch.randint(0, 151_000, (n_tokens,), generator=g, dtype=torch.int64),
        loss_mask=loss_mask,
        aux_hidden=target.residual(n_tokens, g).to(bf16),
        last_hidden=final[positions].clone(),
        last_hidden_positions=positions,
        audio_embeds=target.audio(n_audio, g).to(bf16),
        audio_spans=spans,
        meta={"turns": 2, "synthetic": True},
    )
    return sample, final


def sample_lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(lo, hi + 1, (n,), generator=g).tolist()
