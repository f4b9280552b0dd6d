"""Chat templates as token segments, with the loss mask and audio expansion, for any target family.

A family (:mod:`modeling.targets`) renders its chat template as :class:`Segment` s (template text,
one audio placeholder per clip, assistant answers); :class:`ChatTokenizer` turns them into ids.
Working segment by segment means (a) assistant spans are known without guessing from text,
(b) stage 1's generated token ids go in as generated (re-tokenizing decoded text can give other
ids), and (c) each audio placeholder becomes exactly as many tokens as the audio encoder outputs.
Each family's rendering is tested against its own Jinja template token for token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.data.records import Turn


@dataclass
class Segment:
    kind: str  # "text": template/prompt text, "audio": one audio placeholder, "answer": assistant content
    text: str = ""
    turn: int = -1  # index of the turn this segment belongs to


@dataclass
class Encoded:
    input_ids: np.ndarray  # int64 [S]
    loss_mask: np.ndarray  # uint8 [S]
    audio_spans: list[tuple[int, int]]  # [start, end) of each audio's tokens, in order
    answer_spans: list[tuple[int, int, int]] = field(default_factory=list)  # (turn, start, end)


class ChatTokenizer:
    """Turns conversations into ids with a loss mask, using the target's tokenizer and family.

    ``family`` is a :class:`modeling.targets.base.TargetFamily` (duck-typed here: its
    ``render_segments``, ``special_tokens``, ``end_tokens``, ``num_audio_tokens``).
    """

    def __init__(self, tokenizer: Any, family: Any, system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.family = family
        self.system_prompt = system_prompt
        names = [family.special_tokens["audio"], family.special_tokens["turn_end"], *family.end_tokens]
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in names}
        # a token the vocabulary lacks maps to the unk id; compare back, since a real vocabulary may use
        # a special token as its unk (SmolLM2: <|endoftext|> is id 0 and the unk token)
        missing = [t for t, i in ids.items() if i is None or tokenizer.convert_ids_to_tokens(i) != t]
        if missing:
            raise ValueError(f"tokenizer lacks the {family.name} special tokens {missing}")
        self.audio_token_id = ids[family.special_tokens["audio"]]
        self.im_end_id = ids[family.special_tokens["turn_end"]]  # closes an answer (carries loss)
        self.end_ids = {ids[t] for t in family.end_tokens}

    def num_audio_tokens(self, num_samples: int) -> int:
        return int(self.family.num_audio_tokens(num_samples))

    def _text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False)) if text else []

    def encode(self, turns: list[Turn], *, audio_token_counts: list[int] | None = None,
               until_turn: int | None = None, use_generated_ids: bool = True) -> Encoded:
        """Token ids, loss mask and spans.

        ``audio_token_counts``: expand the i-th audio placeholder to that many tokens (training);
        None keeps one placeholder per clip (a prompt for vLLM, which expands it itself).
        Assistant turns carrying stage 1's ``token_ids`` use them verbatim.
        """
        segs = self.family.render_segments(turns, until_turn=until_turn, system_prompt=self.system_prompt)
        ids: list[int] = []
        mask: list[int] = []
        audio_spans: list[tuple[int, int]] = []
        answer_spans: list[tuple[int, int, int]] = []
        pending = ""  # consecutive template text is tokenized in one piece, as a full render would

        def flush_text() -> None:
            nonlocal pending
            piece = self._text_ids(pending)
            ids.extend(piece)
            mask.extend([0] * len(piece))
            pending = ""

        for seg in segs:
            if seg.kind == "text":
                pending += seg.text
                continue
            flush_text()
            start = len(ids)
            if seg.kind == "audio":
                n = 1 if audio_token_counts is None else audio_token_counts[len(audio_spans)]
                ids.extend([self.audio_token_id] * n)
                mask.extend([0] * n)
                audio_spans.append((start, start + n))
            else:
                answer, answer_mask = self._answer_ids(turns[seg.turn], use_generated_ids)
                ids.extend(answer)
                mask.extend(answer_mask)
                answer_spans.append((seg.turn, start, len(ids)))
        flush_text()
        if audio_token_counts is not None and len(audio_token_counts) != len(audio_spans):
            raise ValueError(f"{len(audio_token_counts)} audio token counts for {len(audio_spans)} clips")
        return Encoded(np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8), audio_spans, answer_spans)

    def _answer_ids(self, turn: Turn, use_generated_ids: bool) -> tuple[list[int], list[int]]:
        if use_generated_ids and turn.token_ids is not None:
            answer = list(turn.token_ids)
            if answer and answer[-1] in self.end_ids:
                return answer, [1] * len(answer)
            # cut by max_new_tokens: the target never produced an end token here, so the closing
            # turn-end token keeps the template valid but carries no loss
            return answer + [self.im_end_id], [1] * len(answer) + [0]
        answer = self._text_ids(turn.text) + [self.im_end_id]
        return answer, [1] * len(answer)


GREEN, DIM, RESET = "\033[32m", "\033[2m", "\033[0m"


def format_sample(tokenizer, encoded: Encoded, color: bool = True) -> str:
    """Render ids as text, one run per (loss, audio) state, colour or brackets for loss."""
    ids, mask = encoded.input_ids.tolist(), encoded.loss_mask.tolist()
    audio_starts = {s: e for s, e in encoded.audio_spans}
    out: list[str] = []
    i = 0
    while i < len(ids):
        if i in audio_starts:
            end = audio_starts[i]
            out.append(f"{DIM if color else ''}[AUDIO x {end - i}]{RESET if color else ''}")
            i = end
            continue
        j = i
        while j < len(ids) and mask[j] == mask[i] and j not in audio_starts:
            j += 1
        text = tokenizer.decode(ids[i:j], skip_special_tokens=False)
        if mask[i]:
            text = f"{GREEN}{text}{RESET}" if color else f"[[{text}]]"
        out.append(text)
        i = j
    return "".join(out)
