"""Word error rate with the usual ASR normalisation (lower case, punctuation removed, single spaces)."""

from __future__ import annotations

import re
from collections.abc import Sequence


def normalize_text(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s']", " ", text.lower()).split())


def corpus_wer(references: Sequence[str], hypotheses: Sequence[str]) -> float | None:
    """WER over the pairs whose normalised reference is not empty; None when none is."""
    import jiwer

    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    return float(jiwer.wer([r for r, _ in pairs], [h for _, h in pairs])) if pairs else None
