"""How each array is encoded on disk: exact bf16 bits, per-row fp8, and the Blosc settings of
the default ``zstd`` codec (``storage/chunk_compression.py`` has the store-wide codec choice).

Zarr has no bfloat16, so bf16 is stored bit-exact as uint16. Measured on synthetic 7B-like
activations (``python -m benchmarks.bench_codecs``: H=4096, 1.5 MiB chunks, one thread, % of raw):

- bf16 residual states: Blosc zstd-1 + byte-shuffle with 1 MiB blocks -> 71.5% at ~500 MB/s
  compress, ~1.9 GB/s decompress. Blosc's automatic block (small at low levels) gives 82% with
  byte-shuffle and 79.6% with bit-shuffle: zstd needs ~256 KiB+ of shuffled exponent bytes to
  build good entropy tables. zstd-3 or -5 gain nothing; lz4 + bit-shuffle 81%; plain zstd 82%.
  Splitting bytes by hand (exponent byte zstd, mantissa byte raw) gives the same 71.8% as the
  byte-shuffle: Blosc already does it per block, so there is no separate byte-plane array.
  last_hidden 69.3%, audio_embeds 68.5% with the same codec.
- fp8 e4m3 bytes (row-scaled): zstd-1, no shuffle, 256 KiB blocks -> 85% (aux) / 83.5% (audio);
  Blosc's bit-shuffle gave up on one-byte values (stored raw, 100%), lz4 also 100%.
- The ``zstd`` decode (~2 GB/s) bounds a read at ~75k tokens/s per core at H=4096; the ``none``
  codec trades 1.38x the bytes for reads at page-cache speed (see storage/chunk_compression.py).

fp8 is lossy and optional (``quantization="fp8"``): each row of H values (one token at one layer)
is scaled by amax/448 into float8_e4m3fn and stored as uint8 plus a float32 scale per row
(+0.1% at H=4096). ``last_hidden`` stays bf16 by default: it defines the teacher distribution
and is only ~25% of the token rows (fp8 there would save ~6% of the store). Measured through a
random lm_head tuned to a peaked teacher (mean top-1 p 0.63, vocab 32k), fp8 last_hidden moved
it by KL 2.4e-3 nats mean / 1.3e-2 max with 100% top-1 agreement: small, but a systematic bias
in the training target, for little gain. ``fp8_last_hidden=True`` turns it on.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from storage import buffers
from storage.chunk_compression import (
    DEFAULT_CODEC,
    NONFINITE_EXPONENT,
    Compressor,
    hidden_compressors,
    nonfinite_count,
)

HIDDEN_ARRAYS = ("aux_hidden", "last_hidden", "audio_embeds")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
QUANTIZATIONS = ("none", "fp8")
# rows per chunk: the largest power of two with at most ~2 MiB raw (1.5 MiB for H=4096 aux, 64
# rows). Measured (bench_store --chunk-sweep, in-process random reads of 24 samples, machine
# shared at load ~8): per-chunk costs (open, Blosc set-up, fsync) outweigh decoding the unused
# part of edge chunks, and small Blosc frames compress worse. 64 KiB -> 2 MiB chunks:
# H=256 1,497 -> 1,301 B/token, 33k -> 138k tok/s; H=4096 22.0k -> 20.7k B/token,
# 10.5k -> 20k tok/s. 4 MiB read no slower at H=4096 (28k) but decodes 8x more than a sample's
# ~275 last_hidden rows need at H=256 (128k tok/s), so 2 MiB it is.
TARGET_CHUNK_BYTES = 2 << 20
MAX_CHUNK_ROWS = 1 << 14  # 64 KiB of int32 ids: cheap to decode for one sample


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One token-major 2-D (or 1-D) zarr array of a shard.

    ``rows`` names the row space it shares offsets with: ``tokens`` (one row per token),
    ``last`` (one per last_hidden position) or ``audio`` (one per audio token).
    ``encoding``: ``int``, ``bits`` (exact half-precision bits as uint16), ``fp8`` (uint8
    float8_e4m3fn; scaled by the array named ``scale``) or ``scale`` (float32 per-row scales).
    """

    name: str
    rows: str
    dtype: str
    width: int  # features per row; 0 = 1-D array
    chunk_rows: int
    encoding: str
    compressor: Compressor = dataclasses.field(default_factory=Compressor)
    scale: str | None = None

    @property
    def shape_tail(self) -> tuple[int, ...]:
        return (self.width,) if self.width else ()

    @property
    def row_bytes(self) -> int:
        return max(1, self.width) * np.dtype(self.dtype).itemsize

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["compressor"] = dataclasses.asdict(self.compressor)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ArraySpec:
        return cls(**{**d, "compressor": Compressor(**d["compressor"])})


