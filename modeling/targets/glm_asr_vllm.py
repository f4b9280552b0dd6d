"""vLLM side of the GLM-ASR family: EAGLE-3 for ``GlmAsrForConditionalGeneration`` without patching vLLM.

vLLM 0.32's class (``vllm/model_executor/models/glmasr.py``) lacks ``SupportsEagle3``, so ``method:
eagle3`` fails with "Model does not support EAGLE3 interface". :func:`register` re-registers the
architecture name with a subclass that adds the interface and one shim:

- ``SupportsEagle3``'s inherited ``set_aux_hidden_state_layers`` goes through ``get_language_model()``
  (the ``LlamaForCausalLM``) to its ``.model``, vLLM's ``LlamaModel``, an ``EagleModelMixin`` that
  collects the layers; GLM-ASR's ``forward`` returns that model's output as is, so ``(hidden, aux)``
  reaches the runner unchanged and nothing else needs overriding;
- ``config.image_token_index = config.audio_token_id``: the EAGLE proposer reads ``image_token_index``
  from every multimodal target outside its fixed list, and ``GlmAsrConfig`` has no such field.

The module imports cleanly on the CPU venv (no torchvision in its import chain), so no import alias is
needed. Registration is lazy (a ``module:attribute`` string resolved by ``__getattr__``): no vLLM model
code is imported until a GLM-ASR model is loaded, and no other registry entry changes. vLLM caches the
interface flags of lazily registered classes in ``~/.cache/vllm/modelinfos`` keyed by this file's hash.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

ARCHITECTURE = "GlmAsrForConditionalGeneration"
CLASS_ATTRIBUTE = "GlmAsrEagle3ForConditionalGeneration"

_cache: dict[str, type] = {}


def register() -> None:
    """Point vLLM's registry entry for GLM-ASR at :func:`eagle3_model_class` (idempotent)."""
    from vllm import ModelRegistry

    ModelRegistry.register_model(ARCHITECTURE, f"{__name__}:{CLASS_ATTRIBUTE}")


def eagle3_model_class() -> type:
    """vLLM's GLM-ASR class with ``SupportsEagle3`` (added only if missing) and the placeholder shim."""
    if CLASS_ATTRIBUTE in _cache:
        return _cache[CLASS_ATTRIBUTE]
    from vllm.model_executor.models import glmasr
    from vllm.model_executor.models.interfaces import SupportsEagle3, supports_eagle3

    base = glmasr.GlmAsrForConditionalGeneration
    # even a future vLLM class with the interface still needs the shim, so the subclass always exists
    bases: tuple[type, ...] = (base,) if supports_eagle3(base) else (base, SupportsEagle3)
    if len(bases) == 1:
        log.info("vLLM's %s already supports EAGLE-3; only the image_token_index shim is added", ARCHITECTURE)

    class _Eagle3GlmAsr(*bases):  # type: ignore[misc]
        """GLM-ASR target that can feed aux hidden states to an EAGLE-3 draft."""

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            # the EAGLE proposer looks the placeholder id up as image_token_index; here it is <|pad|>
            if getattr(self.config, "image_token_index", None) is None:
                self.config.image_token_index = self.config.audio_token_id

    cls = _Eagle3GlmAsr
    cls.__name__ = ARCHITECTURE
    # __name__ stays the architecture (vLLM's name-based checks and logs); __qualname__ is the module
    # attribute so pickle finds the class again through __getattr__
    cls.__qualname__ = CLASS_ATTRIBUTE
    cls.__module__ = __name__
    _cache[CLASS_ATTRIBUTE] = cls
    return cls


def __getattr__(name: str) -> Any:
    # PEP 562: the registry's lazy "module:attribute" lookup lands here
    if name == CLASS_ATTRIBUTE:
        return eagle3_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
