"""The encoder's hearing check: CTC over the LLM's tokens of the prompts decodes back to the prompt, the
loss ranks a right alignment far below a wrong one, a word no prompt uses is refused by name, and the
packed layout (the prompt's tokens in the first rows) and the repeat layout (each token over its spoken
span) are what the align loss and the readback check ask for."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from modeling.smol_audio.hearing import PromptVocab, TokenCTCHead, hearing_wer
from modeling.smol_audio.prompts import all_prompts


@pytest.fixture(scope="module")
def vocab(smol_target: Path) -> PromptVocab:
    from transformers import AutoTokenizer

    return PromptVocab(AutoTokenizer.from_pretrained(str(smol_target)))


def _head_reading(vocab: PromptVocab, texts: list[str], frames_per_label: int = 3) -> tuple[TokenCTCHead, torch.Tensor, list[int]]:
    """A head whose projection reads one-hot 'audio' rows: each label held for a few frames, then a blank."""
    size = len(vocab.llm_ids) + 1
    head = TokenCTCHead(size, vocab)
    with torch.no_grad():
        head.proj.weight.copy_(torch.eye(size) * 30)
        head.proj.bias.zero_()
    rows, counts = [], []
    for text in texts:
        seq = [k for label in vocab.labels(text) for k in [label] * frames_per_label + [0]]
        rows.append(torch.nn.functional.one_hot(torch.tensor(seq), size).float())
        counts.append(len(seq))
    return head, torch.cat(rows), counts


def test_every_prompt_has_labels_and_greedy_decoding_gives_it_back(vocab):
    texts = [p.text for p in all_prompts()[::97]]
    head, audio, counts = _head_reading(vocab, texts)
    assert head.greedy_texts(audio, counts) == texts
    assert all(0 < len(vocab.labels(p.text)) <= 12 for p in all_prompts())
    assert hearing_wer(lambda a, c: (a, c), head, [(audio, counts, texts)]) == 0.0


def test_loss_ranks_the_right_transcript_below_a_wrong_one(vocab):
    texts = ["What is a volcano?", "Give me three tips for saving money."]
    head, audio, counts = _head_reading(vocab, texts)
    right = float(head(audio, counts, texts).detach())
    wrong = float(head(audio, counts, list(reversed(texts))).detach())
    assert right < 0.01 < 10 * right + 1 < wrong


def test_a_word_no_prompt_uses_is_refused_by_name(vocab):
    with pytest.raises(ValueError, match="quantum"):
        vocab.labels("What is quantum chromodynamics?")


def test_spikes_are_where_each_token_starts_on_the_best_path(vocab):
    from modeling.smol_audio.hearing import ctc_spikes

    text = "What is a glacier?"
    head, audio, counts = _head_reading(vocab, [text])
    logp = head.log_probs(audio, counts)[0]
    assert ctc_spikes(logp, vocab.labels(text)) == [4 * k for k in range(len(vocab.labels(text)))]
    # a repeated label needs a blank between its two spikes; the path still finds both
    repeated = vocab.labels("What is a a glacier?")
    seq = [0] + [k for label in repeated for k in (label, label, 0)]
    size = len(vocab.llm_ids) + 1
    one_hot = torch.nn.functional.one_hot(torch.tensor(seq), size).float()
    spikes = ctc_spikes(torch.log_softmax(head.proj(one_hot), -1), repeated)
    assert spikes == [1 + 3 * k for k in range(len(repeated))]
    with pytest.raises(ValueError, match="cannot hold"):
        ctc_spikes(logp[:2], vocab.labels(text))


def test_packed_layout_targets_and_readback(vocab, smol_target):
    """The packed layout puts the prompt's tokens in the first rows and the filler after; rows that are
    those exact embeddings read back as the prompt, rows shifted by one do not, and a clip too short for
    its prompt is refused by name."""
    from safetensors import safe_open

    from modeling.smol_audio.hearing import readback
    from modeling.smol_audio.train import align_loss, align_targets

    with safe_open(str(smol_target / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        table = f.get_tensor(key).float()
    texts, counts = ["What is a glacier?", "Give me three tips for saving money."], [12, 15]
    filler = vocab.ids_of(" ")[0]
    head = TokenCTCHead(table.shape[1], vocab)
    ids, word = align_targets(torch.zeros(sum(counts), table.shape[1]), counts, texts, head, filler, "packed")
    for text, n, start in zip(texts, counts, (0, counts[0]), strict=True):
        prompt = vocab.ids_of(text)
        assert ids[start: start + n].tolist() == prompt + [filler] * (n - len(prompt))
        assert word[start: start + n].tolist() == [True] * len(prompt) + [False] * (n - len(prompt))
    exact = table[ids]
    norm = float((table**2).sum(-1).mean())
    shifted = torch.cat([table[ids][1:], table[ids][:1]])

    def loss(rows: torch.Tensor, ce_weight: float) -> float:
        return float(align_loss(rows, counts, texts, head, table, filler, norm, "packed", ce_weight))

    assert loss(exact, 0.0) == 0.0 and loss(shifted, 0.0) > 0.5
    # the cross-entropy is not zero at exact rows (some prompt tokens' rows lie close together), but it
    # ranks them far below rows one place off
    assert 10 * loss(exact, 1.0) < loss(shifted, 1.0)
    assert readback(lambda a, c: (a, c), vocab, table, [(exact, counts, texts)]) == 1.0
    assert readback(lambda a, c: (a, c), vocab, table, [(shifted, counts, texts)]) == 0.0
    with pytest.raises(ValueError, match="glacier.*do not fit"):
        align_targets(torch.zeros(3, table.shape[1]), [3], ["What is a glacier?"], head, filler, "packed")



def test_repeat_layout_spans_the_spoken_tokens(vocab, smol_target):
    """The repeat layout gives every row the token spoken there (from its CTC start to the next one's,
    the rows before the first start to the first token), with no filler; rows that are those exact
    embeddings give a zero loss and read back, run by run, as the prompt; noisy rows cost what their
    noise is, and rows in reverse order do not read back."""
    from safetensors import safe_open

    from modeling.smol_audio.hearing import readback, spoken_spans
    from modeling.smol_audio.train import align_loss, align_targets

    texts = ["What is a glacier?", "Give me three tips for saving money."]
    head, onehot, counts = _head_reading(vocab, texts)  # each label 3 frames, then a blank
    labels = vocab.labels(texts[0])
    assert spoken_spans(head.log_probs(onehot, counts)[0], labels) == [k for k in range(len(labels)) for _ in range(4)]
    silence_first = torch.cat([torch.nn.functional.one_hot(torch.tensor([0]), onehot.shape[1]).float(),
                               onehot[: counts[0] - 1]])
    assert spoken_spans(head.log_probs(silence_first, [counts[0]])[0], labels)[:6] == [0, 0, 0, 0, 0, 1]

    with safe_open(str(smol_target / "model.safetensors"), "pt") as f:
        key = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        table = f.get_tensor(key).float()
    # a head that reads each row as its nearest prompt token's embedding, never the blank
    reader = TokenCTCHead(table.shape[1], vocab)
    choices = table[vocab.llm_ids]
    with torch.no_grad():
        reader.proj.weight.copy_(torch.cat([torch.zeros(1, table.shape[1]), choices]) * 10)
        reader.proj.bias.copy_(torch.cat([torch.tensor([-1e4]), -5 * (choices**2).sum(-1)]))
    spoken = [[t for t in vocab.ids_of(text) for _ in range(4)] for text in texts]
    exact = table[torch.tensor(spoken[0] + spoken[1])]
    counts = [len(x) for x in spoken]
    ids, word = align_targets(exact, counts, texts, reader, 0, "repeat")
    assert ids.tolist() == spoken[0] + spoken[1] and bool(word.all())
    norm = float((table**2).sum(-1).mean())
    assert float(align_loss(exact, counts, texts, reader, table, 0, norm, "repeat")) == 0.0
    noise = torch.randn(exact.shape, generator=torch.Generator().manual_seed(0)) * 0.01
    expected = float(((noise**2).sum(-1) / norm).mean())
    assert float(align_loss(exact + noise, counts, texts, reader, table, 0, norm, "repeat")) == pytest.approx(expected, rel=1e-3)
    assert readback(lambda a, c: (a, c), vocab, table, [(exact, counts, texts)], "repeat") == 1.0
    assert readback(lambda a, c: (a, c), vocab, table, [(exact.flip(0), counts, texts)], "repeat") == 0.0
