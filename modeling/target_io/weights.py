"""Read single frozen tensors (embedding table, lm_head, final norm) from a target checkpoint.

A 7B target is ~16 GB of safetensors; the draft needs only two 156032 x 4096 tables
(1.3 GB each in bf16). ``safe_open(...).get_tensor`` reads one tensor from the memory-mapped
shard, so nothing else is loaded. Sharded checkpoints are resolved through
``model.safetensors.index.json``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open

# First name is the Hub/vLLM layout; transformers 5.19 ``save_pretrained`` of
# Qwen2AudioForConditionalGeneration writes the doubled ``model.model`` form; the last
# ones cover plain causal-LM targets.
EMBED_NAMES: tuple[str, ...] = (
    "language_model.model.embed_tokens.weight",
    "language_model.model.model.embed_tokens.weight",
    "model.language_model.embed_tokens.weight",
    "model.embed_tokens.weight",
)
LM_HEAD_NAMES: tuple[str, ...] = (
    "language_model.lm_head.weight",
    "lm_head.weight",
)


def _weight_files(checkpoint_dir: Path) -> dict[str, Path]:
    """Map tensor name -> file for a single-file or sharded checkpoint (lazy for single)."""
    index = checkpoint_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: checkpoint_dir / fname for name, fname in weight_map.items()}
    single = checkpoint_dir / "model.safetensors"
    if not single.is_file():
        raise FileNotFoundError(f"{checkpoint_dir} has neither model.safetensors nor "
                                "model.safetensors.index.json")
    with safe_open(str(single), framework="pt") as f:
        return {name: single for name in f.keys()}


def read_tensor(checkpoint_dir: str | Path, names: Sequence[str],
                dtype: torch.dtype | None = None) -> tuple[str, torch.Tensor]:
    """Read the first of ``names`` present in the checkpoint; returns (name, tensor)."""
    root = Path(checkpoint_dir)
    files = _weight_files(root)
    for name in names:
        if name in files:
            with safe_open(str(files[name]), framework="pt") as f:
                tensor = f.get_tensor(name)
            return name, tensor if dtype is None else tensor.to(dtype)
    raise KeyError(f"none of {list(names)} found in {root}")


def _family_keys(checkpoint_dir: Path) -> tuple[str | None, str | None, bool]:
    """(embedding key, lm_head key, tied) as the target's family names them; unknown: (None, None, False)."""
    from modeling.targets import UnsupportedTarget, family_of

    try:
        family = family_of(checkpoint_dir)
        cfg = json.loads((checkpoint_dir / "config.json").read_text())
        head = family.lm_head_key(cfg)
        return family.embedding_key(cfg), head, head is None
    except (UnsupportedTarget, OSError, ValueError, KeyError):
        # no known family: the config's own tie flag (text_config first, as vLLM reads it)
        try:
            cfg = json.loads((checkpoint_dir / "config.json").read_text())
        except (OSError, ValueError):
            return None, None, False
        text = cfg.get("text_config") or {}
        return None, None, bool(text.get("tie_word_embeddings", cfg.get("tie_word_embeddings", False)))


def read_target_embedding(checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The target LM's input embedding table [vocab, Ht]."""
    key, _, _ = _family_keys(Path(checkpoint_dir))
    return read_tensor(checkpoint_dir, ((key,) if key else ()) + EMBED_NAMES, dtype)[1]


def read_target_lm_head(checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The target's output head [vocab, Ht] (the embedding table when the family says it is tied)."""
    root = Path(checkpoint_dir)
    _, key, tied = _family_keys(root)
    try:
        return read_tensor(root, ((key,) if key else ()) + LM_HEAD_NAMES, dtype)[1]
    except KeyError:
        if tied:
            return read_target_embedding(root, dtype)
        raise


def read_target_final_norm(checkpoint_dir: str | Path, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The target LM's final RMSNorm weight [Ht]: it sits beside the embedding table in every layout
    (``<prefix>.embed_tokens.weight`` -> ``<prefix>.norm.weight``)."""
    key, _, _ = _family_keys(Path(checkpoint_dir))
    names = tuple(n.replace("embed_tokens.weight", "norm.weight") for n in ((key,) if key else ()) + EMBED_NAMES)
    return read_tensor(checkpoint_dir, names, dtype)[1]
