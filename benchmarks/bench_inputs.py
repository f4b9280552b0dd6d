"""Read speed of every input format: records/s through the reader, without and with audio decoding.

    python -m benchmarks.bench_inputs [--records 2000] [--workdir /tmp/bench-inputs]

Writes the same ``--records`` ASR pairs (the 24 fixture clips over and over, FLAC bytes, ~2.5 s
each) as a conversation jsonl (paths to the clip files), Hub-style parquet files (``datasets``
with its Audio feature, 4 files), a ``save_to_disk`` dataset and 4 WebDataset shards, then times
``InputSource.read()`` over all of them: first counting and planning (what every job of an array
does before its shard), then reading (rows mapped to records; audio untouched), then reading with
every clip decoded to 16 kHz float32 (what stage 1 does next). Single process; the machine's
other load shows in the numbers, so rerun on a quiet machine to compare.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from pipeline.data.audio import load_audio
from pipeline.data.records import Record
from pipeline.data.sources import InputSource

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from source_datasets import CLIPS, TEXTS  # noqa: E402


def write_all(root: Path, n: int) -> dict[str, Path]:
    import webdataset as wds
    from datasets import Audio, Dataset

    ids = [f"rec-{i:06d}" for i in range(n)]
    clip = [CLIPS[i % len(CLIPS)] for i in range(n)]
    blobs = {c: c.read_bytes() for c in CLIPS}
    root.mkdir(parents=True)
    with open(root / "pairs.jsonl", "w") as fh:
        for rid, c in zip(ids, clip, strict=True):
            fh.write(json.dumps({"id": rid, "conversations": [{"role": "user", "content": [
                {"type": "audio", "audio": str(c)}, {"type": "text", "text": "Transcribe."}]}]}) + "\n")
    ds = Dataset.from_dict({"id": ids, "audio": [{"bytes": blobs[c], "path": c.name} for c in clip],
                            "text": [TEXTS[CLIPS.index(c)] for c in clip]}).cast_column("audio", Audio())
    (root / "parquet").mkdir()
    for k in range(4):
        ds.shard(4, k, contiguous=True).to_parquet(str(root / "parquet" / f"train-{k:05d}-of-00004.parquet"))
    ds.save_to_disk(str(root / "saved"))
    (root / "wds").mkdir()
    for k in range(4):
        with wds.TarWriter(str(root / "wds" / f"shard-{k:06d}.tar")) as sink:
            for i in range(k * n // 4, (k + 1) * n // 4):
                sink.write({"__key__": ids[i], "flac": blobs[clip[i]], "json": {"text": TEXTS[CLIPS.index(clip[i])]}})
    return {"jsonl": root / "pairs.jsonl", "parquet": root / "parquet", "save_to_disk": root / "saved",
            "webdataset": root / "wds"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=2000)
    ap.add_argument("--workdir", default="/tmp/bench-inputs")
    args = ap.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    specs = write_all(work, args.records)
    print(f"{args.records} records per format (~2.5 s FLAC clips); records/s, single process")
    print(f"{'format':13s} {'MB':>7s} {'plan s':>7s} {'read rec/s':>11s} {'+decode rec/s':>14s}")
    for name, spec in specs.items():
        size = sum(f.stat().st_size for f in ([spec] if spec.is_file() else spec.rglob("*")) if f.is_file())
        t0 = time.perf_counter()
        source = InputSource(spec)
        source.plan()
        t1 = time.perf_counter()
        recs = [r for r in source.read() if isinstance(r, Record)]
        t2 = time.perf_counter()
        assert len(recs) == args.records, (name, len(recs))
        again = InputSource(spec)
        again.plan()
        t2 = time.perf_counter()
        decoded = 0
        for rec in again.read():
            decoded += sum(len(load_audio(a)) for a in rec.audio_paths)
        t3 = time.perf_counter()
        assert decoded == args.records
        print(f"{name:13s} {size / 1e6:7.1f} {t1 - t0:7.2f} {args.records / (t2 - t1):11.0f} "
              f"{args.records / (t3 - t2):14.0f}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