def chunk_rows_for(row_bytes: int, target_bytes: int = TARGET_CHUNK_BYTES, max_rows: int = MAX_CHUNK_ROWS) -> int:
    """Largest power of two of rows with at most ``target_bytes`` raw and ``max_rows`` rows
    (at least 16 rows)."""
    rows = min(max_rows, max(16, target_bytes // row_bytes))
    return 1 << (rows.bit_length() - 1)


def array_specs(hidden_size: int, num_aux_layers: int, quantization: str = "none",
                fp8_last_hidden: bool = False, chunk_bytes: int = TARGET_CHUNK_BYTES,
                codec: str = DEFAULT_CODEC) -> list[ArraySpec]:
    """The arrays of every shard of a store with these settings (``codec``: see storage.chunk_compression)."""
    if quantization not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS}, got {quantization!r}")
    fp8 = quantization == "fp8"
    # ints and scales are a few bytes per token: zstd-1 + byte-shuffle, automatic blocks
    ints = Compressor("zstd", 1, "shuffle")
    bf16, f8 = hidden_compressors(codec)
    out: list[ArraySpec] = []

    def add(name: str, rows: str, dtype: str, width: int, encoding: str, comp: Compressor,
            scale: str | None = None) -> None:
        row_bytes = max(1, width) * np.dtype(dtype).itemsize
        out.append(ArraySpec(name, rows, dtype, width, chunk_rows_for(row_bytes, chunk_bytes),
                             encoding, comp, scale))

    add("input_ids", "tokens", "int32", 0, "int", ints)
    add("loss_mask", "tokens", "uint8", 0, "int", ints)
    for name, rows, width, lossy in (
        ("aux_hidden", "tokens", num_aux_layers * hidden_size, fp8),
        ("last_hidden", "last", hidden_size, fp8 and fp8_last_hidden),
        ("audio_embeds", "audio", hidden_size, fp8),
    ):
        if lossy:
            n_scales = width // hidden_size
            add(name, rows, "uint8", width, "fp8", f8, scale=f"{name}_scale")
            add(f"{name}_scale", rows, "float32", n_scales, "scale", ints)
        else:
            add(name, rows, "uint16", width, "bits", bf16)
        if name == "last_hidden":
            add("last_hidden_positions", "last", "int32", 0, "int", ints)
    return out


def hidden_to_bits(t: torch.Tensor) -> np.ndarray:
    """bf16/fp16 tensor -> uint16 numpy array of the same bits (exact)."""
    return t.contiguous().view(torch.uint16).numpy()


def nonfinite_mask(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray | None:
    """Where half-precision bits are NaN/Inf (exponent all ones), or None if nowhere.

    The all-finite case is :func:`storage.chunk_compression.nonfinite_count`'s two max reductions,
    far faster than ``torch.isfinite`` on a bf16 CPU tensor (129 ms for 1,100 x 3 x 4096).
    """
    name = str(dtype).removeprefix("torch.")
    if not nonfinite_count(bits, "bits", name):
        return None
    exponent = NONFINITE_EXPONENT[name]
    return np.bitwise_and(bits, exponent) == exponent


def tensor_nonfinite(t: torch.Tensor) -> int:
    """NaN/Inf count of a sample tensor as the reader hands it out: bf16/fp16 (by their bits),
    raw fp8 bytes (uint8) or float32 scales; see :func:`storage.chunk_compression.nonfinite_count`."""
    if t.dtype in (torch.bfloat16, torch.float16):
        return nonfinite_count(hidden_to_bits(t), "bits", str(t.dtype).removeprefix("torch."))
    if t.dtype == torch.uint8:
        return nonfinite_count(t.contiguous().numpy(), "fp8", "")
    return nonfinite_count(t.contiguous().numpy(), "scale", "")


def bits_to_float32(bits: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    if dtype == torch.bfloat16:  # bf16 is the top half of a float32: shift, no rounding
        return (bits.astype(np.uint32) << 16).view(np.float32)
    return bits.view(np.float16).astype(np.float32)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scaled float8_e4m3fn: [R, H] bf16/fp16 -> (uint8 [R, H], float32 scale [R]).

    The scale maps each row's absolute max to 448, so outlier channels cost the bulk only
    relative precision (e4m3 keeps ~3 significant bits across 2^-6..448 before subnormals).
    Done in numpy except the final rounding: 2.3x faster than the same ops in torch on CPU.
    """
    xf = bits_to_float32(hidden_to_bits(x), x.dtype)
    amax = np.maximum(xf.max(axis=-1, initial=0.0), -xf.min(axis=-1, initial=0.0))
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    np.divide(xf, scale[:, None], out=xf)
    np.clip(xf, -FP8_MAX, FP8_MAX, out=xf)
    q = torch.from_numpy(xf).to(torch.float8_e4m3fn)
    return q.view(torch.uint8), torch.from_numpy(scale)


# float8_e4m3fn value of every byte: dequantizing is a table lookup
_FP8_TABLE = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float().numpy()
_DEQUANT_BLOCK_ROWS = 64  # 1 MiB of float32 at H=4096: the three passes below stay in cache


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8` (up to rounding), returned as ``dtype``.

    bf16 output: table lookup, scale and round-to-nearest-even to bf16 in 64-row blocks, in
    numpy; bit-identical to ``(q.view(float8).float() * scale).bfloat16()`` and ~4x faster
    on CPU (136 vs 586 ms for 3,300 x 4096 values, measured on a busy 2-core machine).
    """
    qn, sn = q.numpy(), scale.numpy().astype(np.float32)
    if dtype != torch.bfloat16:
        return torch.from_numpy(np.take(_FP8_TABLE, qn) * sn[:, None]).to(dtype)
    out, result = buffers.empty(qn.shape, np.uint16)
    buf = np.empty((_DEQUANT_BLOCK_ROWS, *qn.shape[1:]), dtype=np.float32)
    for r0 in range(0, len(qn), _DEQUANT_BLOCK_ROWS):
        r1 = min(r0 + _DEQUANT_BLOCK_ROWS, len(qn))
        v = buf[: r1 - r0]
        np.take(_FP8_TABLE, qn[r0:r1], out=v)
        v *= sn[r0:r1, None]
        b = v.view(np.uint32)
        b += 0x7FFF + ((b >> 16) & 1)  # round to nearest even on the dropped 16 bits
        np.right_shift(b, 16, out=out[r0:r1], casting="unsafe")
    return result.view(torch.bfloat16)


def decode_arrays(raw: dict[str, torch.Tensor], specs: dict[str, ArraySpec], hidden_size: int,
                  dtype: torch.dtype, dequantize: bool = True) -> dict[str, torch.Tensor]:
    """Stored rows of one sample (tensors of the stored dtypes) -> the sample's tensors (bf16
    bits viewed as bf16, no copy; fp8 dequantized).

    ``dequantize=False``: fp8 arrays stay uint8 ``[n, L, H]`` / ``[n, H]`` with their float32
    scales as ``<name>_scale`` ``[n, L]`` / ``[n]``: half the bytes to move to a GPU, which
    dequantizes them in microseconds (:func:`dequantize_fp8_torch`).
    """
    out = {k: raw[k].to(torch.int64) for k in ("input_ids", "loss_mask", "last_hidden_positions")}
    for name in HIDDEN_ARRAYS:
        spec, a = specs[name], raw[name]
        n_rows = a.shape[0]
        n_layers = spec.width // hidden_size
        shape = (n_rows, n_layers, hidden_size) if name == "aux_hidden" else (n_rows, hidden_size)
        if spec.encoding == "fp8":
            scale = raw[spec.scale or ""]
            if not dequantize:
                out[name], out[f"{name}_scale"] = a.reshape(shape), scale.reshape(shape[:-1])
                continue
            t = dequantize_fp8(a.reshape(-1, hidden_size), scale.reshape(-1), dtype)
        else:
            t = a.view(dtype)
        out[name] = t.reshape(shape)
    return out


def dequantize_fp8_torch(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """:func:`dequantize_fp8` in torch ops, for the training device: uint8 ``[..., H]`` and float32
    ``[...]`` -> ``dtype``. Bit-identical to the numpy path (fp8 -> float32 is exact, then one
    float32 multiply and one round-to-nearest-even), but ~2.4x slower than it on a CPU, so CPU
    runs keep the numpy path in the loader."""
    return (q.view(torch.float8_e4m3fn).to(torch.float32) * scale.unsqueeze(-1)).to(dtype)
