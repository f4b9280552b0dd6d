"""Hidden-state store vs the SpecForge layout, on the same synthetic samples, side by side.

``python -m benchmarks.bench_store`` (~3 min on 2 busy cores) prints one markdown table:
bytes per token on disk, write throughput and random-access read throughput in-process (0w)
and with 1 and 4 DataLoader workers, for (a) the tiny target shape H=256 and (b) Qwen2-Audio-7B's H=4096, for
this store lossless and fp8 and for SpecForge's one ``torch.save`` dict per sample
(``input_ids``, ``loss_mask``, ``aux_hidden_state`` [1,S,3H], ``hidden_state`` [1,S,H], bf16,
written for real), plus a plain sequential read of each layout's files. This store also holds
the audio embeddings, which SpecForge does not. ``--samples/--min-tokens/--max-tokens`` make it
bigger; ``--chunk-sweep`` adds the chunk-size measurement behind ``TARGET_CHUNK_BYTES``.
Reads run against a warm page cache (the files were just written; dropping caches needs root
on a shared machine), so they measure decode + IPC cost, not the disk.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.synth_activations import SynthTarget, make_conversation, sample_lengths
from pipeline.shards import plan_shards
from storage.sample import CapturedSample
from storage.store import create_store, make_header, open_store
from storage.writer import ShardWriter, commit_shard

LAYERS = [2, 16, 29]  # EAGLE-3's low/mid/high picks for a 32-layer target (hf_hidden_states ids)


def write_store(root: Path, samples: list[CapturedSample], h: int, quantization: str, **kw: Any) -> float:
    header = make_header(target_path="synthetic", target_config_hash="0", hidden_size=h, layer_ids=LAYERS,
                         layer_convention="hf_hidden_states", quantization=quantization,
                         layer_ids_by_convention={"hf_hidden_states": LAYERS,
                                                  "decoder_layer": [x - 1 for x in LAYERS]}, **kw)
    t0 = time.perf_counter()
    manifest = create_store(root, header)
    for shard in plan_shards(len(samples), 2):
        with ShardWriter(root, shard, background=True) as w:
            for i in range(shard.start, shard.stop):
                w.write(samples[i])
                if (i - shard.start) % 8 == 7:  # a stage-2 batch
                    w.flush()
            entry = w.finish()
        commit_shard(manifest, shard, entry)
    return time.perf_counter() - t0


class SpecForgeFiles(Dataset):
    """SpecForge's offline layout: ``rows_{g}-{g+2000}/data_{idx}.ckpt``, one dict per sample."""

    def __init__(self, root: Path, n: int):
        self.paths = [root / f"rows_{i // 2000 * 2000}-{i // 2000 * 2000 + 2000}" / f"data_{i}.ckpt" for i in range(n)]

    def write(self, samples: list[CapturedSample], finals: list[torch.Tensor]) -> float:
        t0 = time.perf_counter()
        for path, s, final in zip(self.paths, samples, finals, strict=True):
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"input_ids": s.input_ids, "loss_mask": s.loss_mask.long(),
                        "aux_hidden_state": s.aux_hidden.reshape(1, s.num_tokens, -1),
                        "hidden_state": final[None]}, path)
        return time.perf_counter() - t0

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return torch.load(self.paths[i])


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return 0


def timed_read(dataset: Any, workers: int, order: list[int]) -> tuple[float, int]:
    """Seconds and decoded tensor bytes for reading ``order`` through a DataLoader."""
    loader = DataLoader(dataset, batch_size=None, sampler=order, num_workers=workers,
                        prefetch_factor=4 if workers else None)
    t0 = time.perf_counter()
    n_bytes = sum(tensor_bytes(x) for x in loader)
    return time.perf_counter() - t0, n_bytes


def seq_read(root: Path) -> tuple[float, int]:
    t0, n = time.perf_counter(), 0
    for dirpath, _d, names in sorted(os.walk(root)):
        for name in sorted(names):
            with open(os.path.join(dirpath, name), "rb", buffering=0) as fh:
                while block := fh.read(8 << 20):
                    n += len(block)
    return time.perf_counter() - t0, n


def du(root: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(root) for f in fs)


