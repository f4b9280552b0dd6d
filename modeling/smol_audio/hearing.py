"""Does the encoder hear? A CTC head over the LLM's own tokens of the prompts, and its word error rate.

The auxiliary loss that teaches the SmolLM2 target's encoder to hear before the frozen LLM has learned
to read it. Labels are the LLM tokens of the spoken prompt (392 distinct ids over all 2,026 prompts,
6.9 a prompt on average), not letters: a question spoken at 240 words a minute gives ~25 audio
frames (25 Hz) a second but ~20 letters a second, so letter CTC was infeasible (and silently zeroed by
``zero_infinity``) on the fastest clips, and 0.3 tokens a frame leaves CTC room for blanks. The head is
not part of the target (training only).

Its best path (:func:`ctc_spikes`) says at which audio frame each token is spoken: training then asks
the encoder for the token's own LLM embedding there (:func:`spoken_spans`: over the token's whole
span, which the frozen LLM reads as the prompt when a token spans about two rows).

The same head's greedy decode gives the encoder's word error rate on held-out clips, an encoder-only
check (a few seconds) that training logs long before the LLM answers from the audio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from modeling.smol_audio.prompts import all_prompts


class PromptVocab:
    """The LLM token ids the prompts use, as CTC labels 1..N (0 is the blank)."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        ids = sorted({i for p in all_prompts() for i in self.ids_of(p.text)})
        self.llm_ids = ids
        self.label_of = {t: k + 1 for k, t in enumerate(ids)}

    def ids_of(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def labels(self, text: str) -> list[int]:
        """CTC labels of ``text``; a token outside the prompts' vocabulary is an error (every clip is a prompt)."""
        ids = self.ids_of(text)
        missing = [i for i in ids if i not in self.label_of]
        if missing:
            raise ValueError(f"{text!r}: tokens {missing[:3]} are not in the prompts' vocabulary")
        return [self.label_of[i] for i in ids]

    def text_of(self, labels: Sequence[int]) -> str:
        return self.tokenizer.decode([self.llm_ids[k - 1] for k in labels])


class TokenCTCHead(torch.nn.Module):
    """Prompt tokens from the projected audio embeddings (CTC)."""

    def __init__(self, hidden: int, vocab: PromptVocab):
        super().__init__()
        self.vocab = vocab
        self.proj = torch.nn.Linear(hidden, len(vocab.llm_ids) + 1)

    def log_probs(self, audio: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
        """Per clip [frames, labels + 1] log-probabilities; ``audio`` holds the clips' rows back to back."""
        return list(torch.log_softmax(self.proj(audio).float(), -1).split(counts))

    def forward(self, audio: torch.Tensor, counts: list[int], texts: Sequence[str]) -> torch.Tensor:
        frames = torch.nn.utils.rnn.pad_sequence(self.log_probs(audio, counts))  # [T, N, C]
        labels = [torch.tensor(self.vocab.labels(t)) for t in texts]
        # zero_infinity: an infeasible clip (more labels than frames) must not poison the batch; with
        # ~0.3 labels a frame none is infeasible in this data set
        return torch.nn.functional.ctc_loss(frames, torch.cat(labels), torch.tensor(counts),
                                            torch.tensor([len(x) for x in labels]), zero_infinity=True)

    def greedy_texts(self, audio: torch.Tensor, counts: list[int]) -> list[str]:
        out = []
        for logp in self.log_probs(audio, counts):
            best = logp.argmax(-1).tolist()
            labels = [k for j, k in enumerate(best) if k != 0 and (j == 0 or best[j - 1] != k)]
            out.append(self.vocab.text_of(labels))
        return out


def ctc_spikes(logp: torch.Tensor, labels: list[int]) -> list[int]:
    """The frame where each label starts on the best CTC path of ``labels`` through ``logp`` [T, C]
    (Viterbi over the blank-interleaved labels); frames are ascending, one per label."""
    ext = [0] + [x for label in labels for x in (label, 0)]  # blank, l1, blank, l2, ..., blank
    states, frames = len(ext), logp.shape[0]
    if frames < len(labels):
        raise ValueError(f"{frames} frames cannot hold {len(labels)} labels")
    emit = logp[:, ext].double()  # [T, S]
    # a move of two states is allowed into a label that differs from the label two states back
    skip = torch.tensor([s >= 2 and ext[s] != 0 and ext[s] != ext[s - 2] for s in range(states)])
    score = torch.full((states,), -torch.inf, dtype=torch.float64)
    score[:2] = emit[0, :2]
    back = torch.zeros(frames, states, dtype=torch.long)
    for t in range(1, frames):
        stay, one = score, torch.cat([score.new_full((1,), -torch.inf), score[:-1]])
        two = torch.where(skip, torch.cat([score.new_full((2,), -torch.inf), score[:-2]]), -torch.inf)
        best = torch.stack([stay, one, two])
        arg = best.argmax(0)
        score = best.gather(0, arg[None])[0] + emit[t]
        back[t] = arg
    state = states - 1 if score[-1] >= score[-2] else states - 2
    path = [state]
    for t in range(frames - 1, 0, -1):
        state -= int(back[t, state])
        path.append(state)
    path.reverse()
    return [t for t in range(frames) if ext[path[t]] != 0 and (t == 0 or path[t - 1] != path[t])]


@torch.no_grad()
def hearing_wer(encode: Any, head: TokenCTCHead, batches: Sequence[tuple[Any, list[int], list[str]]]) -> float:
    """Corpus WER of the head's greedy transcripts; ``batches``: (features, num_samples, texts) each,
    ``encode(features, num_samples) -> (audio rows, counts)``."""
    from pipeline.data.wer import corpus_wer

    refs, hyps = [], []
    for feats, num_samples, texts in batches:
        audio, counts = encode(feats, num_samples)
        hyps += head.greedy_texts(audio, counts)
        refs += list(texts)
    wer = corpus_wer(refs, hyps)
    return float("nan") if wer is None else wer


def nearest_prompt_tokens(rows: torch.Tensor, vocab: PromptVocab, table: torch.Tensor) -> list[int]:
    """Each row read as the LLM id of its nearest embedding (``table``) among the prompts' tokens."""
    nearest = torch.cdist(rows.float(), table[vocab.llm_ids].float()).argmin(-1).tolist()
    return [vocab.llm_ids[k] for k in nearest]


def spoken_spans(logp: torch.Tensor, labels: list[int]) -> list[int]:
    """The label index each frame falls in: label k from the frame its CTC path starts it
    (:func:`ctc_spikes`) to the next label's start, the frames before the first start in label 0."""
    starts = ctc_spikes(logp, labels)
    return [max(0, sum(s <= t for s in starts) - 1) for t in range(logp.shape[0])]


def runs(ids: list[int]) -> list[int]:
    """``ids`` with each run of equal neighbours read once (how the LLM reads a token spread over rows)."""
    return [t for j, t in enumerate(ids) if j == 0 or ids[j - 1] != t]


@torch.no_grad()
def readback(encode: Any, vocab: PromptVocab, table: torch.Tensor,
             batches: Sequence[tuple[Any, list[int], list[str]]], layout: str = "packed") -> float:
    """Share of clips whose rows, each read as its nearest LLM embedding among the prompts' tokens, spell
    the prompt exactly: in the first rows (``packed``), or with each run of equal rows read once
    (``repeat``): whether the encoder writes the layout the frozen LLM reads."""
    right = total = 0
    for feats, num_samples, texts in batches:
        audio, counts = encode(feats, num_samples)
        for clip, text in zip(audio.split(counts), texts, strict=True):
            ids = vocab.ids_of(text)
            if layout == "packed":
                right += nearest_prompt_tokens(clip[: len(ids)], vocab, table) == ids
            else:
                right += runs(nearest_prompt_tokens(clip, vocab, table)) == ids
            total += 1
    return right / max(1, total)
