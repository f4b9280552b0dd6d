"""Hidden-state store vs the SpecForge layout, on the same synthetic samples, side by side.

``python -m benchmarks.bench_store`` (~8 min on 2 busy cores) prints two markdown tables.

Layouts, for the tiny target's H=256 and Qwen2-Audio-7B's H=4096: SpecForge's one ``torch.save``
dict per sample (``input_ids``, ``loss_mask``, ``aux_hidden_state`` [1,S,3H], ``hidden_state``
[1,S,H], bf16, written for real); this store as written before format 2 (sha256, zstd: the
"before"); this store lossless and fp8 with each codec (zstd, lz4, none). fp8 stores are read as
the training device needs them (uint8 + scales, dequantized there); one more row reads the fp8
zstd store dequantized on the CPU (what a CPU-only run does).

Per layout: bytes per token on disk, write throughput (stage 2's writer: background thread, a
flush every 8 samples, 2 compression threads), random-access read throughput in-process with the
integrity checks training uses (read checksum per chunk + NaN/Inf count) and without them, the
tokens per CPU-second of the checked read (reads use one thread unless said), in-process with 2
read threads, and through a DataLoader with 1 and 4 workers (checked), plus a plain sequential
read of each layout's files. Every read is repeated ``--repeats`` times, layouts interleaved
within a repeat so that load from other jobs hits all of them alike; cells give the median and
[min-max]; "x SF" and "x seq" are the medians of the per-repeat ratios to SpecForge's in-process
read and to the plain sequential read of the same files. SpecForge's read is measured twice:
as the allocator happens to serve it, and on fresh pages, which is how every sample of more
than ~1,400 tokens at H=4096 is read in a real run ("x SF fresh"; see SpecForgeFreshPages).

The second table is the writer alone at H=4096: sustained tokens/s and raw-bf16 MB/s per writer
with 1, 2 and 4 compression threads, against a GPU forward of 10k and 20k tokens/s (the README's
estimate for a 7B on one H100), once onto this machine's disk (every flush fsyncs: the disk's
write bandwidth) and once into ``--cpu-bound-dir`` (default /dev/shm, a tmpfs: fsync is free, so
what is left is the writer's CPU work). This machine has 2 cores: 2 threads here is what each of
8 GPU writers gets on a 16-core node. Wall rates on a shared machine depend on what else runs, so
the writer's CPU-seconds per token are given too, and from them the cores a writer needs to keep
up with each GPU rate (the writer's work parallelises over chunks up to its thread count).

Reads run against a warm page cache (the files were just written; dropping caches needs root on a
shared machine), so they measure decode + check + IPC cost, not the disk. ``--chunk-sweep`` adds
the chunk-size measurement behind ``TARGET_CHUNK_BYTES``.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from benchmarks.synth_activations import SynthTarget, make_conversation, sample_lengths
from pipeline.core.shards import plan_shards
from storage.sample import CapturedSample
from storage.store import HiddenStateStore, create_store, make_header, open_store
from storage.writer import ShardWriter, commit_shard

LAYERS = [2, 16, 29]  # EAGLE-3's low/mid/high picks for a 32-layer target (hf_hidden_states ids)
GPU_TOK_S = (10_000, 20_000)


def write_store(root: Path, samples: list[CapturedSample], h: int, quantization: str = "none",
                threads: int = 2, **kw: Any) -> float:
    """Seconds to write ``samples`` as stage 2 does (2 shards, a flush per 8-sample batch)."""
    header = make_header(target_path="synthetic", target_config_hash="0", hidden_size=h, layer_ids=LAYERS,
                         layer_convention="hf_hidden_states", quantization=quantization,
                         layer_ids_by_convention={"hf_hidden_states": LAYERS,
                                                  "decoder_layer": [x - 1 for x in LAYERS]}, **kw)
    t0 = time.perf_counter()
    manifest = create_store(root, header)
    for shard in plan_shards(len(samples), 2):
        with ShardWriter(root, shard, background=True, compression_threads=threads) as w:
            for i in range(shard.start, shard.stop):
                w.write(samples[i])
                if (i - shard.start) % 8 == 7:
                    w.flush()
            entry = w.finish()
        commit_shard(manifest, shard, entry)
    return time.perf_counter() - t0


class SpecForgeFiles(Dataset):
    """SpecForge's offline layout: ``rows_{g}-{g+2000}/data_{idx}.ckpt``, one dict per sample."""

    def __init__(self, root: Path, n: int):
        self.root = root
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


