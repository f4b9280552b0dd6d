"""The draft vocabulary: the most frequent supervised target tokens.

A 32k draft head instead of Qwen2-Audio's 156k cuts the draft's largest matmul ~5x; the
draft can then never propose a token outside the set, which is why the set is chosen by
frequency among the tokens the draft is trained to predict (``loss_mask == 1``).
Mapping (EAGLE-3 / vLLM convention): ``target_id = draft_id + d2t[draft_id]`` and
``t2d[target_id]`` is True for the ids in the draft vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass(frozen=True)
class VocabMapping:
    """Draft <-> target token id mapping."""

    d2t: torch.Tensor
    """int64 [draft_vocab]: offsets, ``target_id = i + d2t[i]``."""
    t2d: torch.Tensor
    """bool [vocab]: True where a target id belongs to the draft vocab."""

    @property
    def draft_ids(self) -> torch.Tensor:
        """Target ids of the draft vocab, ascending."""
        return torch.arange(self.d2t.numel()) + self.d2t

    def validate(self) -> None:
        """Raise ``ValueError`` if d2t and t2d disagree (e.g. a corrupted file)."""
        ids = self.draft_ids
        if self.d2t.dtype != torch.long or self.t2d.dtype != torch.bool:
            raise ValueError(f"expected int64 d2t and bool t2d, got {self.d2t.dtype}/{self.t2d.dtype}")
        if int(self.t2d.sum()) != ids.numel():
            raise ValueError(f"t2d marks {int(self.t2d.sum())} ids but d2t has {ids.numel()}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.t2d.numel()
                            or not bool(self.t2d[ids].all()) or not bool((ids[1:] > ids[:-1]).all())):
            raise ValueError("d2t does not list the ids marked in t2d in ascending order")

    def save(self, path: str | Path) -> None:
        """Write ``d2t`` and ``t2d`` to a small safetensors file."""
        save_file({"d2t": self.d2t.contiguous(), "t2d": self.t2d.contiguous()}, str(path))

    @classmethod
    def load(cls, path: str | Path) -> VocabMapping:
        """Read and validate a file written by ``save``."""
        tensors = load_file(str(path))
        mapping = cls(d2t=tensors["d2t"], t2d=tensors["t2d"])
        mapping.validate()
        return mapping


def count_supervised_tokens(input_ids: torch.Tensor, loss_mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int64 [vocab] counts of ``input_ids`` where ``loss_mask == 1`` (any matching shapes)."""
    ids = input_ids.reshape(-1)[loss_mask.reshape(-1).bool()].long()
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"token ids outside [0, {vocab_size}) under the loss mask")
    return torch.bincount(ids, minlength=vocab_size)


def build_draft_vocab(counts: torch.Tensor, draft_vocab_size: int) -> VocabMapping:
    """Pick the ``draft_vocab_size`` most frequent ids of ``counts`` [vocab].

    Ties go to the lower id; with too few distinct tokens the set is padded with the lowest
    unused ids (frequency 0). The chosen ids are sorted ascending.
    """
    vocab = counts.numel()
    if draft_vocab_size <= 0:
        raise ValueError(f"draft_vocab_size must be positive, got {draft_vocab_size}")
    if draft_vocab_size >= vocab:
        raise ValueError(f"draft_vocab_size ({draft_vocab_size}) must be smaller than the target vocab "
                         f"({vocab}); for a full-vocab draft skip the mapping (vLLM then loads no d2t)")
    if counts.dtype.is_floating_point or bool((counts < 0).any()):
        raise ValueError("counts must be non-negative integers")
    if int(counts.sum()) == 0:
        raise ValueError("all token counts are zero: no tokens under loss_mask == 1 to build a vocab from")
    # Stable sort on -count keeps ascending ids among equal counts (incl. the zero padding).
    order = torch.sort(-counts.long(), stable=True).indices
    chosen = torch.sort(order[:draft_vocab_size]).values
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[chosen] = True
    return VocabMapping(d2t=chosen - torch.arange(draft_vocab_size), t2d=t2d)
