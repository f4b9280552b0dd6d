"""Our segment-wise chat template equals the model's own template and processor, token for token."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modeling.targets.base import render_text as render_family_text
from modeling.targets.qwen2_audio import Qwen2AudioFamily
from pipeline.data.records import read_conversations
from pipeline.data.samples import prepare_sample
from pipeline.data.template import ChatTokenizer, format_sample

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture(scope="module")
def processor(tiny_target):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(tiny_target))


@pytest.fixture(scope="module")
def records():
    result = read_conversations(DATA / "speech.jsonl")
    assert not result.rejected
    return result.records


def test_render_equals_jinja_template(processor, records):
    for record in records:
        msgs = record.raw["conversations"]
        assert render_family_text(Qwen2AudioFamily, record.turns) == processor.apply_chat_template(msgs, tokenize=False), record.id
        assert render_family_text(Qwen2AudioFamily, record.turns[:1], add_generation_prompt=True) == processor.apply_chat_template(
            msgs[:1], tokenize=False, add_generation_prompt=True
        )


def test_ids_equal_processor_with_audio_expanded(processor, records):
    chat = ChatTokenizer(processor.tokenizer, Qwen2AudioFamily)
    for record in records:
        sample = prepare_sample(record, chat)
        text = processor.apply_chat_template(record.raw["conversations"], tokenize=False)
        kwargs = {"audio": sample.waveforms, "sampling_rate": 16000} if sample.waveforms else {}
        ref = processor(text=text, return_tensors="np", **kwargs)
        assert sample.encoded.input_ids.tolist() == ref["input_ids"][0].tolist(), record.id
        for (start, end), wave in zip(sample.encoded.audio_spans, sample.waveforms, strict=True):
            assert end - start == Qwen2AudioFamily.num_audio_tokens(wave.shape[0])
            assert (sample.encoded.input_ids[start:end] == chat.audio_token_id).all()
        if sample.waveforms:
            feats, mask = Qwen2AudioFamily.audio_inputs(processor.feature_extractor, sample.waveforms).values()
            np.testing.assert_array_equal(feats, ref["input_features"])
            np.testing.assert_array_equal(mask, ref["feature_attention_mask"])


def test_audio_token_count_matches_encoder(tiny_target, processor, records):
    """The expansion must equal what the target's own audio tower emits for the clip."""
    import torch
    from transformers import Qwen2AudioForConditionalGeneration

    model = Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_target), dtype=torch.float32).eval()
    chat = ChatTokenizer(processor.tokenizer, Qwen2AudioFamily)
    for record in records[:3]:
        sample = prepare_sample(record, chat)
        feats, mask = Qwen2AudioFamily.audio_inputs(processor.feature_extractor, sample.waveforms).values()
        _, out_lengths = model.model.audio_tower._get_feat_extract_output_lengths(torch.from_numpy(mask).sum(-1))
        spans = sample.encoded.audio_spans
        assert out_lengths.tolist() == [e - s for s, e in spans], record.id
        # the model's own merge checks that audio features and <|AUDIO|> tokens agree in number
        with torch.no_grad():
            model(input_ids=torch.from_numpy(sample.encoded.input_ids)[None],
                  input_features=torch.from_numpy(feats), feature_attention_mask=torch.from_numpy(mask))
        bad_ids = torch.from_numpy(sample.encoded.input_ids)[None]
        bad_ids = torch.cat([bad_ids[:, : spans[0][0] + 1], bad_ids[:, spans[0][0]:]], dim=1)  # one too many
        with pytest.raises(ValueError):
            model(input_ids=bad_ids, input_features=torch.from_numpy(feats),
                  feature_attention_mask=torch.from_numpy(mask))


def test_loss_mask_covers_answers_and_end_token(processor, records):
    chat = ChatTokenizer(processor.tokenizer, Qwen2AudioFamily)
    two_turn = next(r for r in records if sum(t.role == "assistant" for t in r.turns) == 2)
    enc = chat.encode(two_turn.turns, audio_token_counts=[5] * len(two_turn.audio_paths))
    assert len(enc.answer_spans) == 2
    for turn, start, end in enc.answer_spans:
        answer = processor.tokenizer.decode(enc.input_ids[start:end].tolist(), skip_special_tokens=False)
        assert answer == two_turn.turns[turn].text + "<|im_end|>"
    masked = sum(end - start for _, start, end in enc.answer_spans)
    assert int(enc.loss_mask.sum()) == masked
    view = format_sample(processor.tokenizer, enc, color=False)
    assert f"[[{two_turn.turns[-1].text}<|im_end|>]]" in view and "[AUDIO x 5]" in view


def test_generated_ids_used_verbatim(processor, records):
    chat = ChatTokenizer(processor.tokenizer, Qwen2AudioFamily)
    record = records[0]
    answer = record.turns[-1]
    stopped = [5, 6, 7, chat.im_end_id]
    answer.token_ids = stopped
    enc = chat.encode(record.turns, audio_token_counts=[3])
    (_, start, end) = enc.answer_spans[0]
    assert enc.input_ids[start:end].tolist() == stopped and enc.loss_mask[start:end].all()
    answer.token_ids = [5, 6, 7]  # cut by max_new_tokens: closing token added without loss
    enc = chat.encode(record.turns, audio_token_counts=[3])
    (_, start, end) = enc.answer_spans[0]
    assert enc.input_ids[start:end].tolist() == [5, 6, 7, chat.im_end_id]
    assert enc.loss_mask[start:end].tolist() == [1, 1, 1, 0]
    answer.token_ids = None


def test_split_long_audio_gives_one_placeholder_per_piece(processor, records, tmp_path):
    import soundfile as sf

    from pipeline.data.audio import AudioLimits
    from pipeline.data.records import read_conversations

    speech, _ = sf.read(DATA / "audio" / "clip-00.flac", dtype="float32")
    long_clip = np.tile(speech, int(65 * 16000 / speech.shape[0]) + 1)[: 65 * 16000]  # 65 s
    sf.write(tmp_path / "long.flac", long_clip, 16000)
    line = {"id": "long", "conversations": [
        {"role": "user", "content": [{"type": "audio", "audio": "long.flac"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "ok"}]}
    (tmp_path / "long.jsonl").write_text(__import__("json").dumps(line) + "\n")
    limits = AudioLimits(split_long=True)
    (record,) = read_conversations(tmp_path / "long.jsonl", audio_limits=limits).records
    sample = prepare_sample(record, ChatTokenizer(processor.tokenizer, Qwen2AudioFamily), limits=limits)
    assert [w.shape[0] for w in sample.waveforms] == [480000, 480000, 80000]
    assert [e - s for s, e in sample.encoded.audio_spans] == [Qwen2AudioFamily.num_audio_tokens(w.shape[0]) for w in sample.waveforms]
