"""vLLM plugin: EAGLE-3 speculative decoding for audio targets, without patching vLLM.

Installed as the ``vllm.general_plugins`` entry point ``audio_eagle3`` (see pyproject.toml), so
vLLM calls :func:`register` in every process it starts: the offline ``LLM``, the OpenAI server
(``python -m vllm.entrypoints.openai.api_server``) and their engine/worker processes. Disable it
with ``VLLM_PLUGINS=`` (empty) or by listing other plugins only.

Each target family's ``vllm_register`` points its architecture name at a lazily resolved class
(:mod:`modeling.targets.vllm_classes`): vLLM's own class plus ``SupportsEagle3`` where it lacks it
(vLLM 0.32: Qwen2-Audio, GLM-ASR; PR #32230 for Qwen2-Audio was closed) and the
``image_token_index`` the EAGLE proposer reads (no audio family's config has it). No vLLM model
code is imported unless such a model is loaded, and no other architecture's entry is touched.
It also registers the hearing draft (:mod:`modeling.draft.vllm_hearing`): the EAGLE-3 draft that
takes the target's audio embeddings, which ``stages.export`` names for drafts trained on them.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def register() -> None:
    """Register every family's EAGLE-3 capable class and the hearing draft (idempotent)."""
    from modeling.draft import vllm_hearing
    from modeling.targets import FAMILIES, family_named

    for name in FAMILIES:
        family_named(name).vllm_register()
    vllm_hearing.register()
