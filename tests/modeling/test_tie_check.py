"""The tie check scores divergences with the fp32 target: near-ties versus real mismatches."""

from __future__ import annotations

import math

import pytest
import torch

from modeling.target_io.tie_check import TIE_Z, DivergenceCase, TieChecker, first_divergence, noise_bound
from modeling.targets.qwen2_audio import Qwen2AudioFamily
from pipeline.data.audio import AudioLimits
from pipeline.data.records import read_conversations
from pipeline.data.samples import load_record_audio
from pipeline.data.template import ChatTokenizer


def test_first_divergence_and_noise_bound() -> None:
    assert first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert first_divergence([1, 2], [1, 2, 7]) == 2  # one output ended
    sigma, bound = noise_bound(0.02, "bfloat16")
    assert sigma == 0.02 and bound == pytest.approx(TIE_Z * math.sqrt(2) * 0.02)
    assert noise_bound(0.02, "float32")[0] == pytest.approx(0.02 * 2.0**-16)  # unit roundoff 2^-24 vs 2^-8
    assert noise_bound(0.02, "torch.float16")[0] == pytest.approx(0.02 * 2.0**-3)


@pytest.fixture(scope="module")
def checker(tiny_target):
    return TieChecker(tiny_target)


@pytest.fixture(scope="module")
def prompt(tiny_target, fixtures_dir, checker):
    """clip-00's prompt as the benchmark builds it, and 12 greedy fp32 tokens from an independent
    HF generate (its own expansion of the audio placeholder by the processor path)."""
    rec = read_conversations(fixtures_dir / "speech.jsonl").records[0]
    audios = load_record_audio(rec, AudioLimits())
    chat = ChatTokenizer(checker.tokenizer, Qwen2AudioFamily)
    ids = chat.encode(rec.turns, until_turn=1).input_ids.tolist()
    counts = [Qwen2AudioFamily.num_audio_tokens(a.shape[0]) for a in audios]
    expanded = torch.from_numpy(chat.encode(rec.turns, until_turn=1, audio_token_counts=counts).input_ids)[None]
    feats, mask = Qwen2AudioFamily.audio_inputs(checker.extractor, audios).values()
    with torch.inference_mode():
        out = checker.model("fp32").generate(
            input_ids=expanded, attention_mask=torch.ones_like(expanded), input_features=torch.from_numpy(feats),
            feature_attention_mask=torch.from_numpy(mask), max_new_tokens=12, do_sample=False)
    return ids, audios, out[0, expanded.shape[1]:].tolist()


def test_real_mismatch_and_reference_token(checker, prompt) -> None:
    ids, audios, greedy = prompt
    i = 5
    logits = checker.last_logits(checker.expanded(DivergenceCase("c", ids, audios, greedy, greedy), i), audios)
    worst_token = int(logits.argmin())  # the token the fp32 target likes least at position i
    case = DivergenceCase("c", ids, audios, greedy, greedy[:i] + [worst_token] + greedy[i + 1:])
    (d,) = checker.score([case], "bfloat16")
    assert d.position == i and d.token_a == greedy[i] and d.token_b == worst_token
    assert d.top_token == greedy[i]  # same prefix and audio expansion as HF's own generate
    assert d.noise_sigma > 0 and not d.numerical_tie and d.logit_gap > 10 * d.bound
    # the same divergence in an fp32 engine: the bound shrinks with the unit roundoff
    (d32,) = checker.score([case], "float32")
    assert d32.bound == pytest.approx(d.bound * 2.0**-16) and not d32.numerical_tie
    # equal outputs: nothing to score
    assert checker.score([DivergenceCase("e", ids, audios, greedy, list(greedy))], "bfloat16") == []


def test_a_tie_is_a_tie(checker, prompt) -> None:
    """Swap the argmax for the runner-up where the fp32 gap is smallest: a tie exactly when both
    tokens lie within the stated bound of the top logit (the rule, applied to the returned numbers)."""
    ids, audios, greedy = prompt
    best = None
    for i in range(len(greedy)):
        case = DivergenceCase("c", ids, audios, greedy, greedy)
        logits = checker.last_logits(checker.expanded(case, i), audios)
        top2 = logits.topk(2)
        gap = float(top2.values[0] - top2.values[1])
        if best is None or gap < best[0]:
            best = (gap, i, int(top2.indices[1]))
    gap, i, runner_up = best
    (d,) = checker.score([DivergenceCase("c", ids, audios, greedy, greedy[:i] + [runner_up])], "bfloat16")
    assert d.logit_gap == pytest.approx(gap, abs=1e-4)
    assert d.numerical_tie == (gap <= d.bound)
