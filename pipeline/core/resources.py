"""Peak memory, wall time and throughput of a stage, in one spelling for every stage's manifest.

Every stage writes a ``resources`` mapping (shard entries of stages 1 and 2, ``FINISHED`` of a
training run, ``export.json`` of an export, the benchmark's result) with these keys:

- ``wall_s``: seconds the measured work took;
- ``tokens`` and ``tokens_per_s``: the stage's own tokens (stage 1 generated, stage 2 dumped,
  training trained, benchmark decoded; export has none);
- ``peak_rss_bytes``: the kernel's peak resident set of this process (``getrusage`` SELF);
- ``peak_rss_children_bytes``: the largest peak of its children that have exited and been
  reaped (``getrusage`` CHILDREN; vLLM's engine core process counts here once it is stopped);
- ``peak_tree_rss_bytes``: the largest sum of RSS over this process and its live descendants,
  sampled every :data:`SAMPLE_S` seconds (a lower bound: a peak between samples is missed);
- ``cuda_max_allocated_bytes`` / ``cuda_max_reserved_bytes``: torch's CUDA peaks, when CUDA was used.

Peaks are the process's since it started (the kernel keeps no other high-water mark), which
for a stage process is what sizing a job needs.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
import time
from typing import Any

SAMPLE_S = 0.2
# ru_maxrss is in KiB on Linux and in bytes on macOS
_RU_UNIT = 1 if sys.platform == "darwin" else 1024


def peak_rss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """The kernel's peak RSS of this process (``RUSAGE_SELF``) or of its largest reaped child."""
    return int(resource.getrusage(who).ru_maxrss) * _RU_UNIT


def tree_rss_bytes(pid: int | None = None) -> int:
    """RSS of a process and all of its live descendants now (0 for what vanished meanwhile)."""
    import psutil

    try:
        root = psutil.Process(pid or os.getpid())
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            continue
    return total


def _cuda_peaks() -> dict[str, int]:
    torch = sys.modules.get("torch")  # never import torch just to find that CUDA was not used
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    return {"cuda_max_allocated_bytes": int(torch.cuda.max_memory_allocated()),
            "cuda_max_reserved_bytes": int(torch.cuda.max_memory_reserved())}


class ResourceMeter:
    """Measures one piece of a stage's work: ``with ResourceMeter() as m: ...; m.result(tokens)``.

    A daemon thread samples the process tree's RSS while the block runs; :meth:`result` may be
    called inside the block (the numbers so far) or after it.
    """

    def __init__(self, sample_s: float = SAMPLE_S):
        self.sample_s = sample_s
        self.start = time.monotonic()
        self.end: float | None = None
        self.peak_tree = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ResourceMeter:
        self.start = time.monotonic()
        self.peak_tree = tree_rss_bytes()
        self._thread = threading.Thread(target=self._sample, name="resource-meter", daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.sample_s):
            self.peak_tree = max(self.peak_tree, tree_rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self.end is None:
            self.end = time.monotonic()
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_tree = max(self.peak_tree, tree_rss_bytes())

    def result(self, tokens: int | None = None, wall_s: float | None = None) -> dict[str, Any]:
        """The ``resources`` mapping; ``wall_s`` overrides the measured time (a trainer that counts
        training time only)."""
        wall = wall_s if wall_s is not None else (self.end or time.monotonic()) - self.start
        out: dict[str, Any] = {"wall_s": round(wall, 3)}
        if tokens is not None:
            out.update(tokens=int(tokens), tokens_per_s=round(tokens / wall, 3) if wall > 0 else None)
        out.update(peak_rss_bytes=peak_rss_bytes(), peak_rss_children_bytes=peak_rss_bytes(resource.RUSAGE_CHILDREN),
                   peak_tree_rss_bytes=max(self.peak_tree, tree_rss_bytes()), **_cuda_peaks())
        return out


def combine(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One row from several measurements of a stage (its shards, its ranks): peaks are maxima,
    wall time and tokens add up (shards ran one after another, or tokens/s would be a sum of rates)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    out: dict[str, Any] = {"wall_s": round(sum(p.get("wall_s", 0.0) for p in parts), 3)}
    if any("tokens" in p for p in parts):
        tokens = sum(p.get("tokens", 0) for p in parts)
        out.update(tokens=tokens, tokens_per_s=round(tokens / out["wall_s"], 3) if out["wall_s"] > 0 else None)
    for key in sorted({k for p in parts for k in p if k.endswith("_bytes") or k.startswith("mfu")}):
        out[key] = max(p[key] for p in parts if p.get(key) is not None)
    return out


def format_table(rows: dict[str, dict[str, Any]]) -> str:
    """One line per stage: wall time, tokens/s, peak RSS (self, children, tree), CUDA peak, MFU."""

    def gib(value: Any) -> str:
        return "-" if value is None else f"{value / 2**30:.2f}"

    lines = [f"{'stage':12}{'wall s':>9}{'tokens/s':>11}{'RSS GiB':>9}{'children':>10}{'tree':>8}"
             f"{'CUDA GiB':>10}{'MFU':>8}"]
    for stage, r in rows.items():
        rate = "-" if r.get("tokens_per_s") is None else f"{r['tokens_per_s']:.1f}"
        mfu = "-" if r.get("mfu") is None else f"{r['mfu']:.2%}"
        lines.append(f"{stage:12}{r.get('wall_s', 0.0):>9.1f}{rate:>11}{gib(r.get('peak_rss_bytes')):>9}"
                     f"{gib(r.get('peak_rss_children_bytes')):>10}{gib(r.get('peak_tree_rss_bytes')):>8}"
                     f"{gib(r.get('cuda_max_reserved_bytes')):>10}{mfu:>8}")
    return "\n".join(lines)
