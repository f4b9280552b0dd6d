"""The EAGLE-3 capable vLLM classes the plugin registers, one per audio family, resolved lazily.

vLLM 0.32 runs an audio target with an EAGLE-3 draft only if the target class implements
``SupportsEagle3`` (Qwen2-Audio and GLM-ASR do not; Qwen3-ASR does) and its config carries
``image_token_index``: the EAGLE proposer reads the placeholder id under that name from every
multimodal target not on its list of known classes, and none of these configs has the field. Each
class here is the family's vLLM class, plus ``SupportsEagle3`` where missing, plus an ``__init__``
that sets ``image_token_index`` to the audio placeholder's id. Nothing else changes: the inherited
``set_aux_hidden_state_layers`` reaches the inner decoder (an ``EagleModelMixin``), which collects
the aux hidden states the draft's config names.

Each family declares its vLLM class as a :class:`VllmSpec` (``TargetFamily.vllm``);
``TargetFamily.vllm_register`` hands it to :func:`register`, which records it and points the
architecture at ``module:attribute`` of this module, so vLLM imports a family's model code only when
it builds or inspects that model (through :func:`__getattr__`). The table of specs is what the
families registered: vLLM loads the plugin (:mod:`modeling.vllm_plugin`, which registers every
family of the registry) in every process it starts, before it resolves a model class. This module
does not read the registry itself: the registry's families import it (through their base class).
vLLM caches a lazily registered class's interface flags in ``~/.cache/vllm/modelinfos`` keyed by
this file's hash: after upgrading vLLM, delete ``modeling-targets-vllm_classes-*.json`` there.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VllmSpec:
    """A family's vLLM model class, which this module extends for EAGLE-3."""

    module: str  # vLLM model module
    cls: str  # its class (= the architecture name)
    placeholder: str  # config field holding the audio placeholder id
    prepare: Callable[[], Any] | None = None  # run before importing ``module`` (an import workaround)

    @property
    def eagle3_name(self) -> str:
        """The extended class's attribute here: ``Eagle3`` before ``For`` (``XForY`` -> ``XEagle3ForY``)."""
        head, sep, tail = self.cls.partition("For")
        return f"{head}Eagle3{sep}{tail}"


SPECS: dict[str, VllmSpec] = {}  # eagle3_name -> spec, filled by register
_cache: dict[str, type] = {}


def register(architecture: str, spec: VllmSpec) -> None:
    """Record ``spec`` and point vLLM's registry entry for ``architecture`` at its EAGLE-3 class here
    (idempotent; no other architecture's entry is touched)."""
    from vllm import ModelRegistry

    SPECS[spec.eagle3_name] = spec
    target = f"{__name__}:{spec.eagle3_name}"
    current = ModelRegistry.models.get(architecture)
    if f"{getattr(current, 'module_name', '')}:{getattr(current, 'class_name', '')}" != target:
        ModelRegistry.register_model(architecture, target)


def eagle3_class(attribute: str) -> type:
    """The family class of ``SPECS[attribute]`` with ``SupportsEagle3`` and the shim (cached)."""
    if attribute in _cache:
        return _cache[attribute]
    spec = SPECS[attribute]
    if spec.prepare is not None:
        spec.prepare()
    from vllm.model_executor.models.interfaces import SupportsEagle3, supports_eagle3

    base = getattr(importlib.import_module(spec.module), spec.cls)
    bases = (base,) if supports_eagle3(base) else (base, SupportsEagle3)
    placeholder = spec.placeholder

    def __init__(self: Any, *, vllm_config: Any, prefix: str = "") -> None:
        base.__init__(self, vllm_config=vllm_config, prefix=prefix)
        # the EAGLE proposer looks the placeholder id up as ``image_token_index``
        if getattr(self.config, "image_token_index", None) is None:
            self.config.image_token_index = getattr(self.config, placeholder)

    # __name__ as the architecture: vLLM's name-based checks and logs see the familiar class;
    # __qualname__ as the module attribute, so pickle finds the class again (via __getattr__)
    cls = type(spec.cls, bases, {"__init__": __init__, "__qualname__": attribute, "__module__": __name__,
                                 "__doc__": f"{spec.cls} that can feed aux hidden states to an EAGLE-3 draft."})
    _cache[attribute] = cls
    return cls


def __getattr__(name: str) -> Any:
    # PEP 562: the registry's lazy ``module:attribute`` lookup lands here
    if name in SPECS:
        return eagle3_class(name)
    if name.startswith("__"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}: no target family registered such a "
                         f"class (registered: {sorted(SPECS)}); vLLM registers them by loading the audio_eagle3 "
                         "plugin, modeling.vllm_plugin.register, which a process outside vLLM calls itself")
