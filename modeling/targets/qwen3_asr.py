"""The Qwen3-ASR target family (Qwen/Qwen3-ASR-0.6B-hf, -1.7B-hf): one adapter for the whole pipeline.

transformers 5.19 ``Qwen3ASRForConditionalGeneration`` (config ``qwen3_asr``): a Whisper-like encoder with
three stride-2 conv2d layers over 100-frame chunks (13 embeddings per second of audio), a two-layer
projector, and a Qwen3 decoder (QK-norm, explicit ``head_dim``) whose ``lm_head`` is tied to the
embedding. vLLM 0.32 serves the same checkpoint with its own ``Qwen3ASRForConditionalGeneration``.

The chat template (the -hf checkpoints', see :data:`CHAT_TEMPLATE`) is not ChatML per message: it
renders ONE system turn (all system texts joined, empty by default), ONE user turn holding every
audio of the conversation and no user text at all, then each assistant turn::

    <|im_start|>system\\n{system texts}<|im_end|>\\n
    <|im_start|>user\\n<|audio_start|><|audio_pad|><|audio_end|>...<|im_end|>\\n
    <|im_start|>assistant\\n[ANSWER<|im_end|>]\\n                      ([...] = loss mask 1)

So the prompt for regenerating assistant turn k (``until_turn=k``) is the rendering of the turns
before k plus ``<|im_start|>assistant\\n``; it is not a prefix of the full rendering when a later
turn adds audio, because every audio sits in the one user turn. The template's own generation mask
also covers the ``\\n`` after ``<|im_end|>``; no engine generates it (generation stops at
``<|im_end|>``), so as for Qwen2-Audio the answer and its ``<|im_end|>`` carry the loss, not that ``\\n``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import sys
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from modeling.targets.base import TargetFamily
from modeling.targets.base import render_text as render_family_text
from modeling.targets.vllm_classes import VllmSpec
from pipeline.data.records import Turn
from pipeline.data.template import Segment

ARCHITECTURE = "Qwen3ASRForConditionalGeneration"
END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
AUDIO_START = "<|audio_start|>"
AUDIO_END = "<|audio_end|>"
AUDIO_TOKEN = "<|audio_pad|>"
ASR_TEXT = "<asr_text>"  # the real model answers "language English<asr_text>the transcript"
TIMESTAMP = "<timestamp>"  # forced-aligner marker; the config names its id
TORCHVISION_MODULE = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
PIL_MODULE = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
log = logging.getLogger(__name__)

SAMPLING_RATE = 16_000
HOP_SAMPLES = 160  # one mel frame per 10 ms
CHUNK_FRAMES = 100  # the encoder convolves 2 * n_window = 100-frame chunks (n_window = 50)
# Qwen3ASRFeatureExtractor zero-pads clips shorter than this to it and counts the padding as valid audio
MIN_SAMPLES = 8_000
# The official qwen_asr library's per-call limit (MAX_ASR_INPUT_SECONDS, 20 min): transformers and
# vLLM's offline engine truncate nothing, so this is the longest clip the family is used with.
MAX_AUDIO_SECONDS = 1200.0

# Verbatim: ASR_CHAT_TEMPLATE of transformers' convert_qwen3_asr_to_hf.py, the template the -hf
# checkpoints ship (the original repo's chat_template.json extended with assistant turns).
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system_text='') -%}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'system' -%}"
    "{%- if m.content is string -%}"
    "{%- set ns.system_text = ns.system_text + m.content -%}"
    "{%- else -%}"
    "{%- for c in m.content -%}"
    "{%- if c.type == 'text' and (c.text is defined) -%}"
    "{%- set ns.system_text = ns.system_text + c.text -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set ns2 = namespace(audio_tokens='') -%}"
    "{%- for m in messages -%}"
    "{%- if m.content is not string -%}"
    "{%- for c in m.content -%}"
    "{%- if c.type == 'audio' or ('audio' in c) or ('audio_url' in c) -%}"
    "{%- set ns2.audio_tokens = ns2.audio_tokens + '<|audio_start|><|audio_pad|><|audio_end|>' -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- '<|im_start|>system\n' + ns.system_text + '<|im_end|>\n' -}}"
    "{{- '<|im_start|>user\n' + ns2.audio_tokens + '<|im_end|>\n' -}}"
    "{%- for m in messages -%}"
    "{%- if m.role == 'assistant' -%}"
    "{%- set ns3 = namespace(assistant_text='') -%}"
    "{%- if m.content is string -%}"
    "{%- set ns3.assistant_text = m.content -%}"
    "{%- else -%}"
    "{%- for c in m.content -%}"
    "{%- if c.type == 'text' and (c.text is defined) -%}"
    "{%- set ns3.assistant_text = ns3.assistant_text + c.text -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{% generation %}"
    "{{- ns3.assistant_text + '<|im_end|>\n' -}}"
    "{% endgeneration %}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\n' -}}"
    "{%- endif -%}"
)


def _post_cnn_length(frames: int) -> int:
    """Embeddings of one chunk of ``frames`` mel frames: three convs (k=3, s=2, p=1); none for none."""
    for _ in range(3):
        frames = (frames - 1) // 2 + 1 if frames > 0 else 0
    return frames


def alias_torchvision_free_qwen2_vl() -> bool:
    """Let ``image_processing_qwen2_vl`` resolve to its PIL twin when torchvision is missing.

    vLLM 0.32's ``qwen3_asr`` model module reaches ``qwen2_vl.py``, which takes ``smart_resize`` from
    ``transformers...image_processing_qwen2_vl``, a module that imports torchvision at its top. The PIL
    twin ``image_processing_pil_qwen2_vl`` defines the same ``smart_resize``; when torchvision is
    missing it stands in under the torchvision module's name (transformers itself already falls back
    to the PIL class for ``Qwen2VLImageProcessor``). Returns True when the alias is (now) in place;
    with torchvision installed nothing changes.
    """
    if sys.modules.get(TORCHVISION_MODULE) is not None:
        return sys.modules[TORCHVISION_MODULE].__name__ == PIL_MODULE
    if importlib.util.find_spec("torchvision") is not None:
        return False
    sys.modules[TORCHVISION_MODULE] = importlib.import_module(PIL_MODULE)
    log.info("torchvision is not installed: %s stands in for %s", PIL_MODULE, TORCHVISION_MODULE)
    return True


def render_text(turns: list[Turn], *, add_generation_prompt: bool = False) -> str:
    """The string the chat template renders (each answer followed by its ``<|im_end|>``)."""
    return render_family_text(Qwen3ASRFamily, turns, add_generation_prompt=add_generation_prompt)


class Qwen3ASRFamily(TargetFamily):
    """Everything the pipeline needs to know about Qwen3-ASR targets (stateless: use the class itself)."""

    name: ClassVar[str] = "qwen3-asr"
    architectures: ClassVar[tuple[str, ...]] = (ARCHITECTURE,)
    special_tokens: ClassVar[dict[str, str]] = {
        "audio": AUDIO_TOKEN, "audio_start": AUDIO_START, "audio_end": AUDIO_END, "turn_end": IM_END,
    }
    # generation_config.json of the -hf checkpoints: eos_token_id (151643, 151645)
    end_tokens: ClassVar[tuple[str, ...]] = (IM_END, END_OF_TEXT)
    max_audio_seconds: ClassVar[float] = MAX_AUDIO_SECONDS

    config_class: ClassVar[str] = "Qwen3ASRConfig"
    # The original Qwen/Qwen3-ASR-* repos wrap the model's config in thinker_config with an audio encoder
    # model_type ("qwen3_asr_audio_encoder") transformers 5.19 does not know; only the converted -hf repos
    # are flat as transformers' class expects. vLLM's own Qwen3ASRConfig reads the original layout.
    nested_config: ClassVar[dict[str, str]] = {
        "thinker_config": "vllm.transformers_utils.configs.qwen3_asr:Qwen3ASRConfig"}
    # transformers' Qwen3Config defaults rope_theta to 1e4, vLLM's Qwen3ASR text config to 5e6
    required_text_fields: ClassVar[tuple[str, ...]] = ("rope_theta",)
    # vLLM 0.32's own class already implements SupportsEagle3; the plugin's class adds the import
    # workaround (:func:`alias_torchvision_free_qwen2_vl`) and the image_token_index the EAGLE proposer
    # reads (the thinker config has none; the class sets it to the <|audio_pad|> id)
    vllm: ClassVar[VllmSpec] = VllmSpec("vllm.model_executor.models.qwen3_asr", ARCHITECTURE, "audio_token_id",
                                        alias_torchvision_free_qwen2_vl)
    embedding_weight: ClassVar[str] = "model.language_model.embed_tokens.weight"
    lm_head_weight: ClassVar[str] = "lm_head.weight"

    @staticmethod
    def render_segments(turns: list[Turn], *, until_turn: int | None = None,
                        system_prompt: str | None = None) -> list[Segment]:
        """Segments of :data:`CHAT_TEMPLATE` for ``turns``.

        ``until_turn``: the generation prompt for that assistant turn (the turns before it, then the
        assistant header). ``system_prompt``: system text when the conversation has no system turn
        (the template's default is empty).
        """
        shown = turns if until_turn is None else turns[:until_turn]
        system_turns = [i for i, t in enumerate(shown) if t.role == "system"]
        system = "".join(shown[i].text for i in system_turns) if system_turns else (system_prompt or "")
        segs = [Segment("text", f"{IM_START}system\n{system}{IM_END}\n", system_turns[0] if system_turns else -1),
                Segment("text", f"{IM_START}user\n")]
        for i, turn in enumerate(shown):  # every clip of every turn goes into the one user turn
            for part in turn.parts:
                if part.kind == "audio":
                    segs += [Segment("text", AUDIO_START, i), Segment("audio", AUDIO_TOKEN, i),
                             Segment("text", AUDIO_END, i)]
        segs.append(Segment("text", f"{IM_END}\n"))
        for i, turn in enumerate(shown):
            if turn.role == "assistant":
                segs += [Segment("text", f"{IM_START}assistant\n", i), Segment("answer", turn.text, i),
                         Segment("text", "\n", i)]
        if until_turn is not None:
            segs.append(Segment("text", f"{IM_START}assistant\n", until_turn))
        return segs

    @staticmethod
    def num_audio_tokens(num_samples: int) -> int:
        """Embeddings the encoder emits for a clip of ``num_samples`` at 16 kHz, featurized alone.

        Alone, the feature extractor marks ``floor(n / 160)`` frames valid (its STFT drops the last
        partial frame; a clip padded inside a batch would get ``ceil``), after first padding clips
        under 0.5 s to 0.5 s. Each full 100-frame chunk gives 13 embeddings, the rest chunk fewer.
        """
        frames = max(int(num_samples), MIN_SAMPLES) // HOP_SAMPLES
        full, rest = divmod(frames, CHUNK_FRAMES)
        return full * _post_cnn_length(CHUNK_FRAMES) + _post_cnn_length(rest)

    @staticmethod
    def audio_inputs(feature_extractor: Any, waveforms: list[np.ndarray]) -> dict[str, np.ndarray]:
        """``input_features`` [N, 128, T] float32 and ``input_features_mask`` [N, T] int64 for the HF forward.

        Each clip is featurized alone, as vLLM's processor does for every clip, then zero-padded to the
        longest: featurizing them as one batch would mark ``ceil`` instead of ``floor`` frames valid for
        the shorter clips and give them a different token count than vLLM. No clips: no audio kwargs.
        """
        if not waveforms:
            return {}
        feats = [feature_extractor(np.asarray(w, dtype=np.float32), sampling_rate=SAMPLING_RATE, padding="longest",
                                   return_attention_mask=True, return_tensors=None) for w in waveforms]
        width = max(f["input_features"].shape[-1] for f in feats)
        mel = feats[0]["input_features"].shape[1]
        features = np.zeros((len(feats), mel, width), dtype=np.float32)
        mask = np.zeros((len(feats), width), dtype=np.int64)
        for i, f in enumerate(feats):
            n = f["input_features"].shape[-1]
            features[i, :, :n] = f["input_features"][0]
            mask[i, :n] = f["attention_mask"][0]
        return {"input_features": features, "input_features_mask": mask}

    @classmethod
    def load_model(cls, target_dir: str | Path, dtype: str = "bf16", device: str = "cpu") -> Any:
        """The stock transformers ``Qwen3ASRForConditionalGeneration``, eval, frozen.

        Raises ValueError for the original layout (``thinker_config``, ``thinker.*`` weights): transformers
        5.19 has no key conversion for it and would load a randomly initialised model without failing."""
        config_path = Path(target_dir) / "config.json"
        if "thinker_config" in json.loads(config_path.read_text()):
            raise ValueError(f"{config_path}: thinker_config: the original Qwen3-ASR layout, which transformers "
                             "5.19 cannot load; use the converted checkpoint (Qwen/Qwen3-ASR-*-hf) or convert it "
                             "with transformers' convert_qwen3_asr_to_hf.py")
        return super().load_model(target_dir, dtype, device)

    # the original layout stores the decoder under thinker.model. (vLLM's mapper reads both)
    @classmethod
    def embedding_key(cls, config: dict[str, Any]) -> str:
        return "thinker.model.embed_tokens.weight" if "thinker_config" in config else cls.embedding_weight

    @classmethod
    def lm_head_key(cls, config: dict[str, Any]) -> str | None:
        """None when tied (the -hf checkpoints). An untied checkpoint would store ``lm_head.weight``,
        which vLLM's weight mapper has no rule for."""
        key = super().lm_head_key(config)
        return "thinker." + key if key is not None and "thinker_config" in config else key
