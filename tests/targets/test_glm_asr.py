"""The GLM-ASR family on a tiny random checkpoint: build, chat template and loss mask, audio token counts,
capture hooks. vLLM is in test_glm_asr_vllm.py."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from glm_asr_helpers import (  # the glm_* are the GLM-ASR fixtures
    CLIPS,
    FAMILY,
    REPO,
    encode,
    glm_hf_fp32,  # noqa: F401
    glm_processor,  # noqa: F401
    glm_records,  # noqa: F401
    glm_target,  # noqa: F401
    load_clip,
    long_clip,
    loss_runs,
    record_waves,
    render,
    two_clip_turns,
)
from safetensors import safe_open

from modeling.targets.glm_asr import AUDIO_TOKEN
from modeling.targets.glm_asr_tiny import NEVER_GENERATED, SPECIAL_TOKENS, build_tiny, is_complete
from pipeline.data.records import Turn

# ---- the build -------------------------------------------------------------------------------------------

def hub_keys(layers: int, audio_layers: int) -> set[str]:
    """Every tensor name of GLM-ASR-Nano's Hub layout, written out independently of the builder."""
    keys = {"language_model.model.embed_tokens.weight", "language_model.model.norm.weight",
            "language_model.lm_head.weight", "audio_tower.norm.weight", "audio_tower.norm.bias"}
    keys |= {f"multi_modal_projector.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    keys |= {f"audio_tower.conv{i}.{w}" for i in (1, 2) for w in ("weight", "bias")}
    for i in range(layers):
        pre = f"language_model.model.layers.{i}."
        keys |= {pre + f"self_attn.{p}_proj.weight" for p in "qkvo"}
        keys |= {pre + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
        keys |= {pre + "input_layernorm.weight", pre + "post_attention_layernorm.weight"}
    for i in range(audio_layers):
        pre = f"audio_tower.layers.{i}."
        keys |= {pre + f"self_attn.{p}_proj.{w}" for p in "qvo" for w in ("weight", "bias")}
        keys |= {pre + "self_attn.k_proj.weight"}  # the key projection has no bias
        keys |= {pre + f"{m}.{w}" for m in ("mlp.fc1", "mlp.fc2", "input_layernorm", "post_attention_layernorm")
                 for w in ("weight", "bias")}
    return keys


def test_checkpoint_layout_and_config(target: Path, processor: Any) -> None:
    config = json.loads((target / "config.json").read_text())
    text, audio = FAMILY.text_config(config), config["audio_config"]
    assert config["architectures"] == list(FAMILY.architectures)
    assert text["head_dim"] == 64 and text["hidden_size"] == 256 and text["num_hidden_layers"] == 8
    assert audio["intermediate_size"] == 4 * audio["hidden_size"]
    assert config["tie_word_embeddings"] is config["text_config"]["tie_word_embeddings"] is False
    with safe_open(target / "model.safetensors", framework="pt") as f:
        keys = set(f.keys())
        assert {f.get_slice(k).get_dtype() for k in keys} == {"BF16"}
        head = f.get_tensor(FAMILY.lm_head_key(config))
    assert keys == hub_keys(text["num_hidden_layers"], audio["num_hidden_layers"])
    assert FAMILY.embedding_key(config) in keys
    tok = processor.tokenizer
    vocab = text["vocab_size"]
    assert len(tok) == vocab and tok.convert_tokens_to_ids(list(SPECIAL_TOKENS)) == list(range(vocab - 8, vocab))
    assert config["audio_token_id"] == tok.convert_tokens_to_ids(AUDIO_TOKEN) == processor.audio_token_id
    assert not head[tok.convert_tokens_to_ids(list(NEVER_GENERATED))].any() and head.float().std() > 0.05
    gen = json.loads((target / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.convert_tokens_to_ids(list(FAMILY.end_tokens)) == config["text_config"][
        "eos_token_id"]
    assert tok.pad_token == FAMILY.special_tokens["pad"] and tok.pad_token_id != config["audio_token_id"]
    for sample in ("The quick brown fox jumps over the dog.", "  tabs\tand\nnew lines, café 東京 🎵"):
        assert tok.decode(tok.encode(sample, add_special_tokens=False)) == sample
    mismatched = {**config, "tie_word_embeddings": True}
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        FAMILY.text_config(mismatched)
    tied = {**mismatched, "text_config": {**config["text_config"], "tie_word_embeddings": True}}
    assert FAMILY.lm_head_key(tied) is None
    # a text_config that lists only some fields gets what transformers' GlmAsrConfig fills in
    from transformers import GlmAsrConfig

    ref = GlmAsrConfig(tie_word_embeddings=False).text_config
    expected = {k: getattr(ref, k) for k in text if k != "rope_theta"}
    assert FAMILY.text_config({"tie_word_embeddings": False, "text_config": {}}) == {
        **expected, "rope_theta": ref.rope_parameters["rope_theta"]}
    with pytest.raises(ValueError, match="no text_config"):  # the class would silently build its default model
        FAMILY.text_config({"tie_word_embeddings": False})


def test_build_is_deterministic_per_seed_and_atomic(tmp_path: Path) -> None:
    small = {"layers": 1, "vocab": 400}
    a = build_tiny(tmp_path / "a", **small)
    b = build_tiny(tmp_path / "b", **small)
    c = build_tiny(tmp_path / "c", **small, seed=1)
    weights = (a / "model.safetensors").read_bytes()
    assert (b / "model.safetensors").read_bytes() == weights != (c / "model.safetensors").read_bytes()
    assert (c / "tokenizer.json").read_bytes() == (a / "tokenizer.json").read_bytes()
    assert is_complete(a, **small) and not is_complete(a, **small, seed=1)
    # no temporary directories left (the builders' lock files beside each output stay, by design)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["a", "b", "c"]
    out = subprocess.run([sys.executable, "-m", "pipeline.tools.tiny_target", "--family", "glm-asr", "--out", str(tmp_path / "cli"),
                          "--layers", "1", "--vocab", "400"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "cli" / "model.safetensors").read_bytes() == weights



def test_transformers_loads_the_hub_layout_and_generates(target: Path, processor: Any) -> None:
    from transformers import GlmAsrForConditionalGeneration

    _, info = GlmAsrForConditionalGeneration.from_pretrained(str(target), output_loading_info=True)
    assert not any(info.values()), info  # every Hub key mapped, nothing missing or left over
    model = FAMILY.load_model(target, "bf16")
    assert model.dtype == torch.bfloat16 and not any(p.requires_grad for p in model.parameters())
    assert not model.training and len(FAMILY.decoder(model).layers) == 8
    assert model.lm_head.weight.data_ptr() != FAMILY.decoder(model).embed_tokens.weight.data_ptr()  # untied
    with pytest.raises(ValueError, match="dtype"):
        FAMILY.load_model(target, "fp16")


# ---- chat template ---------------------------------------------------------------------------------------

def test_render_equals_the_processor_template(processor: Any, records: list[Any]) -> None:
    end = FAMILY.special_tokens["turn_end"]
    jinja = partial(processor.apply_chat_template, tokenize=False)
    for record in records:
        msgs, turns = record.raw["conversations"], record.turns
        # the template renders nothing after the last answer; the segments close it with <|user|>
        assert turns[-1].role == "assistant" and render(turns) == jinja(msgs) + end, record.id
        for i, turn in enumerate(turns):
            if turn.role == "assistant":  # the generation prompt of every assistant turn
                prompt = render(turns, until_turn=i)
                assert prompt == jinja(msgs[:i], add_generation_prompt=True), (record.id, i)
                # what the model must produce there: the answer and its closing <|user|>
                assert jinja(msgs[: i + 2]).startswith(prompt + turn.text.strip() + end) or i + 1 == len(msgs)
        assert render(turns, until_turn=len(turns) - 1) == jinja(msgs[:-1], add_generation_prompt=True)


def test_render_trims_like_jinja_and_takes_a_system_prompt(processor: Any) -> None:
    from pipeline.data.records import parse_record

    msgs = [{"role": "user", "content": [{"type": "text", "text": "  \n"}, {"type": "audio", "audio": "a.wav"}]},
            {"role": "assistant", "content": "  spaced answer \n"},
            {"role": "user", "content": [{"type": "audio", "audio": "a.wav"},
                                         {"type": "text", "text": " and this? "}]}]
    _, turns = parse_record({"conversations": msgs}, base=Path("/"), require_assistant=True)
    jinja = partial(processor.apply_chat_template, tokenize=False)
    assert render(turns) == jinja(msgs)  # ends with a user turn: no turn-end left over
    assert render(turns, until_turn=3) == jinja(msgs, add_generation_prompt=True)
    assert render(turns, system_prompt=" Be brief. ") == jinja([{"role": "system", "content": "Be brief."}, *msgs])
    assert [s.text for s in FAMILY.render_segments(turns) if s.kind == "answer"] == ["spaced answer"]
    with pytest.raises(ValueError, match="closes answers"):
        FAMILY.render_segments([*turns[:2], turns[1]])


def test_ids_and_loss_mask_equal_the_processor(processor: Any, records: list[Any]) -> None:
    tok = processor.tokenizer
    end = FAMILY.special_tokens["turn_end"]
    for record in records:
        waves = record_waves(record)
        ids, mask = encode(tok, record.turns, waves)
        text = processor.apply_chat_template(record.raw["conversations"], tokenize=False) + end
        ref = processor(text=text, **({"audio": waves} if waves else {}))
        assert ids == ref["input_ids"][0].tolist(), record.id  # audio expanded exactly as the processor does
        answers = [t for t in record.turns if t.role == "assistant"]
        assert [tok.decode(run) for run in loss_runs(ids, mask)] == [t.text.strip() + end for t in answers]
        if waves:
            ours = FAMILY.audio_inputs(processor.feature_extractor, waves)
            np.testing.assert_array_equal(ours["input_features"], ref["input_features"].numpy())
            np.testing.assert_array_equal(ours["input_features_mask"], ref["input_features_mask"].numpy())


# ---- audio token counts ----------------------------------------------------------------------------------

def test_audio_token_counts_equal_the_encoder_output(processor: Any, hf_fp32: Any) -> None:
    rng = np.random.default_rng(0)
    # window edges: one frame is 160 samples; conv2 halves, the merge takes 4 of those
    lengths = [1, 160, 161, 1119, 1120, 1280, 16_000, 479_999, 480_000]
    waves = [load_clip(c) for c in CLIPS] + [rng.uniform(-0.5, 0.5, n).astype(np.float32) for n in lengths]
    waves += [long_clip(30.5), long_clip(45.3)]  # two windows: the last one partial
    audio_id = processor.audio_token_id
    for wave in waves:
        n = FAMILY.num_audio_tokens(wave.shape[0])
        inputs = {k: torch.from_numpy(v) for k, v in FAMILY.audio_inputs(processor.feature_extractor, [wave]).items()}
        assert inputs["input_features"].shape[0] == -(-wave.shape[0] // 480_000)  # one row per window
        with torch.no_grad():
            embeds = hf_fp32.model.get_audio_features(**inputs).pooler_output
        ref = processor(text=AUDIO_TOKEN, audio=[wave])
        assert embeds.shape[0] == n == int((ref["input_ids"] == audio_id).sum()), wave.shape[0]
        assert abs(n - wave.shape[0] / 16_000 * 12.5) <= inputs["input_features"].shape[0]  # 12.5 tokens/s
    assert FAMILY.num_audio_tokens(480_000) == 375
    # the longest clip: the processor's 21 windows, 7875 tokens, within the decoder's 8192 positions
    longest = int(FAMILY.max_audio_seconds * 16_000)
    assert FAMILY.num_audio_tokens(longest) == 21 * 375 < 8192
    with pytest.raises(ValueError, match="exceeds"):
        FAMILY.num_audio_tokens(longest + 1)  # the processor would silently truncate it


# ---- capture hooks ---------------------------------------------------------------------------------------

CAPTURE_IDS = ["clip-00", "text-00", "multi-00", "multi-02"]  # audio, text only, multi-turn, system turn


@pytest.fixture(scope="module")
def capture_samples(records: list[Any]) -> list[tuple[str, list[Turn], list[np.ndarray]]]:
    by_id = {r.id: r for r in records}
    out = [(i, by_id[i].turns, record_waves(by_id[i])) for i in CAPTURE_IDS]
    return [*out, ("two-clips", two_clip_turns(), [load_clip("clip-03"), load_clip("clip-04")])]


def test_capture_hooks_equal_output_hidden_states_bit_exact(target: Path, processor: Any,
                                                            capture_samples: list[Any]) -> None:
    """Hooks on ``decoder(model)`` (pre-hook: inputs_embeds; layer outputs) and ``inner_forward`` at bf16,
    batch size 1, against an independent model instance's ``output_hidden_states=True`` forward."""
    model, reference = FAMILY.load_model(target, "bf16"), FAMILY.load_model(target, "bf16")
    decoder = FAMILY.decoder(model)
    aux_layers = [1, 3, 4]  # output convention: hidden_states[i + 1]
    acts: dict[str, torch.Tensor] = {}
    hooks = [decoder.register_forward_pre_hook(lambda m, a, kw: acts.__setitem__("embeds", kw["inputs_embeds"]),
                                               with_kwargs=True)]
    for k, layer in enumerate(aux_layers):
        hooks.append(decoder.layers[layer].register_forward_hook(
            lambda m, a, out, k=k: acts.__setitem__(f"aux{k}", out[0] if isinstance(out, tuple) else out)))
    audio_id = processor.audio_token_id
    try:
        for name, turns, waves in capture_samples:
            ids, _ = encode(processor.tokenizer, turns, waves)
            input_ids = torch.tensor([ids])
            audio = FAMILY.audio_inputs(processor.feature_extractor, waves)  # numpy, fp32: inner_forward casts
            with torch.no_grad():
                last = FAMILY.inner_forward(model, input_ids, torch.ones_like(input_ids), **audio)
                # the reference featurizes on its own (the extractor's defaults, 30 s padding)
                ref_audio = {}
                if waves:
                    f = processor.feature_extractor(waves, sampling_rate=16_000, return_attention_mask=True,
                                                    padding="max_length", return_tensors="pt")
                    ref_audio = {"input_features": f["input_features"].to(torch.bfloat16),
                                 "input_features_mask": f["attention_mask"]}
                hs = reference(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               output_hidden_states=True, **ref_audio).hidden_states
            assert len(hs) == len(decoder.layers) + 1
            assert torch.equal(acts["embeds"], hs[0]), name
            for k, layer in enumerate(aux_layers):
                assert torch.equal(acts[f"aux{k}"], hs[layer + 1]), (name, layer)
            assert torch.equal(last, hs[-1]), name
            if waves:  # the audio positions hold the projector output, not the <|pad|> embedding
                at_audio = acts["embeds"][0, input_ids[0] == audio_id]
                assert at_audio.shape[0] == sum(FAMILY.num_audio_tokens(w.shape[0]) for w in waves)
                assert not torch.equal(at_audio[0], decoder.embed_tokens.weight[audio_id])
            acts.clear()
    finally:
        for h in hooks:
            h.remove()
