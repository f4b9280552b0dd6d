"""What a target family is to the pipeline: one class per family, every member below.

The store, the trainer, the TTT loss and export never name a family; everything that differs
between audio LLMs is here. A family class is stateless (its members are static or class-level),
so the class itself is the adapter.

| member | used by | what it answers |
|---|---|---|
| ``name``, ``architectures`` | registry | which ``config.json`` ``architectures`` it serves |
| ``config_class``, ``nested_config``, ``required_text_fields`` | ``text_config`` | which transformers config class reads ``config.json`` |
| ``text_config(config, where)`` | dump, train, export | the decoder's shape (layers, hidden, heads, head_dim, vocab, tie, rope), read by :mod:`modeling.targets.text_config` |
| ``special_tokens``, ``end_tokens`` | chat tokenizer | the audio placeholder, the token that closes an answer, stop tokens |
| ``render_segments(turns, ...)`` | chat tokenizer, server mode | the chat template as text/audio/answer segments |
| ``num_audio_tokens(n)`` | stage 1-2, benchmark | placeholders the encoder emits for ``n`` samples at 16 kHz |
| ``audio_inputs(fe, waves)`` | capture, tie check | the HF forward's audio keyword arguments |
| ``min_audio_tokens``, ``max_audio_seconds`` | audio limits, capture | clip lengths the model takes |
| ``for_target(dir)`` | ``family_of`` | the family as one checkpoint frames its audio (Qwen2-Audio: its mel hop) |
| ``load_model``, ``decoder``, ``inner_forward`` | capture, tie check | the stock HF model (named like the architecture), where the hooks go, a forward without lm_head |
| ``embedding_key``, ``lm_head_key`` | training | the frozen tables in the safetensors (``embedding_weight``, ``lm_head_weight``; lm_head None: tied) |
| ``vllm``, ``vllm_register()`` | vLLM plugin | the family's vLLM class and what it lacks for EAGLE-3 (:class:`VllmSpec`) |

Members with a body here are defaults every family shares; a family states its data (class names,
weight keys, its :class:`VllmSpec`) and overrides a method only where it truly differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from modeling.targets.vllm_classes import VllmSpec, register
from pipeline.data.records import Turn
from pipeline.data.template import Segment


class TargetFamily:
    """The interface (see the module docstring); members without a body here are the family's to give."""

    name: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    special_tokens: ClassVar[dict[str, str]]  # keys: audio, audio_start, audio_end, turn_end
    end_tokens: ClassVar[tuple[str, ...]]
    max_audio_seconds: ClassVar[float]
    min_audio_tokens: ClassVar[int] = 1
    default_system_prompt: ClassVar[str | None] = None
    # server mode: send user text with the template's audio placeholders already in place (exact
    # prompts; needs a template that renders user text verbatim), else plain audio + text items
    inline_audio_placeholders: ClassVar[bool] = False

    # the transformers config class that reads this family's config.json (it applies the defaults the
    # checkpoint relies on); {marker key: "module:Class"} for a published layout that class cannot read;
    # text_config fields the file must set itself
    config_class: ClassVar[str]
    nested_config: ClassVar[dict[str, str]] = {}
    required_text_fields: ClassVar[tuple[str, ...]] = ()

    # the decoder's embedding and untied lm_head in the safetensors (``embedding_key``, ``lm_head_key``)
    embedding_weight: ClassVar[str]
    lm_head_weight: ClassVar[str]
    vllm: ClassVar[VllmSpec]

    @classmethod
    def text_config(cls, config: dict[str, Any], where: str = "config.json") -> dict[str, Any]:
        """The decoder's shape as transformers reads ``config`` (``where`` names the file in errors)."""
        from modeling.targets.text_config import read_text_config

        return read_text_config(config, cls.config_class, where=where, nested=cls.nested_config,
                                required=cls.required_text_fields)

    @staticmethod
    def render_segments(turns: list[Turn], *, until_turn: int | None = None,
                        system_prompt: str | None = None) -> list[Segment]:
        raise NotImplementedError

    @staticmethod
    def num_audio_tokens(num_samples: int) -> int:
        raise NotImplementedError

    @classmethod
    def for_target(cls, target_dir: str | Path) -> type[TargetFamily]:
        """The family as one checkpoint frames its audio; the class itself unless the checkpoint's
        processor sets a rate the family lets vary (a family that has one overrides this)."""
        return cls

    @staticmethod
    def audio_inputs(feature_extractor: Any, waveforms: list[np.ndarray]) -> dict[str, np.ndarray]:
        raise NotImplementedError

    @classmethod
    def load_model(cls, target_dir: str | Path, dtype: str = "bf16", device: str = "cpu") -> Any:
        """The stock transformers class named like the architecture, in bf16 or fp32, eval, frozen."""
        import torch
        import transformers

        dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
        if dtype not in dtypes:
            raise ValueError(f"dtype must be one of {list(dtypes)}, got {dtype!r}")
        model = getattr(transformers, cls.architectures[0]).from_pretrained(str(target_dir), dtype=dtypes[dtype])
        return model.to(device).eval().requires_grad_(False)

    @staticmethod
    def decoder(model: Any) -> Any:
        """The text decoder: its ``.layers`` are the hook targets, it is called with ``inputs_embeds=``."""
        return model.model.language_model

    @staticmethod
    def inner_forward(model: Any, input_ids: Any, attention_mask: Any, **audio_kwargs: Any) -> Any:
        """``model.model(...)``'s final post-norm hidden states; the lm_head never runs. Audio arrays go
        to the model's device, floating ones in the model's dtype: HF encoders feed the features to
        their first conv as they come, and a bf16 model refuses fp32 features (vLLM casts them itself)."""
        import torch

        audio = {}
        for key, value in audio_kwargs.items():
            value = torch.as_tensor(value, device=model.device)
            audio[key] = value.to(model.dtype) if value.is_floating_point() else value
        out = model.model(input_ids=torch.as_tensor(input_ids, device=model.device),
                          attention_mask=torch.as_tensor(attention_mask, device=model.device), use_cache=False,
                          **audio)
        return out.last_hidden_state

    @classmethod
    def embedding_key(cls, config: dict[str, Any]) -> str:
        return cls.embedding_weight

    @classmethod
    def lm_head_key(cls, config: dict[str, Any]) -> str | None:
        """None when the lm_head is tied to the embedding: then no such tensor is stored."""
        return None if cls.text_config(config)["tie_word_embeddings"] else cls.lm_head_weight

    @classmethod
    def vllm_register(cls) -> None:
        """Point vLLM's registry entry for the architecture at the EAGLE-3 capable class (lazy, idempotent)."""
        register(cls.architectures[0], cls.vllm)


def render_text(family: type[TargetFamily], turns: list[Turn], *, add_generation_prompt: bool = False) -> str:
    """The string the family's chat template renders (each answer followed by its turn-end token)."""
    segs = family.render_segments(turns, until_turn=len(turns) if add_generation_prompt else None)
    end = family.special_tokens["turn_end"]
    return "".join(s.text + (end if s.kind == "answer" else "") for s in segs)
