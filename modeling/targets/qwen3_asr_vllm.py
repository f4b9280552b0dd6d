"""vLLM side of the Qwen3-ASR family: the class the plugin registers, resolved lazily.

vLLM 0.32's own ``Qwen3ASRForConditionalGeneration`` already implements ``SupportsEagle3``, yet an
EAGLE-3 run with it fails twice on this CPU build, and this module fixes both without touching vLLM:

- importing ``vllm.model_executor.models.qwen3_asr`` fails without torchvision: it reaches
  ``qwen2_vl.py``, which takes ``smart_resize`` from ``transformers...image_processing_qwen2_vl``, a
  module that imports torchvision at its top. The PIL twin ``image_processing_pil_qwen2_vl`` defines
  the same ``smart_resize``; when torchvision is missing it stands in under the torchvision module's
  name (transformers itself already falls back to the PIL class for ``Qwen2VLImageProcessor``).
- the EAGLE proposer reads ``config.image_token_index`` from every multimodal target not on its
  list of known classes, and Qwen3-ASR's (thinker) config has no such field: the subclass sets it to
  the ``<|audio_pad|>`` id.

:func:`register` points the architecture at ``module:attribute`` of this module; vLLM imports the
model code only when it builds or inspects that model, and then through :func:`__getattr__`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from typing import Any

log = logging.getLogger(__name__)

CLASS_ATTRIBUTE = "Qwen3ASREagle3ForConditionalGeneration"
_TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PIL_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"

_cache: dict[str, type] = {}


def register(architecture: str) -> None:
    """Point vLLM's registry entry for ``architecture`` at :data:`CLASS_ATTRIBUTE` (idempotent)."""
    from vllm import ModelRegistry

    target = f"{__name__}:{CLASS_ATTRIBUTE}"
    current = ModelRegistry.models.get(architecture)
    if f"{getattr(current, 'module_name', '')}:{getattr(current, 'class_name', '')}" != target:
        ModelRegistry.register_model(architecture, target)


def alias_torchvision_free_qwen2_vl() -> bool:
    """Let ``image_processing_qwen2_vl`` resolve to its PIL twin when torchvision is missing.

    Returns True when the alias is (now) in place; with torchvision installed nothing changes.
    """
    if sys.modules.get(_TORCHVISION_MODULE) is not None:
        return sys.modules[_TORCHVISION_MODULE].__name__ == _PIL_MODULE
    if importlib.util.find_spec("torchvision") is not None:
        return False
    sys.modules[_TORCHVISION_MODULE] = importlib.import_module(_PIL_MODULE)
    log.info("torchvision is not installed: %s stands in for %s", _PIL_MODULE, _TORCHVISION_MODULE)
    return True


def eagle3_model_class() -> type:
    """vLLM's Qwen3-ASR class with the ``image_token_index`` shim (and ``SupportsEagle3`` if it lacked it)."""
    if CLASS_ATTRIBUTE in _cache:
        return _cache[CLASS_ATTRIBUTE]
    alias_torchvision_free_qwen2_vl()
    from vllm.model_executor.models import qwen3_asr
    from vllm.model_executor.models.interfaces import SupportsEagle3, supports_eagle3

    base = qwen3_asr.Qwen3ASRForConditionalGeneration
    # vLLM 0.32 declares the interface already; older or newer builds might not
    bases = (base,) if supports_eagle3(base) else (base, SupportsEagle3)

    class _Eagle3Qwen3ASR(*bases):  # type: ignore[misc]
        """Qwen3-ASR target whose config names its placeholder the way the EAGLE proposer looks it up."""

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            if getattr(self.config, "image_token_index", None) is None:
                self.config.image_token_index = self.config.audio_token_id

    # __name__ as the architecture: the proposer and vLLM's logs match on class names;
    # __qualname__ as the module attribute, so pickle finds the class again (via __getattr__).
    _Eagle3Qwen3ASR.__name__ = base.__name__
    _Eagle3Qwen3ASR.__qualname__ = CLASS_ATTRIBUTE
    _Eagle3Qwen3ASR.__module__ = __name__
    _cache[CLASS_ATTRIBUTE] = _Eagle3Qwen3ASR
    return _Eagle3Qwen3ASR


def __getattr__(name: str) -> Any:
    # PEP 562: the registry's lazy ``module:attribute`` lookup lands here
    if name == CLASS_ATTRIBUTE:
        return eagle3_model_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
