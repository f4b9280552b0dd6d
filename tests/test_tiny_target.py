"""The tiny Qwen2-Audio target: deterministic, Hub-shaped, and served identically by transformers and vLLM."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
from safetensors import safe_open

from modeling.targets.qwen2_audio_tiny import (
    AUDIO_TOKEN,
    NEVER_GENERATED,
    SAMPLING_RATE,
    SPECIAL_TOKENS,
    build_tiny_target,
    ensure_tiny_target,
)

PROMPT = [
    {
        "role": "user",
        "content": [{"type": "audio", "audio": "clip"}, {"type": "text", "text": "Transcribe the speech."}],
    }
]
CLIPS = ("clip-00", "clip-05", "clip-10")
# Greedy tokens compared between engines. bf16 transformers and fp32 transformers already part ways within
# ~3-10 tokens on these random weights (rounding flips near-tied argmaxes), so the comparison runs both
# engines in float32, where they agree.
COMPARED_TOKENS = 8
# Whisper features: 100 frames/s; the conv stride and Qwen2-Audio's pooling halve that twice.
EMBEDDINGS_PER_SECOND = 25


def load_clip(fixtures_dir: Path, clip: str) -> np.ndarray:
    audio, rate = sf.read(fixtures_dir / "audio" / f"{clip}.flac", dtype="float32")
    assert rate == SAMPLING_RATE
    return audio


def test_build_is_deterministic_per_seed(tiny_target: Path, tmp_path: Path) -> None:
    again = build_tiny_target(tmp_path / "seed0", seed=0)
    other = build_tiny_target(tmp_path / "seed1", seed=1)
    weights = (tiny_target / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (other / "model.safetensors").read_bytes() != weights
    # Everything but the weights is independent of the seed.
    assert (other / "tokenizer.json").read_bytes() == (tiny_target / "tokenizer.json").read_bytes()


def test_ensure_reuses_and_rebuilds(tmp_path: Path) -> None:
    out = ensure_tiny_target(tmp_path / "t", layers=1)
    stamp = (out / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_target(out, layers=1) == out
    assert (out / "model.safetensors").stat().st_mtime_ns == stamp
    (out / ".complete").unlink()  # an interrupted build: rebuilt, not trusted
    ensure_tiny_target(out, layers=1)
    assert (out / ".complete").is_file()
    ensure_tiny_target(out, layers=2)  # other arguments: rebuilt
    assert json.loads((out / "config.json").read_text())["text_config"]["num_hidden_layers"] == 2


def hub_keys(layers: int, audio_layers: int) -> set[str]:
    """Every tensor name of Qwen2-Audio-7B-Instruct's checkpoint, written out independently of the builder."""
    keys = {
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
        "multi_modal_projector.linear.weight",
        "multi_modal_projector.linear.bias",
        "audio_tower.embed_positions.weight",
        "audio_tower.layer_norm.weight",
        "audio_tower.layer_norm.bias",
    }
    keys |= {f"audio_tower.conv{i}.{p}" for i in (1, 2) for p in ("weight", "bias")}
    for i in range(layers):
        pre = f"language_model.model.layers.{i}."
        keys |= {pre + f"self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias")}
        keys |= {
            pre + "self_attn.o_proj.weight",
            pre + "input_layernorm.weight",
            pre + "post_attention_layernorm.weight",
        }
        keys |= {pre + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    for i in range(audio_layers):
        pre = f"audio_tower.layers.{i}."
        keys |= {pre + f"self_attn.{p}_proj.{w}" for p in "qv" for w in ("weight", "bias")}
        keys |= {pre + "self_attn.k_proj.weight"}  # Whisper's key projection has no bias
        keys |= {pre + f"self_attn.out_proj.{w}" for w in ("weight", "bias")}
        keys |= {
            pre + f"{m}.{w}"
            for m in ("fc1", "fc2", "self_attn_layer_norm", "final_layer_norm")
            for w in ("weight", "bias")
        }
    return keys


def test_checkpoint_has_hub_layout(tiny_target: Path) -> None:
    config = json.loads((tiny_target / "config.json").read_text())
    assert config["architectures"] == ["Qwen2AudioForConditionalGeneration"]
    text = config["text_config"]
    assert text["hidden_size"] // text["num_attention_heads"] == 64
    with safe_open(tiny_target / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        dtypes = {f.get_slice(k).get_dtype() for k in keys}
    assert keys == hub_keys(text["num_hidden_layers"], config["audio_config"]["encoder_layers"])
    assert dtypes == {"BF16"}


def test_tokenizer_and_processor(tiny_target: Path) -> None:
    from transformers import AutoProcessor, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_target)
    vocab = json.loads((tiny_target / "config.json").read_text())["vocab_size"]
    ids = tok.convert_tokens_to_ids(list(SPECIAL_TOKENS))
    assert len(tok) == vocab and ids == list(range(vocab - len(SPECIAL_TOKENS), vocab))
    assert json.loads((tiny_target / "config.json").read_text())[
        "audio_token_index"
    ] == tok.convert_tokens_to_ids(AUDIO_TOKEN)
    eos = json.loads((tiny_target / "generation_config.json").read_text())["eos_token_id"]
    assert eos == tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    for text in (
        "The quick brown fox jumps over the dog.",
        "  leading spaces, tabs\tand\nnew lines\r\n",
        "Prix: 3,50 € — naïve café, Straße, 東京, emoji 🎵🙂, Ωμέγα",
        "odd ascii: ~`!@#$%^&*()_+-={}[]|\\:;\"'<>,.?/ \x01\x7f",
    ):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|im_start|>user") == [tok.convert_tokens_to_ids("<|im_start|>"), *tok.encode("user")]

    processor = AutoProcessor.from_pretrained(tiny_target)
    assert type(processor).__name__ == "Qwen2AudioProcessor"
    assert processor.feature_extractor.feature_size == 128
    assert processor.feature_extractor.sampling_rate == SAMPLING_RATE
    rendered = processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nAudio 1: <|audio_bos|><|AUDIO|><|audio_eos|>\nTranscribe the speech.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    with_system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert processor.apply_chat_template(with_system, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    )


@pytest.fixture(scope="module")
def hf_model(tiny_target: Path) -> Any:
    from transformers import Qwen2AudioForConditionalGeneration

    return Qwen2AudioForConditionalGeneration.from_pretrained(tiny_target, dtype=torch.float32).eval()


def hf_inputs(tiny_target: Path, audio: np.ndarray) -> Any:
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_target)
    text = processor.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return processor(text=text, audio=[audio], sampling_rate=SAMPLING_RATE, return_tensors="pt")


