"""Hook capture on the real tiny Qwen2-Audio: equal to the stock HF forward, bit for bit at batch size 1."""

from __future__ import annotations

import json

import pytest
import torch

from modeling.target_io.capture import (
    TargetCapture,
    aux_layer_ids,
    load_target_model,
    loss_positions,
    plan_batches,
)
from modeling.targets.qwen2_audio import Qwen2AudioFamily
from pipeline.data.records import read_conversations
from pipeline.data.samples import load_target_processor, prepare_sample
from pipeline.data.template import ChatTokenizer

PICK = ["clip-00", "text-00", "multi-00", "multi-02", "two-clips"]  # audio, text only, multi-turn, system


@pytest.fixture(scope="module")
def samples(tmp_path_factory, fixtures_dir, tiny_target):
    """Prepared fixture samples plus one record with two clips (spans and clip order matter)."""
    lines = (fixtures_dir / "speech.jsonl").read_text().splitlines()
    audio = fixtures_dir / "audio"
    two = {"id": "two-clips", "conversations": [
        {"role": "user", "content": [{"type": "audio", "audio": str(audio / "clip-03.flac")},
                                     {"type": "text", "text": "and"},
                                     {"type": "audio", "audio": str(audio / "clip-04.flac")}]},
        {"role": "assistant", "content": "She sells sea shells. A cup of warm tea."}]}
    path = tmp_path_factory.mktemp("capture") / "in.jsonl"
    rows = [json.loads(line) for line in lines]
    for row in rows:  # absolute audio paths: the jsonl lives elsewhere now
        for turn in row["conversations"]:
            for part in turn["content"] if isinstance(turn["content"], list) else []:
                if "audio" in part:
                    part["audio"] = str(fixtures_dir / part["audio"])
    path.write_text("".join(json.dumps(r) + "\n" for r in [*rows, two]))
    records = {r.id: r for r in read_conversations(path).records}
    tokenizer, _ = load_target_processor(tiny_target)
    chat = ChatTokenizer(tokenizer, Qwen2AudioFamily)
    return [prepare_sample(records[i], chat) for i in PICK]


@pytest.fixture(scope="module")
def capture(tiny_target):
    tokenizer, extractor = load_target_processor(tiny_target)
    model = load_target_model(tiny_target, "bf16")
    out_ids, _ = aux_layer_ids(model.config.text_config.num_hidden_layers)
    with TargetCapture(model, Qwen2AudioFamily, extractor, aux_layers=out_ids, pad_token_id=tokenizer.pad_token_id,
                       audio_token_id=model.config.audio_token_id) as cap:
        yield cap


def test_aux_layer_ids_both_conventions():
    assert aux_layer_ids(32) == ([1, 15, 28], [2, 16, 29])  # SGLang/SpecForge vs vLLM/EAGLE ids
    assert aux_layer_ids(8, "auto") == ([1, 3, 4], [2, 4, 5])
    assert aux_layer_ids(8, " 0, 2,6 ") == ([0, 2, 6], [1, 3, 7])
    assert aux_layer_ids(8, [2, 3, 5]) == ([2, 3, 5], [3, 4, 6])
    for bad in ["1,2", "1,2,7", "-1,2,3", "3,2,4", "a,b,c", "1,1,2"]:
        with pytest.raises(ValueError, match="aux-layers"):
            aux_layer_ids(8, bad)


def test_plan_batches_respects_the_token_budget():
    lengths = [50, 400, 120, 120, 900, 30, 260]
    plan = plan_batches(lengths, 500)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    for batch in plan:
        width = max(lengths[i] for i in batch)
        assert len(batch) * width <= 500 or len(batch) == 1
    assert [4] in plan  # longer than the budget: alone
    assert plan == plan_batches(lengths, 500) and plan[0] == [4]  # deterministic, longest first
    assert plan_batches(lengths, 1) == [[i] for i in sorted(range(7), key=lambda i: -lengths[i])]


def _check_exact(captured, sample, hs, aux_ids):
    for k, layer in enumerate(aux_ids):
        assert torch.equal(captured.aux_hidden[:, k], hs[layer + 1]), f"aux layer {layer}"
    positions = captured.last_hidden_positions
    assert torch.equal(captured.last_hidden, hs[-1][positions])
    spans = sample.encoded.audio_spans
    assert captured.audio_spans == [tuple(s) for s in spans]
    expect_audio = torch.cat([hs[0][s:e] for s, e in spans]) if spans else hs[0][:0]
    assert torch.equal(captured.audio_embeds, expect_audio)