class SpecForgeFreshPages(SpecForgeFiles):
    """The same files, read as a real SpecForge run reads them: every tensor on fresh pages.

    glibc serves allocations over its mmap threshold (which grows with use up to 32 MiB) from
    fresh mappings that the kernel zeroes on first touch, and smaller ones from recycled heap
    memory. At H=4096 a sample's aux tensor passes 32 MiB from ~1,400 tokens, so real samples
    (2-8k tokens) always get fresh pages, while the benchmark's 200-2,000-token ones land on
    either side depending on what ran before: torch.load of one 500-token sample measured 498k
    tokens/s recycled vs 65-75k fresh. ``malloc_trim(0)`` before each load hands the freed heap
    back, so every load starts on fresh pages; its own time is excluded (``excluded_s``) from the
    in-process read, not from the DataLoader columns, where it runs in the workers.
    """

    def __init__(self, root: Path, n: int):
        super().__init__(root, n)
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"))
        self.excluded_s = 0.0

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        self._libc.malloc_trim(0)
        self.excluded_s += time.perf_counter() - t0
        return torch.load(self.paths[i])


class StoreSamples(Dataset):
    """The store's samples as training reads them (``dequantize=False``: what a GPU needs)."""

    def __init__(self, store: HiddenStateStore, dequantize: bool):
        self.store, self.dequantize = store, dequantize

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.store.sample(i, dequantize=self.dequantize)


@dataclass
class Layout:
    name: str
    root: Path
    write_s: float | None  # None: a read mode of the layout above (same files)
    checked: Callable[[int], Dataset] | None  # read threads -> dataset with integrity checks
    unchecked: Dataset
    written_bytes: int  # raw tensor bytes handed to the writer


def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    return 0


def in_process(dataset: Dataset, order: list[int]) -> tuple[float, float]:
    """(wall s, CPU s of this process) to read ``order`` in this process."""
    excluded = getattr(dataset, "excluded_s", 0.0)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in order:
        dataset[i]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    excluded = getattr(dataset, "excluded_s", 0.0) - excluded
    return wall - excluded, cpu - excluded


def with_workers(dataset: Dataset, workers: int, order: list[int]) -> float:
    loader = DataLoader(dataset, batch_size=None, sampler=order, num_workers=workers, prefetch_factor=4)
    t0 = time.perf_counter()
    for x in loader:
        tensor_bytes(x)
    return time.perf_counter() - t0


def seq_read(root: Path) -> float:
    t0 = time.perf_counter()
    for dirpath, _d, names in sorted(os.walk(root)):
        for name in sorted(names):
            with open(os.path.join(dirpath, name), "rb", buffering=0) as fh:
                while fh.read(8 << 20):
                    pass
    return time.perf_counter() - t0


def du(root: Path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _s, fs in os.walk(root) for f in fs)


