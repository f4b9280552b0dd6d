"""Size of the EAGLE-3 draft and the ``config.json`` that serving engines load.

The draft is one Llama decoder layer sized like the target's language model. It is sized from the
target's decoder shape as ``TargetFamily.text_config`` returns it (read through the family's transformers
config class, defaults applied); this module never reads a target's ``config.json`` nor names a family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

# the keys of TargetFamily.text_config the draft is sized from
TEXT_SHAPE_KEYS = ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads", "num_key_value_heads",
                   "head_dim", "intermediate_size", "rms_norm_eps", "rope_theta", "max_position_embeddings")

Engine = Literal["vllm", "sglang"]
AUDIO_INPUTS = ("placeholder", "encoder")
# vLLM's stock EAGLE-3 Llama draft; it embeds the audio placeholder id at audio positions
STOCK_ARCHITECTURE = "LlamaForCausalLMEagle3"
# the same draft taking the target's audio embeddings there: registered by the package's vLLM plugin
# (vLLM keeps a name starting with "Eagle3" as is when it wraps the config for method eagle3)
HEARING_ARCHITECTURE = "Eagle3HearingLlamaForCausalLM"


def default_aux_layer_ids(num_target_layers: int) -> tuple[int, int, int]:
    """Default aux layers in the *output* convention (SpecForge/SGLang): [1, L//2-1, L-4]."""
    if num_target_layers < 5:
        raise ValueError(f"target needs at least 5 decoder layers for 3 distinct aux layers, got {num_target_layers}")
    return (1, num_target_layers // 2 - 1, num_target_layers - 4)


def aux_ids_for_engine(output_ids: Sequence[int], engine: Engine) -> list[int]:
    """Translate aux ids from the output convention to the one ``engine`` reads.

    vLLM (and SafeAILab EAGLE) name the *input* of decoder layer i, which is the output of
    layer i-1, so the same tensors carry ids one higher there than in SGLang.
    """
    if engine == "vllm":
        return [int(i) + 1 for i in output_ids]
    if engine == "sglang":
        return [int(i) for i in output_ids]
    raise ValueError(f"unknown engine {engine!r}; expected 'vllm' or 'sglang'")


@dataclass(kw_only=True, slots=True)
class DraftConfig:
    """Shape and numerics of a one-layer EAGLE-3 draft (LlamaForCausalLMEagle3)."""

    hidden_size: int
    """Draft hidden size H (the target's, so the frozen target embedding table fits)."""
    intermediate_size: int
    """Width of the SiLU-gated MLP."""
    num_attention_heads: int
    """Query heads."""
    num_key_value_heads: int
    """Key/value heads (GQA when smaller than ``num_attention_heads``)."""
    head_dim: int
    """Per-head width; q/k/v read the 2H concatenation [embedding, hidden]."""
    vocab_size: int
    """Target vocabulary (rows of the frozen embedding table)."""
    draft_vocab_size: int
    """Rows of the draft ``lm_head``; ids map back to the target through ``d2t``."""
    target_hidden_size: int
    """Target hidden size Ht; ``fc`` maps 3*Ht -> H."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon, shared by all four norms."""
    rope_theta: float = 10000.0
    """RoPE base (default rope type, neox style, as vLLM's Llama uses)."""
    max_position_embeddings: int = 32768
    """Largest position the engine prepares RoPE tables for."""
    norm_before_residual: bool = False
    """If true the residual is the *normed* hidden (speculators' default); EAGLE uses false."""
    num_target_layers: int = 32
    """Decoder layers in the target LM, to derive default aux layer ids."""
    aux_layer_ids: tuple[int, ...] = field(default=())
    """Aux layers in the output convention; empty means ``default_aux_layer_ids``."""
    audio_input: str = "placeholder"
    """What the draft embeds at audio positions: ``placeholder`` (the audio token's embedding row, what
    vLLM's stock EAGLE-3 class feeds) or ``encoder`` (the target's audio embeddings; served by the
    plugin's hearing class, :mod:`modeling.draft.vllm_hearing`)."""

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                     "head_dim", "vocab_size", "draft_vocab_size", "target_hidden_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"DraftConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(f"draft_vocab_size ({self.draft_vocab_size}) exceeds vocab_size ({self.vocab_size})")
        if self.audio_input not in AUDIO_INPUTS:
            raise ValueError(f"DraftConfig.audio_input must be one of {sorted(AUDIO_INPUTS)}, got {self.audio_input!r}")
        if not self.aux_layer_ids:
            self.aux_layer_ids = default_aux_layer_ids(self.num_target_layers)
        self.aux_layer_ids = tuple(int(i) for i in self.aux_layer_ids)
        bad = [i for i in self.aux_layer_ids if not 0 <= i < self.num_target_layers]
        if bad:
            raise ValueError(f"aux_layer_ids {bad} outside the target's {self.num_target_layers} layers")

    @classmethod
    def from_target_config(cls, text: Mapping[str, Any], draft_vocab_size: int,
                           overrides: Mapping[str, Any] | None = None) -> DraftConfig:
        """Size a draft from the target's decoder shape (``TargetFamily.text_config(config)``, e.g. through
        ``modeling.targets.target_text_config(dir)``).

        ``overrides`` replaces any field afterwards (e.g. a narrower ``intermediate_size``);
        unknown keys raise ``ValueError`` so a typo does not silently train the wrong shape.
        """
        missing = [k for k in TEXT_SHAPE_KEYS if k not in text]
        if missing:
            raise ValueError(f"the target's text shape lacks {missing}: pass TargetFamily.text_config(config), "
                             "not a raw config.json")
        kwargs: dict[str, Any] = {
            "hidden_size": int(text["hidden_size"]),
            "intermediate_size": int(text["intermediate_size"]),
            "num_attention_heads": int(text["num_attention_heads"]),
            "num_key_value_heads": int(text["num_key_value_heads"]),
            "head_dim": int(text["head_dim"]),
            "vocab_size": int(text["vocab_size"]),
            "draft_vocab_size": int(draft_vocab_size),
            "target_hidden_size": int(text["hidden_size"]),
            "rms_norm_eps": float(text["rms_norm_eps"]),
            "rope_theta": float(text["rope_theta"]),
            "max_position_embeddings": int(text["max_position_embeddings"]),
            "num_target_layers": int(text["num_hidden_layers"]),
        }
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides or {}) - known)
        if unknown:
            raise ValueError(f"unknown DraftConfig override(s) {unknown}; known fields: {sorted(known)}")
        kwargs.update(overrides or {})
        return cls(**kwargs)

    def to_hf_config(self, aux_layer_ids: Sequence[int] | None = None,
                     convention_engine: Engine = "vllm") -> dict[str, Any]:
        """The draft's ``config.json`` as a dict.

        ``aux_layer_ids`` are in the output convention (default: ``self.aux_layer_ids``);
        they are written in the convention of ``convention_engine`` (see ``aux_ids_for_engine``).
        """
        if self.audio_input == "encoder" and convention_engine != "vllm":
            raise ValueError(f"a draft trained on the audio encoder's embeddings (audio_input 'encoder') is served "
                             f"by this package's vLLM plugin only; {convention_engine} would feed it the "
                             "placeholder's embedding at audio positions (train with --draft-audio-input "
                             "placeholder for that engine)")
        ids = aux_ids_for_engine(self.aux_layer_ids if aux_layer_ids is None else aux_layer_ids,
                                 convention_engine)
        return {
            "architectures": [HEARING_ARCHITECTURE if self.audio_input == "encoder" else STOCK_ARCHITECTURE],
            "model_type": "llama",
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_hidden_layers": 1,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: transformers 5 reads rope_parameters, older loaders rope_theta.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "max_position_embeddings": self.max_position_embeddings,
            "norm_before_residual": self.norm_before_residual,
            "eagle_config": {"eagle_aux_hidden_state_layer_ids": ids, "use_aux_hidden_state": True},
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
        }
