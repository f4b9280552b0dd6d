"""The hearing EAGLE-3 draft in vLLM: the stock Llama draft fed the target's audio embeddings.

vLLM 0.32's EAGLE proposer passes the target's multimodal embeddings to a draft only if the draft
class declares ``supports_multimodal_embeddings``; its ``Eagle3LlamaForCausalLM`` does not, so at
every audio position it embeds the placeholder id (``<|AUDIO|>``). A draft trained with
``--draft-audio-input encoder`` learned from the encoder's embeddings there instead, and needs them
served. :func:`hearing_class` is ``Eagle3LlamaForCausalLM`` (the proposer only drives that class
and its siblings) plus ``SupportsMultiModalEmbeddings`` and an ``embed_input_ids`` that merges
what the proposer passes. Export names it ``HEARING_ARCHITECTURE`` in ``config.json`` when the
draft config's ``audio_input`` is ``encoder``; the plugin (:mod:`modeling.vllm_plugin`) registers
that name in every vLLM process, pointing at this module lazily, so vLLM's model code is imported
only when such a draft is loaded.

What the proposer passes (``gpu_model_runner._gather_mm_embeddings(shift_computed_tokens=1)``,
also the CPU runner's): for each scheduled row r of a prefill chunk, the draft's input id is the
prompt token at r + 1, and where that token is an audio frame the row gets that frame's encoder
output, the projector output the target merged into its own ``inputs_embeds``. That is the
training row's alignment (the TTT step-0 query at t embeds token t + 1, the store's audio row where
t + 1 is audio: :func:`modeling.training.model.with_audio_ids`). Later draft steps (k > 1) embed
the draft's own proposals, which are text, as in training. Edge: when a chunked prefill ends just
before an audio item that has not been encoded yet, vLLM gives that one row the placeholder's
embedding.

Numerics: the store keeps the audio embeddings in bf16 (stage 2 writes bf16 values whatever the
target's compute dtype), so the draft trained on bf16-rounded rows. An fp32 target passes fp32 rows;
they are rounded to bf16 here, so the draft sees what it was trained on (a no-op for a bf16 target).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from modeling.draft.config import HEARING_ARCHITECTURE

log = logging.getLogger(__name__)

STORED_AUDIO_DTYPE = torch.bfloat16  # the store's value dtype for audio_embeds (stages.dump)
_cache: dict[str, type] = {}


def register() -> None:
    """Point vLLM's registry entry for ``HEARING_ARCHITECTURE`` at this module (idempotent)."""
    from vllm import ModelRegistry

    target = f"{__name__}:{HEARING_ARCHITECTURE}"
    current = ModelRegistry.models.get(HEARING_ARCHITECTURE)
    if f"{getattr(current, 'module_name', '')}:{getattr(current, 'class_name', '')}" != target:
        ModelRegistry.register_model(HEARING_ARCHITECTURE, target)


def as_stored(embeds: Any) -> Any:
    """Audio embeddings rounded as the store rounds them (nested lists as vLLM may pass them)."""
    if torch.is_tensor(embeds):
        return embeds.to(STORED_AUDIO_DTYPE)
    return [as_stored(e) for e in embeds]


def hearing_class() -> type:
    """``Eagle3LlamaForCausalLM`` that merges the target's audio embeddings into its inputs (cached)."""
    if HEARING_ARCHITECTURE in _cache:
        return _cache[HEARING_ARCHITECTURE]
    from vllm.model_executor.models.interfaces import SupportsMultiModalEmbeddings
    from vllm.model_executor.models.llama_eagle3 import Eagle3LlamaForCausalLM
    from vllm.model_executor.models.utils import _merge_multimodal_embeddings

    def embed_input_ids(self: Any, input_ids: torch.Tensor, multimodal_embeddings: Any = None, *,
                        is_multimodal: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.model.embed_input_ids(input_ids)
        if multimodal_embeddings is None or is_multimodal is None or len(multimodal_embeddings) == 0:
            return embeds  # later draft steps and text-only rows
        # overwrites the rows is_multimodal marks, cast to the draft's dtype
        return _merge_multimodal_embeddings(embeds, as_stored(multimodal_embeddings), is_multimodal)

    # __qualname__ as the module attribute, so pickle finds the class again (via __getattr__)
    cls = type(HEARING_ARCHITECTURE, (Eagle3LlamaForCausalLM, SupportsMultiModalEmbeddings),
               {"embed_input_ids": embed_input_ids, "__qualname__": HEARING_ARCHITECTURE, "__module__": __name__,
                "__doc__": "EAGLE-3 Llama draft that embeds the target's audio embeddings at audio positions."})
    _cache[HEARING_ARCHITECTURE] = cls
    return cls


def __getattr__(name: str) -> Any:
    # PEP 562: the registry's lazy ``module:attribute`` lookup lands here
    if name == HEARING_ARCHITECTURE:
        return hearing_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
