"""End-to-end stage 3 throughput: real launches of ``stages.train``, tokens/s from metrics.jsonl.

Each variant (ZeRO stage x precision) is one ``python -m stages.train --nproc N`` run into a
fresh run dir; the median of the per-step ``tokens_per_s`` (training time only, all processes)
and the wall time including start-up are reported.

    python -m benchmarks.bench_train --store STORE --target DIR [--nproc 2 --steps 30]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_variant(args: argparse.Namespace, zero: int, precision: str, out: Path) -> dict:
    cmd = [sys.executable, "-m", "stages.train", "--store", args.store, "--target", args.target,
           "--output", str(out), "--nproc", str(args.nproc), "--zero-stage", str(zero), "--precision", precision,
           "--draft-vocab-size", str(args.draft_vocab_size), "--batch-tokens", str(args.batch_tokens),
           "--epochs", "1000", "--max-steps", str(args.steps), "--save-every", str(args.steps),
           "--log-every", "1", "--eval-fraction", "0", "--num-workers", "1"]
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    wall = time.monotonic() - start
    if proc.returncode:
        return {"zero": zero, "precision": precision, "error": proc.stderr[-2000:]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    speeds = [r["tokens_per_s"] for r in rows if r["split"] == "train"][2:]  # skip warm-up steps
    return {"zero": zero, "precision": precision, "median_tokens_per_s": round(statistics.median(speeds)),
            "wall_s": round(wall, 1), "steps": args.steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-tokens", type=int, default=512)
    parser.add_argument("--draft-vocab-size", type=int, default=256)
    parser.add_argument("--zero", default="1,2,3", help="comma-separated ZeRO stages")
    parser.add_argument("--precision", default="fp32,bf16", help="comma-separated: fp32, bf16")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for zero in [int(z) for z in args.zero.split(",")]:
            for precision in args.precision.split(","):
                out = Path(tmp) / f"zero{zero}-{precision}"
                print(json.dumps(run_variant(args, zero, precision, out)), flush=True)


if __name__ == "__main__":
    main()
