"""Target families behind one interface (:class:`modeling.targets.base.TargetFamily`), chosen from the
target's ``config.json`` ``architectures``; an unsupported architecture is refused before any work.

Adding a family: one module here with a ``TargetFamily`` subclass (see ``qwen3_asr.py``), its tiny
builder beside it (``<family>_tiny.py``), one line in :data:`FAMILIES`, and its tests under
``tests/targets/<family>/``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from modeling.targets.base import TargetFamily
from pipeline.core.config import ConfigError
from pipeline.data.samples import load_target_processor
from pipeline.data.template import ChatTokenizer

# name -> (the family's "module:Class", its tiny builder's "module:function"); imported on use, so a
# family's dependencies load only when it is used
FAMILIES: dict[str, tuple[str, str]] = {
    "qwen2-audio": ("modeling.targets.qwen2_audio:Qwen2AudioFamily", "modeling.targets.qwen2_audio_tiny:ensure_tiny_target"),
    "qwen3-asr": ("modeling.targets.qwen3_asr:Qwen3ASRFamily", "modeling.targets.qwen3_asr_tiny:build_tiny"),
    "glm-asr": ("modeling.targets.glm_asr:GlmAsrFamily", "modeling.targets.glm_asr_tiny:build_tiny"),
}
# the files that decide what a target computes and how its prompts are built
IDENTITY_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "chat_template.jinja", "chat_template.json", "preprocessor_config.json", "processor_config.json")


class UnsupportedTarget(ConfigError):
    """The target's architecture is not one of the supported families."""


def _load(name: str, which: int) -> Any:
    if name not in FAMILIES:
        raise UnsupportedTarget(f"unknown target family {name!r}; supported: {sorted(FAMILIES)}")
    module, attribute = FAMILIES[name][which].split(":")
    return getattr(importlib.import_module(module), attribute)


def family_named(name: str) -> type[TargetFamily]:
    return _load(name, 0)


def tiny_builder(name: str) -> Callable[..., Path]:
    """The family's tiny random checkpoint builder: ``builder(out_dir, *, layers=..., ..., seed=...)``
    returns ``out_dir`` once a finished build with those arguments is there."""
    return _load(name, 1)


def _config(target: str | Path | dict[str, Any]) -> tuple[dict[str, Any], str]:
    if isinstance(target, dict):
        return target, "config"
    path = Path(target) / "config.json"
    if not path.is_file():
        raise UnsupportedTarget(f"{target}: no config.json (expected a model directory)")
    try:
        return json.loads(path.read_text()), str(path)
    except json.JSONDecodeError as err:
        raise UnsupportedTarget(f"{path}: not valid JSON ({err})") from None


def family_of(target: str | Path | dict[str, Any]) -> type[TargetFamily]:
    """The family serving a target directory (or its ``config.json`` dict), by ``architectures``; for a
    directory, as that checkpoint frames its audio (``TargetFamily.for_target``)."""
    config, where = _config(target)
    archs = config.get("architectures") or []
    for name in FAMILIES:
        family = family_named(name)
        if any(a in family.architectures for a in archs):
            if isinstance(target, dict):
                return family
            try:
                return family.for_target(target)
            except ValueError as err:
                raise UnsupportedTarget(str(err)) from None
    supported = sorted(a for n in FAMILIES for a in family_named(n).architectures)
    raise UnsupportedTarget(f"{where}: architectures {archs} are not supported; supported: {supported}")


def target_text_config(target: str | Path) -> dict[str, Any]:
    """The target's decoder shape (``TargetFamily.text_config``) from its directory; errors name the file."""
    config, where = _config(target)
    return family_of(config).text_config(config, where=where)


def target_identity(target: str | Path) -> dict[str, Any]:
    """What every stage records as the target's identity: path, family, architecture and one sha256
    over :data:`IDENTITY_FILES` (config, generation defaults, tokenizer, chat template, processor)."""
    path = Path(target).resolve()
    config, _ = _config(path)
    family = family_of(config)
    digest = hashlib.sha256()
    for name in IDENTITY_FILES:
        file = path / name
        if file.is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256(file.read_bytes()).digest())
    return {"path": str(path), "family": family.name, "architecture": (config.get("architectures") or ["?"])[0],
            "sha256": digest.hexdigest()}


def target_context_length(target: str | Path) -> int | None:
    """The language model's ``max_position_embeddings`` from the target's config.json, if any."""
    path = Path(target) / "config.json"
    if not path.is_file():
        return None
    config = json.loads(path.read_text())
    try:
        return int(family_of(config).text_config(config)["max_position_embeddings"])
    except (KeyError, ValueError):
        return None


def chat_tokenizer_for(target: str | Path) -> ChatTokenizer:
    """The chat tokenizer of a target directory: its tokenizer and the family its config names."""
    return ChatTokenizer(load_target_processor(target)[0], family_of(target))