def make_samples(h: int, n: int, lo: int, hi: int) -> tuple[list[CapturedSample], list[torch.Tensor]]:
    target = SynthTarget(h)
    pairs = [make_conversation(target, i, length) for i, length in enumerate(sample_lengths(n, lo, hi))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def raw_bytes(s: CapturedSample) -> int:
    return tensor_bytes({k: getattr(s, k) for k in ("input_ids", "loss_mask", "aux_hidden", "last_hidden", "audio_embeds")})


def build_layouts(work: Path, h: int, samples: list[CapturedSample], finals: list[torch.Tensor]) -> list[Layout]:
    n_raw = sum(raw_bytes(s) for s in samples)
    sf = SpecForgeFiles(work / f"specforge-{h}", len(samples))
    sf_in = sum(tensor_bytes({"aux": s.aux_hidden, "final": f, "ids": s.input_ids, "mask": s.loss_mask.long()})
                for s, f in zip(samples, finals, strict=True))
    layouts = [Layout("SpecForge torch.save", sf.root, sf.write(samples, finals), None, sf, sf_in),
               Layout("  same files, fresh pages (as every real sample at H=4096)", sf.root, None, None,
                      SpecForgeFreshPages(sf.root, len(samples)), sf_in)]
    stores = [("this store before format 2 (sha256, zstd)", "none", dict(codec="zstd", checksum="sha256"))]
    stores += [(f"this store, lossless, {c}", "none", dict(codec=c)) for c in ("zstd", "lz4", "none")]
    stores += [(f"this store, fp8, {c} (uint8 to the device)", "fp8", dict(codec=c)) for c in ("zstd", "lz4", "none")]
    for name, quant, kw in stores:
        root = work / f"store-{h}-{quant}-{kw['codec']}-{kw.get('checksum', 'new')}"
        t = write_store(root, samples, h, quant, **kw)
        dq = quant == "none"
        layouts.append(Layout(name, root, t, lambda threads, r=root, d=dq: StoreSamples(
            open_store(r, verify_chunks=True, read_threads=threads), d), StoreSamples(open_store(root), dq), n_raw))
        if quant == "fp8" and kw["codec"] == "zstd":
            layouts.append(Layout("  same fp8 zstd store, dequantized on the CPU", root, None,
                                  lambda threads, r=root: StoreSamples(open_store(r, verify_chunks=True,
                                                                                  read_threads=threads), True),
                                  StoreSamples(open_store(root), True), n_raw))
    return layouts


def cell(values: list[float]) -> str:
    def f(v: float) -> str:
        return f"{v:.2f}" if v < 10 else f"{v:,.0f}"

    if not values:
        return ""
    return f(statistics.median(values)) + (f" [{f(min(values))}-{f(max(values))}]" if len(values) > 1 else "")


def bench_shape(work: Path, h: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    samples, finals = make_samples(h, args.samples, args.min_tokens, args.max_tokens)
    tokens = sum(s.num_tokens for s in samples)
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    layouts = build_layouts(work, h, samples, finals)
    del samples, finals
    sf_bytes = du(layouts[0].root)
    keys = ("checked", "unchecked", "cpu", "threads2", "w1", "w4", "seq", "xsf", "xsf_fresh", "xsf_cpu", "xseq")
    res: dict[str, dict[str, list[float]]] = {lay.name: {k: [] for k in keys} for lay in layouts}
    checked = {lay.name: (lay.checked(1), lay.checked(2)) for lay in layouts if lay.checked}
    for _rep in range(args.repeats):
        for lay in layouts:
            r = res[lay.name]
            t_seq = seq_read(lay.root)
            r["seq"].append(tokens / t_seq)
            t, cpu = in_process(lay.unchecked, order)
            r["unchecked"].append(tokens / t)
            if lay.checked is None:  # SpecForge: torch.load checks nothing; its one read is both
                r["cpu"].append(tokens / cpu)
                continue
            one, two = checked[lay.name]
            t, cpu = in_process(one, order)
            r["checked"].append(tokens / t)
            r["cpu"].append(tokens / cpu)
            r["xseq"].append(t_seq / t)
            r["xsf"].append(tokens / t / res[layouts[0].name]["unchecked"][-1])
            r["xsf_fresh"].append(tokens / t / res[layouts[1].name]["unchecked"][-1])
            r["xsf_cpu"].append(tokens / cpu / res[layouts[0].name]["cpu"][-1])
            r["threads2"].append(tokens / in_process(two, order)[0])
        for lay in layouts:
            ds = checked[lay.name][0] if lay.checked else lay.unchecked
            for w in (1, 4):
                res[lay.name][f"w{w}"].append(tokens / with_workers(ds, w, order))
    rows = []
    for lay in layouts:
        r = res[lay.name]
        row: dict[str, Any] = {"shape": f"H={h}", "layout": lay.name}
        if lay.write_s is not None:
            size = du(lay.root)
            row.update({"B/token": f"{size / tokens:,.0f}", "x SF bytes": f"{size / sf_bytes:.2f}",
                        "write tok/s": f"{tokens / lay.write_s:,.0f}",
                        "write MB/s": f"{lay.written_bytes / lay.write_s / 1e6:,.0f}"})
        row.update({"read tok/s, checked": cell(r["checked"]), "x SF": cell(r["xsf"]),
                    "x SF fresh": cell(r["xsf_fresh"]),
                    "unchecked": cell(r["unchecked"]), "tok/CPU-s": cell(r["cpu"]),
                    "x SF per CPU-s": cell(r["xsf_cpu"]),
                    "2 threads": cell(r["threads2"]), "1 worker": cell(r["w1"]), "4 workers": cell(r["w4"]),
                    "x seq": cell(r["xseq"]), "seq read tok/s": cell(r["seq"])})
        rows.append(row)
    for lay in layouts:  # free the page cache for the next shape
        shutil.rmtree(lay.root, ignore_errors=True)
    return rows


def writer_sweep(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Stage 2's writer alone at H=4096: sustained rate per compression-thread count."""
    h = 4096
    samples, _finals = make_samples(h, args.samples // 2, args.min_tokens, args.max_tokens)
    tokens = sum(s.num_tokens for s in samples)
    n_raw = sum(raw_bytes(s) for s in samples)
    targets = [("disk (fsync)", work)]
    if args.cpu_bound_dir and Path(args.cpu_bound_dir).is_dir():
        targets.append(("tmpfs (CPU only)", Path(tempfile.mkdtemp(prefix="bench_store-", dir=args.cpu_bound_dir))))
    rows = []
    try:
        for (where, base), codec, threads in ((t, c, n) for t in targets for c in ("zstd", "none") for n in (1, 2, 4)):
            times, cpus = [], []
            for rep in range(args.sweep_repeats):
                root = base / f"sweep-{codec}-{threads}-{rep}"
                c0 = time.process_time()
                times.append(write_store(root, samples, h, codec=codec, threads=threads))
                cpus.append(time.process_time() - c0)
                shutil.rmtree(root)
            med, per_cpu = tokens / statistics.median(times), tokens / statistics.median(cpus)
            rows.append({"into": where, "codec": codec, "threads": threads, "write tok/s": cell([tokens / t for t in times]),
                         "raw MB/s": cell([n_raw / t / 1e6 for t in times]),
                         "tok/CPU-s": cell([tokens / c for c in cpus]),
                         **{f"vs GPU {g // 1000}k tok/s": f"{med / g:.2f}x {'keeps up' if med >= g else 'falls behind'}"
                            for g in GPU_TOK_S},
                         **{f"cores for {g // 1000}k tok/s": f"{g / per_cpu:.1f}" for g in GPU_TOK_S}})
    finally:
        for _where, base in targets[1:]:
            shutil.rmtree(base, ignore_errors=True)
    return rows


def chunk_sweep(work: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Chunk size vs bytes on disk, write speed and in-process checked random-read speed."""
    rows = []
    for h in (256, 4096):
        samples, _ = make_samples(h, args.samples // 2, args.min_tokens, args.max_tokens)
        tokens = sum(s.num_tokens for s in samples)
        order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
        for kib in (64, 256, 512, 1024, 2048, 4096):
            root = work / f"chunks-{h}-{kib}"
            t_write = write_store(root, samples, h, chunk_bytes=kib << 10)
            store = open_store(root, verify_chunks=True)
            t_read = in_process(StoreSamples(store, True), order)[0]
            rows.append({"shape": f"H={h}", "layout": f"lossless zstd, chunks <= {kib} KiB "
                                                      f"(aux {store.specs['aux_hidden'].chunk_rows} rows)",
                         "B/token": f"{du(root) / tokens:,.0f}", "write tok/s": f"{tokens / t_write:,.0f}",
                         "read tok/s, checked": f"{tokens / t_read:,.0f}"})
            shutil.rmtree(root)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in columns) + " |")
    print()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # 32 samples at H=4096 are ~6 GB in all the layouts: they must stay in the page cache (a
    # shared 24 GB machine); 48 (~9 GB) were partly read back from disk under memory pressure
    ap.add_argument("--samples", type=int, default=32, help="samples per shape")
    ap.add_argument("--min-tokens", type=int, default=200)
    ap.add_argument("--max-tokens", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3, help="read measurements per layout")
    ap.add_argument("--sweep-repeats", type=int, default=2, help="writes per codec and thread count")
    ap.add_argument("--shapes", default="256,4096", help="hidden sizes to run")
    ap.add_argument("--no-writer-sweep", action="store_true")
    ap.add_argument("--cpu-bound-dir", default="/dev/shm", help="a tmpfs for the writer sweep's CPU-only runs ('' to skip)")
    ap.add_argument("--chunk-sweep", action="store_true", help="also sweep chunk sizes")
    ap.add_argument("--workdir", default=None, help="where to write (default: a temp dir, removed after)")
    args = ap.parse_args()
    torch.set_num_threads(1)  # torch.load and the numpy/Blosc paths are single-threaded alike
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_store-"))
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    try:
        rows = [r for h in map(int, args.shapes.split(",")) for r in bench_shape(work, h, args)]
        sweep = [] if args.no_writer_sweep else writer_sweep(work, args)
        chunks = chunk_sweep(work, args) if args.chunk_sweep else []
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    load1 = os.getloadavg()
    print(f"\n{args.samples} samples of {args.min_tokens}-{args.max_tokens} tokens per shape, ~25% loss tokens, "
          f"~30% audio tokens; {os.cpu_count()} CPU cores; warm page cache; {args.repeats} repeats; "
          f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end; {time.perf_counter() - t0:.0f} s\n")
    print_table(rows)
    if sweep:
        print(f"Writer alone, H=4096, {args.samples // 2} samples, {args.sweep_repeats} runs each:\n")
        print_table(sweep)
    if chunks:
        print_table(chunks)


if __name__ == "__main__":
    main()