def bench_shape(work: Path, h: int, n: int, lo: int, hi: int) -> list[dict[str, Any]]:
    target = SynthTarget(h)
    pairs = [make_conversation(target, i, L) for i, L in enumerate(sample_lengths(n, lo, hi))]
    samples, finals = [p[0] for p in pairs], [p[1] for p in pairs]
    tokens = sum(s.num_tokens for s in samples)
    raw_in = sum(tensor_bytes({k: getattr(s, k) for k in ("input_ids", "loss_mask", "aux_hidden",
                                                           "last_hidden", "audio_embeds")}) for s in samples)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    rows: list[dict[str, Any]] = []
    sf = SpecForgeFiles(work / f"specforge-{h}", n)
    sf_in = sum(tensor_bytes({"aux": s.aux_hidden, "final": f, "ids": s.input_ids, "mask": s.loss_mask.long()})
                for s, f in zip(samples, finals, strict=True))
    layouts: list[tuple[str, Path, Any, float, int]] = []
    t = sf.write(samples, finals)
    layouts.append(("SpecForge torch.save", sf.paths[0].parents[1], sf, t, sf_in))
    for quant in ("none", "fp8"):
        root = work / f"store-{h}-{quant}"
        t = write_store(root, samples, h, quant)
        layouts.append((f"this store, {'lossless' if quant == 'none' else 'fp8'}", root, open_store(root), t, raw_in))
    sf_bytes = du(layouts[0][1])
    for name, root, ds, t_write, n_in in layouts:
        row = {"shape": f"H={h}", "layout": name, "B/token": du(root) / tokens, "x SF": du(root) / sf_bytes,
               "write MB/s": n_in / t_write / 1e6, "write tok/s": tokens / t_write}
        t0 = time.perf_counter()
        for i in order:
            ds[i]
        row["0w tok/s"] = tokens / (time.perf_counter() - t0)  # in-process: decode cost alone
        for workers in (1, 4):
            t_read, n_out = timed_read(ds, workers, order)
            row[f"{workers}w tok/s"], row[f"{workers}w GB/s"] = tokens / t_read, n_out / t_read / 1e9
        rows.append(row)
        t_seq, n_seq = seq_read(root)
        rows.append({"shape": f"H={h}", "layout": "  plain sequential read of those files",
                     "1w tok/s": tokens / t_seq, "1w GB/s": n_seq / t_seq / 1e9})
    return rows


def chunk_sweep(work: Path, n: int, lo: int, hi: int) -> list[dict[str, Any]]:
    """Chunk size vs bytes on disk, write speed and in-process (0 workers) random-read speed."""
    rows = []
    for h in (256, 4096):
        target = SynthTarget(h)
        samples = [make_conversation(target, i, L)[0] for i, L in enumerate(sample_lengths(n, lo, hi))]
        tokens = sum(s.num_tokens for s in samples)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        for kib in (64, 256, 512, 1024, 2048, 4096):
            root = work / f"sweep-{h}-{kib}"
            t_write = write_store(root, samples, h, "none", chunk_bytes=kib << 10)
            store = open_store(root)
            aux_rows = store.specs["aux_hidden"].chunk_rows
            t0 = time.perf_counter()
            for i in order:
                store[i]
            t_read = time.perf_counter() - t0
            rows.append({"shape": f"H={h}", "layout": f"lossless, chunks <= {kib} KiB (aux {aux_rows} rows)",
                         "B/token": du(root) / tokens, "write tok/s": tokens / t_write, "0w tok/s": tokens / t_read})
            shutil.rmtree(root)
    return rows


COLUMNS = ["shape", "layout", "B/token", "x SF", "write MB/s", "write tok/s", "0w tok/s", "1w tok/s", "1w GB/s",
           "4w tok/s", "4w GB/s"]


def print_table(rows: list[dict[str, Any]]) -> None:
    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if v < 10 else f"{v:,.0f}"
        return "" if v is None else str(v)

    print("| " + " | ".join(COLUMNS) + " |")
    print("|" + "---|" * len(COLUMNS))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(c)) for c in COLUMNS) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=48, help="samples per shape")
    ap.add_argument("--min-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=2000)
    ap.add_argument("--chunk-sweep", action="store_true", help="also sweep chunk sizes at H=4096")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed after)")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_store-"))
    t0 = time.perf_counter()
    try:
        rows = []
        for h in (256, 4096):
            rows += bench_shape(work, h, args.samples, args.min_tokens, args.max_tokens)
        if args.chunk_sweep:
            rows += chunk_sweep(work, args.samples // 2, args.min_tokens, args.max_tokens)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{args.samples} samples of {args.min_tokens}-{args.max_tokens} tokens per shape, ~25% loss tokens, "
          f"~30% audio tokens; {os.cpu_count()} CPU cores; warm page cache; {time.perf_counter() - t0:.0f} s\n")
    print_table(rows)


if __name__ == "__main__":
    main()