def test_batch_size_one_is_bit_exact(capture, samples, hf_hidden_states):
    placeholder = capture.model.get_input_embeddings().weight[capture.model.config.audio_token_id]
    for sample in samples:
        (got,) = capture.capture([sample])
        got.validate(hidden_size=256, num_aux_layers=3)
        assert got.id == sample.record.id and got.source_hash == sample.record.source_hash
        assert torch.equal(got.input_ids, torch.from_numpy(sample.encoded.input_ids))
        assert got.meta["num_tokens"] == sample.length and got.meta["num_loss_tokens"] == got.num_loss_tokens
        _check_exact(got, sample, hf_hidden_states(sample), capture.aux_layers)
        assert torch.equal(got.last_hidden_positions, loss_positions(torch.from_numpy(sample.encoded.loss_mask)))
        # next token of every stored position carries loss
        assert bool(got.loss_mask[got.last_hidden_positions + 1].all())
        if sample.waveforms:  # the projector output, not the <|AUDIO|> placeholder's embedding
            assert not torch.equal(got.audio_embeds[0], placeholder)
    two = samples[PICK.index("two-clips")]
    assert len(two.encoded.audio_spans) == 2


def _errors(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    diff = (got.float() - ref.float()).abs()
    return float(diff.mean()), float(diff.max())


def test_mixed_batch_matches_to_bf16_tolerance(capture, samples, hf_hidden_states):
    """Batched bf16 vs an fp32 reference, judged against what batch size 1 in bf16 achieves vs the
    same reference: a padded batch changes matmul blocking (with native bf16 the rounding too),
    not the size of the error. The bounds are ratios to the same-test batch-1 error, so they hold
    whether this CPU rounds bf16 natively or emulates it."""
    lengths = [s.length for s in samples]
    assert max(lengths) > 2.5 * min(lengths)  # short text-only next to long multi-turn audio
    batch = capture.capture(samples)
    ratios = []
    for sample, got in zip(samples, batch, strict=True):
        ref, single = hf_hidden_states(sample, torch.float32), hf_hidden_states(sample)  # fp32 / bf16, batch 1
        assert got.num_tokens == sample.length  # no padding stored
        pos = got.last_hidden_positions
        pairs = [(f"aux {layer}", got.aux_hidden[:, k], ref[layer + 1], single[layer + 1])
                 for k, layer in enumerate(capture.aux_layers)]
        pairs.append(("last", got.last_hidden, ref[-1][pos], single[-1][pos]))
        if sample.waveforms:
            spans = sample.encoded.audio_spans
            pairs.append(("audio", got.audio_embeds, *(torch.cat([h[0][s:e] for s, e in spans]) for h in (ref, single))))
        for what, value, fp32, bs1 in pairs:
            (mean, peak), (mean1, peak1) = _errors(value, fp32), _errors(bs1, fp32)
            floor = 2**-9 * float(fp32.float().abs().mean())  # below one bf16 rounding step: exact enough
            ratios.append((mean / max(mean1, floor), f"{sample.record.id} {what}"))
            assert mean <= 2 * max(mean1, floor), f"{sample.record.id} {what}: mean error {mean:.3g} vs batch-1 {mean1:.3g}"
            assert peak <= 4 * max(peak1, floor), f"{sample.record.id} {what}: max error {peak:.3g} vs batch-1 {peak1:.3g}"
    print(f"\nbatched / batch-1 mean error vs fp32: max {max(ratios)[0]:.2f} ({max(ratios)[1]})")


def test_last_hidden_all_and_fp32_target(tiny_target, samples, hf_hidden_states):
    tokenizer, extractor = load_target_processor(tiny_target)
    model = load_target_model(tiny_target, "fp32")
    sample = samples[PICK.index("multi-02")]
    with TargetCapture(model, Qwen2AudioFamily, extractor, aux_layers=[0, 2, 6], pad_token_id=tokenizer.pad_token_id,
                       audio_token_id=model.config.audio_token_id,
                       last_hidden="all") as cap:
        (got,) = cap.capture([sample])
    hs = [h.to(torch.bfloat16) for h in hf_hidden_states(sample, torch.float32)]
    assert got.aux_hidden.dtype == torch.bfloat16  # fp32 compute, bf16 storage
    assert torch.equal(got.last_hidden_positions, torch.arange(sample.length))
    _check_exact(got, sample, hs, [0, 2, 6])
    assert not any(layer._forward_hooks for layer in model.model.language_model.layers)  # closed
