"""The ASR target's data and audio path: disjoint sentence splits, espeak clips, unpadded encoder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from modeling.asr_target.encoder import clip_features, encode_audio
from modeling.asr_target.sentences import SPLITS, sentences, split_of, vocabulary, written
from modeling.asr_target.speech import TASKS, answer, ensure_dataset, synthesize, trim_silence, utterances
from modeling.targets.qwen2_audio import Qwen2AudioFamily
from pipeline.data.audio import AudioLimits
from pipeline.data.records import read_conversations
from pipeline.data.samples import load_record_audio

needs_espeak = pytest.mark.usefixtures("espeak_ng")  # fails, naming the install command, without it


def test_splits_are_disjoint_and_deterministic() -> None:
    drawn = {s: sentences(s, 300) for s in SPLITS}
    for split, texts in drawn.items():
        assert len(set(texts)) == len(texts) and all(split_of(t) == split for t in texts)
        assert sentences(split, 300) == texts  # the same seed, the same sentences
    assert not (set(drawn["target"]) & set(drawn["eval"])) and not (set(drawn["train"]) & set(drawn["eval"]))
    words = set(vocabulary())
    assert 250 <= len(words) <= 400 and all(set(t.split()) <= words for ts in drawn.values() for t in ts)
    assert written("anna fixed four phones on monday") == "Anna fixed four phones on Monday."
    assert written("can you open my red box today") == "Can you open my red box today?"


def test_task_answers() -> None:
    s = "jack kept twelve cups at school"
    assert answer("transcribe", s) == "Jack kept twelve cups at school."
    assert answer("capitals", s) == "JACK KEPT TWELVE CUPS AT SCHOOL."
    assert answer("last_word", s) == "School." and answer("count", s) == "Six words."
    utts = utterances("eval", 200)
    shares = {t: sum(u.task == t for u in utts) / len(utts) for t in TASKS}
    assert all(abs(shares[t] - w) < 0.1 for t, (w, _) in TASKS.items()), shares
    assert utterances("eval", 200) == utts


def test_trim_silence_cuts_only_silence() -> None:
    tone = np.sin(np.arange(8000) / 5.0).astype(np.float32)
    audio = np.concatenate([np.zeros(6000, np.float32), tone, np.zeros(9000, np.float32)])
    cut = trim_silence(audio)
    assert 8000 <= cut.size < audio.size and np.abs(cut).max() == np.abs(tone).max()


@needs_espeak
def test_dataset_is_a_valid_conversation_file(tmp_path) -> None:
    out = ensure_dataset(tmp_path / "eval", "eval", 3)
    read = read_conversations(out / "data.jsonl")
    assert read.rejected == [] and [r.id for r in read.records] == ["eval-00000", "eval-00001", "eval-00002"]
    for rec, u in zip(read.records, utterances("eval", 3), strict=True):
        (wave,) = load_record_audio(rec, AudioLimits())
        assert 1.0 < wave.shape[0] / 16_000 < 5.0
        assert rec.turns[1].text == u.answer and rec.raw["sentence"] == u.sentence
    info = json.loads((out / "dataset.json").read_text())
    assert info["split"] == "eval" and "eSpeak" in info["espeak"]
    before = (out / "data.jsonl").stat().st_mtime_ns
    assert ensure_dataset(tmp_path / "eval", "eval", 3) == out  # complete: not rebuilt
    assert (out / "data.jsonl").stat().st_mtime_ns == before
    assert ensure_dataset(tmp_path / "eval", "eval", 2) == out  # other arguments: rebuilt
    assert len(read_conversations(out / "data.jsonl").records) == 2


@needs_espeak
@pytest.mark.parametrize("hop", [160, 480])
def test_unpadded_encoder_equals_the_3000_frame_window(tiny_target, hop) -> None:
    """What training runs (first L + 2 mel frames) equals the stock forward over 3000 frames with
    the padding masked, which transformers and vLLM run at inference; at Whisper's hop and at the
    coarser one the SmolLM2 target uses (3000 frames of 30 ms: a 90 s window)."""
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor
    from transformers.masking_utils import create_bidirectional_mask

    from modeling.targets.qwen2_audio import framed

    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_target), dtype=torch.float32).eval()
    extractor = AutoProcessor.from_pretrained(str(tiny_target)).feature_extractor
    family = Qwen2AudioFamily
    if hop != extractor.hop_length:
        extractor = WhisperFeatureExtractor(feature_size=128, hop_length=hop, chunk_length=90, n_fft=2 * hop)
        family = framed(hop)
    waves = [synthesize("anna fixed four phones on the bridge", "en-us", 160), synthesize("the dog is happy", "en-gb", 190)]
    feats = [clip_features(extractor, w) for w in waves]
    audio = family.audio_inputs(extractor, waves)
    full, mask = audio["input_features"], audio["feature_attention_mask"]
    for f, row in zip(feats, full, strict=True):
        np.testing.assert_array_equal(f, row[:, : f.shape[1]])  # the same features, not recomputed differently
    batch = torch.zeros(2, 128, max(f.shape[1] for f in feats))
    for i, f in enumerate(feats):
        batch[i, :, : f.shape[1]] = torch.from_numpy(f)
    with torch.no_grad():
        mine = encode_audio(model, batch, [w.shape[0] for w in waves], family)
        tower = model.model.audio_tower
        lengths, out_lengths = tower._get_feat_extract_output_lengths(torch.from_numpy(mask).sum(-1))
        mask_2d = (torch.arange(1500)[None] < lengths[:, None]).long()
        attn = create_bidirectional_mask(config=tower.config, inputs_embeds=torch.zeros(2, 1500, 1),
                                         attention_mask=mask_2d)
        ref = model.model.multi_modal_projector(tower(torch.from_numpy(full), attention_mask=attn).last_hidden_state)
        ref = torch.cat([ref[i, : int(n)] for i, n in enumerate(out_lengths)])
    assert mine.shape == ref.shape == (sum(family.num_audio_tokens(w.shape[0]) for w in waves), 256)
    assert full.shape[-1] == 3000 and family.num_audio_tokens(waves[0].shape[0]) * hop // 160 in range(
        Qwen2AudioFamily.num_audio_tokens(waves[0].shape[0]) - 3, Qwen2AudioFamily.num_audio_tokens(waves[0].shape[0]) + 4)
    # fp32: only summation order differs (the padded frames never reach a valid output)
    assert float((mine - ref).abs().max()) <= 1e-4 * float(ref.abs().max())