def hf_greedy(model: Any, inputs: Any, n: int) -> list[int]:
    out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def test_transformers_audio_tokens_match_embeddings(
    tiny_target: Path, fixtures_dir: Path, hf_model: Any
) -> None:
    audio = load_clip(fixtures_dir, CLIPS[0])
    inputs = hf_inputs(tiny_target, audio)
    n_tokens = int((inputs["input_ids"] == hf_model.config.audio_token_index).sum())
    with torch.no_grad():
        encoded = hf_model.model.audio_tower(inputs["input_features"]).last_hidden_state
        embeddings = hf_model.model.multi_modal_projector(encoded)
    _, valid = hf_model.model.audio_tower._get_feat_extract_output_lengths(
        inputs["feature_attention_mask"].sum(-1)
    )
    # The tower always sees 30 s of (padded) features; the clip's own embeddings are the first `valid`.
    assert embeddings.shape[-1] == hf_model.config.text_config.hidden_size
    assert n_tokens == int(valid) <= embeddings.shape[1]
    assert abs(n_tokens - len(audio) / SAMPLING_RATE * EMBEDDINGS_PER_SECOND) <= 1

    tokens = hf_greedy(hf_model, inputs, 16)
    assert len(tokens) > 0 and len(set(tokens)) > len(tokens) // 2, tokens  # diverse, not one repeated token
    from transformers import AutoTokenizer

    never = AutoTokenizer.from_pretrained(tiny_target).convert_tokens_to_ids(list(NEVER_GENERATED))
    assert set(never).isdisjoint(tokens)


@pytest.fixture(scope="module")
def vllm_engine(tiny_target: Path) -> Any:
    """One float32 vLLM CPU engine for the module (engine start takes ~30-50 s)."""
    vllm = pytest.importorskip("vllm")
    with pytest.MonkeyPatch.context() as mp:
        # On CPU the KV cache is host memory: 1 GiB is plenty, the default would claim most of the RAM.
        mp.setenv("VLLM_CPU_KVCACHE_SPACE", os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
        llm = vllm.LLM(
            model=str(tiny_target),
            dtype="float32",
            max_model_len=2048,
            gpu_memory_utilization=0.3,
            enforce_eager=True,
            limit_mm_per_prompt={"audio": 1},
            seed=0,
        )
        yield llm
        llm.llm_engine.engine_core.shutdown()


def vllm_greedy(llm: Any, tiny_target: Path, audios: list[np.ndarray], n: int) -> list[list[int]]:
    from transformers import AutoTokenizer
    from vllm import SamplingParams

    prompt = AutoTokenizer.from_pretrained(tiny_target).apply_chat_template(
        PROMPT, add_generation_prompt=True, tokenize=False
    )
    requests = [{"prompt": prompt, "multi_modal_data": {"audio": (a, SAMPLING_RATE)}} for a in audios]
    outputs = llm.generate(requests, SamplingParams(temperature=0.0, max_tokens=n), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def test_vllm_generates_from_audio(vllm_engine: Any, tiny_target: Path, fixtures_dir: Path) -> None:
    tokens = vllm_greedy(vllm_engine, tiny_target, [load_clip(fixtures_dir, c) for c in CLIPS], 16)
    assert all(len(t) > 0 for t in tokens)
    assert len({tuple(t) for t in tokens}) == len(CLIPS), tokens  # the audio changes the answer


def test_vllm_matches_transformers_greedy(
    vllm_engine: Any, hf_model: Any, tiny_target: Path, fixtures_dir: Path
) -> None:
    audio = load_clip(fixtures_dir, CLIPS[1])
    [from_vllm] = vllm_greedy(vllm_engine, tiny_target, [audio], COMPARED_TOKENS)
    assert from_vllm == hf_greedy(hf_model, hf_inputs(tiny_target, audio), COMPARED_TOKENS)
