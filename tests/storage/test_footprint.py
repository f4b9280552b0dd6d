"""The store's byte model (docs/memory.md) against the bytes a real raw store holds on disk."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_store import H, build, make_samples

from pipeline.core.manifest import Manifest
from storage.footprint import (
    HIDDEN_ARRAYS,
    bytes_per_token,
    hidden_row_bytes,
    raw_hidden_bytes,
    raw_store_bytes,
)
from storage.layout import SHARDS_DIR

ROWS = {"aux_hidden": "num_tokens", "last_hidden": "num_last", "audio_embeds": "num_audio"}


def test_predicted_hidden_bytes_equal_a_raw_stores_chunk_files(tmp_path: Path) -> None:
    samples = make_samples()
    build(tmp_path, samples, num_shards=3, codec="none")
    manifest = Manifest(tmp_path).load()
    chunk_rows = {a["name"]: a["chunk_rows"] for a in manifest["arrays"]}
    row_bytes = hidden_row_bytes(H, aux_layers=3)
    for entry in manifest["shards"].values():
        for array in HIDDEN_ARRAYS:
            on_disk = sum(p.stat().st_size for p in (tmp_path / SHARDS_DIR / entry["name"] / "arrays" / array).glob("c.*"))
            predicted = raw_hidden_bytes(int(entry[ROWS[array]]), chunk_rows[array], row_bytes[array])
            assert on_disk == predicted, (entry["name"], array)
    # the unpadded content, counted from the samples themselves
    tokens = sum(s.num_tokens for s in samples)
    last = sum(len(s.last_hidden_positions) for s in samples)
    audio = sum(len(s.audio_embeds) for s in samples)
    content = sum(s.input_ids.numel() * 4 + s.loss_mask.numel() + s.aux_hidden.numel() * 2 + s.last_hidden.numel() * 2
                  + s.last_hidden_positions.numel() * 4 + s.audio_embeds.numel() * 2 for s in samples)
    assert raw_store_bytes(H, tokens, last, audio) == content
    assert bytes_per_token(H, last / tokens, audio / tokens) * tokens == pytest.approx(content)
