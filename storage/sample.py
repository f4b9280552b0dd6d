"""One captured sample: what stage 2 takes from the frozen target for one conversation.

No padding is ever stored: every tensor holds exactly the sample's own rows. ``last_hidden``
covers only ``last_hidden_positions`` (positions whose next token is a loss token, ~25% of a
chat sample), and ``audio_embeds`` only the audio token spans.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from storage.array_encoding import HIDDEN_ARRAYS, ArraySpec, hidden_to_bits, nonfinite_mask, quantize_fp8

HIDDEN_DTYPES = (torch.bfloat16, torch.float16)


class SampleError(ValueError):
    """A captured sample is malformed or holds NaN/Inf; the message names sample and tensor."""


@dataclasses.dataclass
class CapturedSample:
    """Target activations for one sample (CPU torch tensors).

    ``S`` tokens, ``L`` aux layers, hidden size ``H``; ``meta`` holds small JSON-able extras.
    """

    id: str
    source_hash: str
    input_ids: torch.Tensor  # [S] integer token ids
    loss_mask: torch.Tensor  # [S] 0/1
    aux_hidden: torch.Tensor  # [S, L, H] bf16 residual-stream states at the aux layers
    last_hidden: torch.Tensor  # [n_last, H] bf16 final post-norm states at the positions below
    last_hidden_positions: torch.Tensor  # [n_last] strictly increasing positions in [0, S)
    audio_embeds: torch.Tensor  # [n_audio, H] bf16 embeddings the LLM consumes at audio tokens
    audio_spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # [start, end)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def hidden_size(self) -> int:
        return int(self.aux_hidden.shape[-1])

    def problems(self, *, hidden_size: int | None = None, num_aux_layers: int | None = None,
                 check_finite: bool = True) -> list[str]:
        """Every way this sample is malformed (empty list = valid)."""
        out = self._shape_problems(hidden_size, num_aux_layers)
        if not out and check_finite:
            out += self._finite_problems()
        return out

    def validate(self, *, hidden_size: int | None = None, num_aux_layers: int | None = None,
                 check_finite: bool = True) -> None:
        """Raise :class:`SampleError` naming the sample and each bad tensor."""
        found = self.problems(hidden_size=hidden_size, num_aux_layers=num_aux_layers,
                              check_finite=check_finite)
        if found:
            raise SampleError(f"sample {self.id!r}: " + "; ".join(found))

    def _shape_problems(self, hidden_size: int | None, num_aux_layers: int | None) -> list[str]:
        out: list[str] = []
        if not isinstance(self.id, str) or not self.id:
            out.append(f"id must be a non-empty str, got {self.id!r}")
        if not isinstance(self.source_hash, str):
            out.append(f"source_hash must be a str, got {type(self.source_hash).__name__}")
        s = self.num_tokens
        if self.input_ids.ndim != 1 or s == 0 or self.input_ids.is_floating_point():
            out.append(f"input_ids must be a non-empty 1-D integer tensor, got {_desc(self.input_ids)}")
        if tuple(self.loss_mask.shape) != (s,):
            out.append(f"loss_mask must be [{s}], got {_desc(self.loss_mask)}")
        elif bool(((self.loss_mask != 0) & (self.loss_mask != 1)).any()):
            out.append("loss_mask must hold only 0/1")
        h = hidden_size or self.hidden_size
        a = self.aux_hidden
        if a.ndim != 3 or a.shape[0] != s or a.shape[2] != h or (num_aux_layers and a.shape[1] != num_aux_layers):
            out.append(f"aux_hidden must be [{s}, {num_aux_layers or 'L'}, {h}], got {_desc(a)}")
        for name in ("aux_hidden", "last_hidden", "audio_embeds"):
            t = getattr(self, name)
            if t.dtype not in HIDDEN_DTYPES:
                out.append(f"{name} must be bfloat16 or float16, got {t.dtype}")
        pos = self.last_hidden_positions
        n_last = int(pos.shape[0]) if pos.ndim == 1 else -1
        if n_last < 0 or pos.is_floating_point():
            out.append(f"last_hidden_positions must be a 1-D integer tensor, got {_desc(pos)}")
        elif n_last and (int(pos[0]) < 0 or int(pos[-1]) >= s or bool((pos[1:] <= pos[:-1]).any())):
            out.append(f"last_hidden_positions must be strictly increasing within [0, {s})")
        if tuple(self.last_hidden.shape) != (max(n_last, 0), h):
            out.append(f"last_hidden must be [{n_last}, {h}], got {_desc(self.last_hidden)}")
        out += self._span_problems(s, h)
        return out

    def _span_problems(self, s: int, h: int) -> list[str]:
        prev_end, n_audio = 0, 0
        for span in self.audio_spans:
            if len(span) != 2 or not (prev_end <= span[0] < span[1] <= s):
                return [f"audio_spans must be sorted, non-overlapping, non-empty [start, end) within "
                        f"[0, {s}), got {self.audio_spans}"]
            prev_end = span[1]
            n_audio += span[1] - span[0]
        if tuple(self.audio_embeds.shape) != (n_audio, h):
            return [f"audio_embeds must be [{n_audio} (sum of span lengths), {h}], got {_desc(self.audio_embeds)}"]
        return []

    def _finite_problems(self) -> list[str]:
        out = []
        for name in ("aux_hidden", "last_hidden", "audio_embeds"):
            t = getattr(self, name)
            bad = nonfinite_mask(hidden_to_bits(t), t.dtype)
            if bad is not None:
                first = [int(i) for i in np.argwhere(bad)[0]]
                out.append(f"{name} holds {int(np.count_nonzero(bad))} NaN/Inf values (first at {first})")
        return out


def _desc(t: torch.Tensor) -> str:
    return f"{list(t.shape)} {t.dtype}"


def encode_sample(sample: CapturedSample, specs: dict[str, ArraySpec]) -> dict[str, np.ndarray]:
    """The rows a sample appends to each array (numpy, stored dtypes)."""
    out = {
        "input_ids": sample.input_ids.numpy().astype(np.int32),
        "loss_mask": sample.loss_mask.numpy().astype(np.uint8),
        "last_hidden_positions": sample.last_hidden_positions.numpy().astype(np.int32),
    }
    h = sample.hidden_size
    for name in HIDDEN_ARRAYS:
        t = getattr(sample, name)
        n_rows = int(t.shape[0])
        spec = specs[name]
        if spec.encoding == "fp8":
            q, scale = quantize_fp8(t.reshape(-1, h))
            out[name] = q.reshape(n_rows, spec.width).numpy()
            out[spec.scale or ""] = scale.reshape(n_rows, spec.width // h).numpy()
        else:
            out[name] = hidden_to_bits(t.reshape(n_rows, spec.width))
    return out
