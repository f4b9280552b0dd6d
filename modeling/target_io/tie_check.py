"""Tell a numerical near-tie from a real mismatch where two greedy decodes of one prompt diverge.

With native bf16 (GPU tensor cores, AMX/AVX512-BF16 CPUs) a matmul's rounding depends on the batch
shape and on how many tokens a forward holds (1 decoded token vs k+1 verified ones), so greedy
outputs of the plain and the speculative engine can part wherever the target's top two logits are
nearly equal: speculative decoding is lossless only up to that noise. A real mismatch (a draft
token the target should have rejected) shows as a token far below the target's top logit.

For each divergence the target is run under teacher forcing on the shared prefix (prompt + the
common generated ids) in fp32, which is the reference, and once more in bf16 to measure the
rounding noise *at that position*: ``sigma_bf16`` = std over the vocabulary of (bf16 - fp32)
logits. The engine's noise is that scaled by the unit roundoff of its dtype (bf16 2^-8, fp16
2^-11, fp32 2^-24). Both tokens count as valid greedy choices when their fp32 logits lie within
``bound = TIE_Z * sqrt(2) * sigma`` of the fp32 top logit (a logit difference carries two
independent errors, hence sqrt(2)); otherwise the divergence is a real mismatch. TIE_Z = 6 makes
a false "tie" for a wrong token need a six-sigma rounding error.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.core.dtypes import from_engine

TIE_Z = 6.0
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11, "fp32": 2.0**-24}


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first differing generated token (the shorter length if one is a prefix), or None."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


@dataclass
class DivergenceCase:
    """One prompt whose two decodes differ: the prompt as the engine got it and both outputs."""

    id: str
    prompt_ids: list[int]  # one audio placeholder per clip, as vLLM takes it
    audios: list[np.ndarray]
    output_a: list[int]
    output_b: list[int]


@dataclass
class Divergence:
    """The first divergence of a case, scored by the fp32 target."""

    id: str
    position: int  # index in the generated tokens
    token_a: int | None  # None: that output ended here
    token_b: int | None
    logit_a: float | None  # fp32 logits at the position
    logit_b: float | None
    top_token: int  # fp32 argmax
    top_logit: float
    logit_gap: float | None  # |logit_a - logit_b|
    noise_sigma: float  # engine-dtype noise of one logit at this position
    bound: float
    numerical_tie: bool

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def noise_bound(sigma_bf16: float, engine_dtype: str) -> tuple[float, float]:
    """(sigma, bound) for an engine running in ``engine_dtype``, from the measured bf16 noise."""
    eps = UNIT_ROUNDOFF.get(from_engine(engine_dtype) or "bf16", UNIT_ROUNDOFF["bf16"])
    sigma = sigma_bf16 * eps / UNIT_ROUNDOFF["bf16"]
    return sigma, TIE_Z * math.sqrt(2.0) * sigma


class TieChecker:
    """Scores divergences with the HF target: fp32 reference logits, bf16 noise.

    The two precisions are two loads of the checkpoint, one at a time: casting one model back and
    forth would round its fp32 buffers (RoPE frequencies) to bf16 for good.
    """

    def __init__(self, target: str | Path, device: str = "cpu"):
        from modeling.targets import family_of
        from pipeline.data.samples import load_target_processor

        self.target, self.device = target, device
        self.family = family_of(target)
        self.tokenizer, self.extractor = load_target_processor(target)
        self._loaded: tuple[str, Any] | None = None
        self.audio_token_id = int(self.tokenizer.convert_tokens_to_ids(self.family.special_tokens["audio"]))

    def model(self, dtype: str) -> Any:
        """The target in ``dtype`` ("fp32" or "bf16"); the other one is freed first."""
        if self._loaded is None or self._loaded[0] != dtype:
            self._loaded = None
            self._loaded = (dtype, self.family.load_model(self.target, dtype, self.device))
        return self._loaded[1]

    def last_logits(self, ids: list[int], audios: list[np.ndarray], dtype: str = "fp32") -> torch.Tensor:
        """fp32 copy of the logits after ``ids`` (audio placeholders already expanded)."""
        model = self.model(dtype)
        kwargs: dict[str, Any] = {k: torch.from_numpy(v).to(model.device)
                                  for k, v in self.family.audio_inputs(self.extractor, audios).items()}
        if "input_features" in kwargs:
            kwargs["input_features"] = kwargs["input_features"].to(model.dtype)
        input_ids = torch.tensor([ids], device=model.device)
        with torch.inference_mode():
            out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False,
                        logits_to_keep=1, **kwargs)
        return out.logits[0, -1].float().cpu()

    def expanded(self, case: DivergenceCase, position: int) -> list[int]:
        """Prompt with each placeholder expanded to the encoder's token count, plus the shared prefix."""
        counts = iter(self.family.num_audio_tokens(a.shape[0]) for a in case.audios)
        ids: list[int] = []
        for tok in case.prompt_ids:
            ids.extend([tok] * next(counts) if tok == self.audio_token_id else [tok])
        return ids + list(case.output_a[:position])

    def score(self, cases: Sequence[DivergenceCase], engine_dtype: str) -> list[Divergence]:
        """The first divergence of every case that has one (cases with equal outputs are skipped)."""
        todo = [(c, p) for c in cases if (p := first_divergence(c.output_a, c.output_b)) is not None]
        inputs = [(self.expanded(c, p), c.audios) for c, p in todo]
        ref = [self.last_logits(ids, audios, "fp32") for ids, audios in inputs]
        noisy = [self.last_logits(ids, audios, "bf16") for ids, audios in inputs]
        out = []
        for (case, pos), r, n in zip(todo, ref, noisy, strict=True):
            sigma, bound = noise_bound(float((n - r).std()), engine_dtype)
            a = case.output_a[pos] if pos < len(case.output_a) else None
            b = case.output_b[pos] if pos < len(case.output_b) else None
            top = float(r.max())
            la = None if a is None else float(r[a])
            lb = None if b is None else float(r[b])
            tie = la is not None and lb is not None and top - la <= bound and top - lb <= bound
            out.append(Divergence(case.id, pos, a, b, la, lb, int(r.argmax()), top,
                                  None if la is None or lb is None else abs(la - lb), sigma, bound, tie))
        return out

    def close(self) -> None:
        self._loaded = None
