"""vLLM side of the Qwen3-ASR family: the import workaround its class needs (the class itself is
built by :mod:`modeling.targets.vllm_classes`).

vLLM 0.32's own ``Qwen3ASRForConditionalGeneration`` already implements ``SupportsEagle3``, yet an
EAGLE-3 run with it fails twice on this CPU build; both are fixed without touching vLLM:

- importing ``vllm.model_executor.models.qwen3_asr`` fails without torchvision: it reaches
  ``qwen2_vl.py``, which takes ``smart_resize`` from ``transformers...image_processing_qwen2_vl``, a
  module that imports torchvision at its top. The PIL twin ``image_processing_pil_qwen2_vl`` defines
  the same ``smart_resize``; when torchvision is missing it stands in under the torchvision module's
  name (transformers itself already falls back to the PIL class for ``Qwen2VLImageProcessor``).
- the EAGLE proposer reads ``config.image_token_index`` from every multimodal target not on its
  list of known classes, and Qwen3-ASR's (thinker) config has no such field: the class in
  :mod:`modeling.targets.vllm_classes` sets it to the ``<|audio_pad|>`` id.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys

log = logging.getLogger(__name__)

_TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PIL_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"


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
