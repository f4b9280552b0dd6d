"""vLLM plugin: EAGLE-3 speculative decoding for Qwen2-Audio targets, without patching vLLM.

Installed as the ``vllm.general_plugins`` entry point ``audio_eagle3`` (see pyproject.toml), so
vLLM calls :func:`register` in every process it starts: the offline ``LLM``, the OpenAI server
(``python -m vllm.entrypoints.openai.api_server``) and their engine/worker processes. Disable it
with ``VLLM_PLUGINS=`` (empty) or by listing other plugins only.

vLLM 0.32's ``Qwen2AudioForConditionalGeneration`` lacks the ``SupportsEagle3`` interface (the
upstream PR #32230 was closed), so asking for ``method: eagle3`` fails with "Model does not
support EAGLE3 interface". The plugin re-registers that architecture name with a subclass that
adds the interface. Nothing else changes:

- the aux hidden-state layers come from the draft's ``eagle_config.eagle_aux_hidden_state_layer_ids``
  (vLLM's model runner reads them and calls ``set_aux_hidden_state_layers``; the inherited
  ``SupportsEagle3`` methods route that to the inner ``Qwen2Model``, which already collects them);
- ``config.image_token_index = config.audio_token_index``: vLLM's EAGLE proposer reads
  ``image_token_index`` from every multimodal target to know the placeholder token, and
  Qwen2-Audio's config has no such field.

Registration is lazy (a ``module:attribute`` string), so no vLLM model code is imported unless a
Qwen2-Audio model is actually loaded, and no other architecture's registry entry is touched. If
the installed vLLM's own class already implements ``SupportsEagle3``, the attribute resolves to
that class unchanged.

vLLM caches a lazily registered class's interface flags in ``~/.cache/vllm/modelinfos``, keyed by
this file's hash: after upgrading vLLM, delete ``modeling-vllm_plugin-*.json`` there.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

ARCHITECTURE = "Qwen2AudioForConditionalGeneration"
"""The architecture name the plugin re-registers (the Hub checkpoints' ``architectures[0]``)."""
CLASS_ATTRIBUTE = "Qwen2AudioEagle3ForConditionalGeneration"
"""Module attribute the registry resolves lazily (see ``__getattr__``)."""

_cache: dict[str, type] = {}


def register() -> None:
    """Point vLLM's registry entry for Qwen2-Audio at the EAGLE-3 capable class (idempotent)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:{CLASS_ATTRIBUTE}")
    from modeling.targets.glm_asr import GlmAsrFamily

    GlmAsrFamily.vllm_register()


def eagle3_model_class() -> type:
    """vLLM's Qwen2-Audio class with ``SupportsEagle3`` (vLLM's own class if it already has it)."""
    if CLASS_ATTRIBUTE in _cache:
        return _cache[CLASS_ATTRIBUTE]
    from vllm.model_executor.models import qwen2_audio
    from vllm.model_executor.models.interfaces import SupportsEagle3

    base = qwen2_audio.Qwen2AudioForConditionalGeneration
    if getattr(base, "supports_eagle3", False):
        log.info("vLLM's %s already supports EAGLE-3; the audio_eagle3 plugin leaves it as is", ARCHITECTURE)
        _cache[CLASS_ATTRIBUTE] = base
        return base

    class _Eagle3Qwen2Audio(base, SupportsEagle3):  # type: ignore[valid-type, misc]
        """Qwen2-Audio target that can feed aux hidden states to an EAGLE-3 draft."""

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            # The EAGLE proposer looks up the placeholder id as ``image_token_index`` on any
            # multimodal target; for an audio model that is the <|AUDIO|> token.
            if getattr(self.config, "image_token_index", None) is None:
                self.config.image_token_index = self.config.audio_token_index

    # __name__ as the architecture, so vLLM's name-based checks and logs see the familiar class;
    # __qualname__ as the module attribute, so pickle finds the class again (via __getattr__).
    _Eagle3Qwen2Audio.__name__ = ARCHITECTURE
    _Eagle3Qwen2Audio.__qualname__ = CLASS_ATTRIBUTE
    _Eagle3Qwen2Audio.__module__ = __name__
    _cache[CLASS_ATTRIBUTE] = _Eagle3Qwen2Audio
    return _Eagle3Qwen2Audio


def __getattr__(name: str) -> Any:
    # PEP 562: the registry's lazy ``module:attribute`` lookup lands here, so vLLM's model code
    # is imported only when a Qwen2-Audio model is really built or inspected.
    if name == CLASS_ATTRIBUTE:
        return eagle3_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
