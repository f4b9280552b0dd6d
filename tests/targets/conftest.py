"""One tiny GLM-ASR checkpoint (and what is read from it) for every test in this folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from glm_asr_helpers import DATA, FAMILY

from pipeline.data import read_conversations


@pytest.fixture(scope="session")
def target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return FAMILY.build_tiny(tmp_path_factory.mktemp("glm-asr") / "tiny")


@pytest.fixture(scope="session")
def processor(target: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(str(target))


@pytest.fixture(scope="session")
def records() -> list[Any]:
    result = read_conversations(DATA / "speech.jsonl")
    assert not result.rejected
    return result.records


@pytest.fixture(scope="session")
def hf_fp32(target: Path) -> Any:
    return FAMILY.load_model(target, "fp32")

