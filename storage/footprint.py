"""Bytes a store holds, from its layout alone (docs/memory.md, "The store").

Per token: the input id (int32) and loss-mask byte, ``aux_layers`` hidden states of width H;
per loss position (where the next token carries loss, or every token with ``--last-hidden all``):
the final hidden state and its position (int32); per audio token: the audio-encoder embedding.
Hidden values are bf16 (2 bytes) unless the store is fp8 (1 byte + one fp32 scale per row).

A raw store (``--store-codec none``) holds exactly these hidden-state bytes, except that the last
chunk of each shard's array is written whole (Zarr's edge chunks): :func:`raw_hidden_bytes`.
Compressed stores hold less (zstd: ~0.7x on real activations); ids and masks are compressed in
every store and take a few bytes per token.
"""

from __future__ import annotations

import math

ID_BYTES, MASK_BYTES, POSITION_BYTES, SCALE_BYTES = 4, 1, 4, 4
HIDDEN_ARRAYS = ("aux_hidden", "last_hidden", "audio_embeds")


def hidden_row_bytes(hidden: int, aux_layers: int = 3, fp8: bool = False) -> dict[str, int]:
    """Bytes of one row of each hidden-state array (aux rows hold all aux layers of a token)."""
    value = 1 if fp8 else 2
    aux = aux_layers * hidden * value + (aux_layers * SCALE_BYTES if fp8 else 0)
    audio = hidden * value + (SCALE_BYTES if fp8 else 0)
    return {"aux_hidden": aux, "last_hidden": 2 * hidden, "audio_embeds": audio}


def raw_store_bytes(hidden: int, tokens: int, last_rows: int, audio_rows: int, aux_layers: int = 3,
                    fp8: bool = False) -> int:
    """The store's content uncompressed and unpadded: ids, masks, positions and hidden states."""
    row = hidden_row_bytes(hidden, aux_layers, fp8)
    return (tokens * (ID_BYTES + MASK_BYTES + row["aux_hidden"]) + last_rows * (POSITION_BYTES + row["last_hidden"])
            + audio_rows * row["audio_embeds"])


def bytes_per_token(hidden: int, loss_fraction: float, audio_fraction: float = 0.0, aux_layers: int = 3,
                    fp8: bool = False) -> float:
    """Uncompressed bytes per stored token when ``loss_fraction`` of the tokens keep a final hidden
    state (1.0 with ``--last-hidden all``) and ``audio_fraction`` are audio positions."""
    return raw_store_bytes(hidden, 1, 0, 0, aux_layers, fp8) + loss_fraction * raw_store_bytes(hidden, 0, 1, 0) \
        + audio_fraction * hidden_row_bytes(hidden, aux_layers, fp8)["audio_embeds"]


def raw_hidden_bytes(rows: int, chunk_rows: int, row_bytes: int) -> int:
    """Bytes of one shard's hidden-state array in a raw store: whole chunks, the last one padded."""
    return math.ceil(rows / chunk_rows) * chunk_rows * row_bytes if rows else 0
