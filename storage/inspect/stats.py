"""``show`` and ``stats`` of ``python -m storage.inspect``: one sample up close, and activation
statistics over many.

``show`` renders the sample's tokens with :func:`pipeline.data.template.format_sample` (loss tokens green
or ``[[bracketed]]``, ``[AUDIO x N]`` for audio spans) and the per-token L2 norms of every stored
hidden tensor. ``stats`` reads lengths from the indexes alone and activations from up to
``--max-samples`` samples: mean, std, abs-max, and the fraction of outlier channels, i.e.
channels whose RMS over the sampled rows exceeds ``--outlier-factor`` (6) times the layer's
median channel RMS (the massive-activation channels of LLM residual streams, which decide how
well a layer survives fp8).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from storage.inspect.common import InspectError
from storage.store import HiddenStateStore

NORM_ROWS = 1024  # rows per block when taking norms: bounds float32 copies to ~16 MiB at H=4096


def tensor_labels(header: dict[str, Any]) -> list[str]:
    """One label per stored hidden tensor: each aux layer (in the store's convention), then the rest."""
    aux = header["aux_layers"]
    return [f"aux {aux['convention']} {i}" for i in aux["ids"]] + ["last_hidden", "audio_embeds"]


def hidden_rows(sample: dict[str, Any]) -> list[torch.Tensor]:
    """The sample's hidden tensors as [rows, H], in :func:`tensor_labels` order."""
    aux = sample["aux_hidden"]
    return [aux[:, i] for i in range(aux.shape[1])] + [sample["last_hidden"], sample["audio_embeds"]]


def find_sample(store: HiddenStateStore, key: str) -> dict[str, Any]:
    """The sample with id ``key``; failing that, an integer ``key`` is a store index."""
    try:
        return store.by_id(key)
    except KeyError:
        if not re.fullmatch(r"-?\d+", key):
            raise InspectError(f"no sample with id {key!r} in {store.path}") from None
    try:
        return store[int(key)]
    except IndexError as err:
        raise InspectError(str(err)) from None


def show_sample(store: HiddenStateStore, sample: dict[str, Any], tokenizer: Any, color: bool) -> str:
    """Header line, tensor shapes, the decoded text and per-layer L2 norms of one sample."""
    from pipeline.data.template import Encoded, format_sample

    spans = sample["audio_spans"]
    encoded = Encoded(sample["input_ids"].numpy(), sample["loss_mask"].numpy().astype(np.uint8), spans)
    shapes = ", ".join(f"{k} {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
                       for k, v in sample.items() if isinstance(v, torch.Tensor))
    lines = [
        f"sample {sample['index']} of {len(store)} (id {sample['id']!r}) in {sample['shard']}; "
        f"source_hash {sample['source_hash']}",
        f"  tokens {sample['num_tokens']}, loss tokens {sample['num_loss_tokens']}, last_hidden rows "
        f"{sample['last_hidden'].shape[0]}, audio spans {spans} ({sum(e - s for s, e in spans)} tokens)",
        f"  meta {sample['meta']}",
        f"  tensors: {shapes}",
        "--- text: " + ("green" if color else "[[...]]") + " = loss tokens, [AUDIO x N] = audio span ---",
        format_sample(tokenizer, encoded, color=color),
        "--- per-token L2 norms ---",
        f"  {'tensor':28s} {'mean':>10s} {'max':>10s} {'rows':>7s}",
    ]
    for label, rows in zip(tensor_labels(store.header), hidden_rows(sample), strict=True):
        norms = row_norms(rows)
        stats = f"{norms.mean():10.4g} {norms.max():10.4g}" if len(norms) else f"{'-':>10s} {'-':>10s}"
        lines.append(f"  {label:28s} {stats} {len(norms):7d}")
    return "\n".join(lines)


def row_norms(rows: torch.Tensor) -> np.ndarray:
    """L2 norm of each row, computed in float32 block by block."""
    return np.concatenate([rows[i:i + NORM_ROWS].float().norm(dim=-1).numpy()
                           for i in range(0, len(rows), NORM_ROWS)] or [np.zeros(0, np.float32)])


@dataclasses.dataclass
class Moments:
    """Running float64 sums over the rows of one hidden tensor (all channels, and per channel)."""

    rows: int = 0
    total: float = 0.0
    total_sq: float = 0.0
    abs_max: float = 0.0
    channel_sq: np.ndarray | None = None

    def add(self, x: np.ndarray) -> None:
        if not len(x):
            return
        x64 = x.astype(np.float64)
        sq = np.square(x64).sum(axis=0)
        self.channel_sq = sq if self.channel_sq is None else self.channel_sq + sq
        self.rows += len(x)
        self.total += float(x64.sum())
        self.total_sq += float(sq.sum())
        self.abs_max = max(self.abs_max, float(np.abs(x).max()))

    def channel_rms(self) -> np.ndarray:
        return np.sqrt(self.channel_sq / self.rows) if self.channel_sq is not None else np.zeros(0)

    def result(self, outlier_factor: float) -> dict[str, Any]:
        if not self.rows or self.channel_sq is None:
            return {"rows": 0}
        n = self.rows * len(self.channel_sq)
        mean = self.total / n
        rms = self.channel_rms()
        return {"rows": self.rows, "mean": mean, "std": float(np.sqrt(max(self.total_sq / n - mean * mean, 0.0))),
                "abs_max": self.abs_max,
                "outlier_channel_fraction": float(np.mean(rms > outlier_factor * np.median(rms)))}


def pick_samples(n: int, max_samples: int, seed: int) -> list[int]:
    """All samples, or ``max_samples`` spread at random (sorted: consecutive reads share chunks)."""
    if max_samples >= n:
        return list(range(n))
    return sorted(np.random.default_rng(seed).choice(n, max_samples, replace=False).tolist())


def loss_tokens(store: HiddenStateStore) -> np.ndarray:
    readers = store.shard_readers()
    return np.concatenate([r.col("num_loss_tokens") for r in readers]) if readers else np.zeros(0, np.int64)


def activation_stats(store: HiddenStateStore, indices: list[int]) -> dict[str, Moments]:
    moments = {label: Moments() for label in tensor_labels(store.header)}
    for i in indices:
        for m, rows in zip(moments.values(), hidden_rows(store[i]), strict=True):
            m.add(rows.float().numpy())
    return moments


def compute_stats(store: HiddenStateStore, max_samples: int = 256, seed: int = 0,
                  outlier_factor: float = 6.0) -> tuple[dict[str, Any], dict[str, Moments]]:
    """The ``stats`` result (JSON-able) and the raw moments (for the plot)."""
    lengths, loss = store.sample_lengths(), loss_tokens(store)
    indices = pick_samples(len(store), max_samples, seed)
    moments = activation_stats(store, indices)
    return {"kind": "store", "path": store.path, "samples": len(store), "sampled": len(indices),
            "outlier_factor": outlier_factor, "tokens": describe(lengths), "loss_tokens": describe(loss),
            "tensors": {k: m.result(outlier_factor) for k, m in moments.items()}}, moments


def describe(values: np.ndarray, bins: int = 10) -> dict[str, Any]:
    """Min/mean/median/max and a histogram with integer bins ``[lo, hi)`` (counts are integers)."""
    if not len(values):
        return {"count": 0, "histogram": []}
    edges = np.unique(np.linspace(values.min(), values.max() + 1, bins + 1).astype(np.int64))
    counts, _ = np.histogram(values, bins=edges)
    return {"count": len(values), "min": int(values.min()), "mean": float(values.mean()),
            "median": float(np.median(values)), "max": int(values.max()),
            "histogram": [[int(lo), int(hi), int(c)] for lo, hi, c in zip(edges[:-1], edges[1:], counts, strict=True)]}


def text_histogram(d: dict[str, Any], width: int = 40) -> list[str]:
    if not d["count"]:
        return ["    (no samples)"]
    top = max(c for _, _, c in d["histogram"])
    head = f"    min {d['min']:,}  median {d['median']:,.0f}  mean {d['mean']:,.1f}  max {d['max']:,}"
    return [head] + [f"    {lo:>9,d} - {hi - 1:<9,d} {'#' * round(width * c / top):<{width}} {c:,}"
                     for lo, hi, c in d["histogram"]]


def format_stats(s: dict[str, Any]) -> str:
    lines = [f"store {s['path']}: {s['samples']:,} samples, activations from {s['sampled']:,}",
             "tokens per sample:", *text_histogram(s["tokens"]),
             "loss tokens per sample:", *text_histogram(s["loss_tokens"]),
             f"activations (outlier channel: RMS > {s['outlier_factor']:g} x the median channel RMS):",
             f"  {'tensor':28s} {'rows':>8s} {'mean':>10s} {'std':>10s} {'abs max':>10s} {'outliers':>9s}"]
    for label, t in s["tensors"].items():
        if not t["rows"]:
            lines.append(f"  {label:28s} {0:8d}  (no rows)")
            continue
        lines.append(f"  {label:28s} {t['rows']:8,d} {t['mean']:10.4g} {t['std']:10.4g} {t['abs_max']:10.4g} "
                     f"{t['outlier_channel_fraction']:9.2%}")
    if s.get("plot"):
        lines.append(f"plot written to {s['plot']}")
    return "\n".join(lines)


def plot_stats(path: str | Path, store: HiddenStateStore, s: dict[str, Any], moments: dict[str, Moments]) -> None:
    """Histograms, per-tensor std/abs-max and sorted channel RMS in one PNG (Agg, no display)."""
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no backend state

    fig = Figure(figsize=(13, 8))
    ax = fig.subplots(2, 2)
    ax[0, 0].hist(store.sample_lengths(), bins=30)
    ax[0, 0].set(title="tokens per sample", xlabel="tokens", ylabel="samples")
    ax[0, 1].hist(loss_tokens(store), bins=30, color="tab:green")
    ax[0, 1].set(title="loss tokens per sample", xlabel="loss tokens", ylabel="samples")
    labels = [k for k, t in s["tensors"].items() if t["rows"]]
    x = np.arange(len(labels))
    ax[1, 0].bar(x - 0.2, [s["tensors"][k]["std"] for k in labels], 0.4, label="std")
    ax[1, 0].bar(x + 0.2, [s["tensors"][k]["abs_max"] for k in labels], 0.4, label="abs max")
    ax[1, 0].set_xticks(x, labels, rotation=20, fontsize=8)
    ax[1, 0].set(yscale="log", title=f"activations over {s['sampled']} samples")
    ax[1, 0].legend()
    for k in labels:
        ax[1, 1].plot(np.sort(moments[k].channel_rms())[::-1], label=k)
    ax[1, 1].set(yscale="log", title="channel RMS, sorted", xlabel="channel rank", ylabel="RMS")
    ax[1, 1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=100)
