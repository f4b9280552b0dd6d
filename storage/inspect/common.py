"""Shared pieces of ``python -m storage.inspect``: what a directory is, shard states, problems,
moving bad shards aside, number formatting.

A directory is a hidden-state store when its ``manifest.json`` says ``kind: hidden_state_store``
(stage 2) and a stage 1 output when it says ``stage: regenerate``; nothing is guessed from file
names.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.core.manifest import Manifest, shard_key
from pipeline.core.shards import SHARD_NAME

STORE, STAGE1 = "store", "stage1"
TMP_NAME = re.compile(r"\.shard-(\d{5})\.tmp")  # a store shard being written: storage.layout.tmp_dir_name


class InspectError(Exception):
    """The path is not something the command can inspect (exit status 2)."""


@dataclass(frozen=True)
class Inspected:
    """A directory with its manifest, and which kind of output it is."""

    path: Path
    kind: str  # STORE or STAGE1
    manifest: dict[str, Any]

    def done_entries(self) -> list[tuple[int, dict[str, Any]]]:
        """(shard index, manifest entry) of every committed shard, in shard order."""
        shards = self.manifest.get("shards", {})
        return sorted((int(k), v) for k, v in shards.items() if v.get("status") == "done")


def detect(path: str | Path) -> Inspected:
    """Read ``path``'s manifest and tell a store from a stage 1 directory."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise InspectError(f"{path}: no manifest.json (not a hidden-state store or stage 1 output, "
                           f"or not started yet)")
    try:
        manifest = Manifest(path).load()
    except ValueError as err:
        raise InspectError(str(err)) from None
    if manifest.get("kind") == "hidden_state_store":
        return Inspected(path, STORE, manifest)
    if manifest.get("stage") == "regenerate":
        return Inspected(path, STAGE1, manifest)
    raise InspectError(f"{path}/manifest.json is neither a hidden-state store's nor stage 1's")


def planned_shards(item: Inspected) -> int | None:
    """The number of shards the run was planned with, if recorded."""
    m = item.manifest
    planned = m.get("num_shards") if item.kind == STAGE1 else m.get("dump", {}).get("settings", {}).get("num_shards")
    if planned is None:  # older or hand-made store: the shard names carry the count
        names = [SHARD_NAME.fullmatch(str(e.get("name", ""))) for e in m.get("shards", {}).values()]
        counts = {int(n.group(2)) for n in names if n}
        planned = counts.pop() if len(counts) == 1 else None
    return int(planned) if planned is not None else None


def shard_states(item: Inspected, partial: set[int]) -> dict[str, Any]:
    """done / partial / missing shard indices; ``partial`` = shards with a temp dir or progress log."""
    done = [i for i, _ in item.done_entries()]
    planned = planned_shards(item)
    partial_list = sorted(partial - set(done))
    missing = sorted(set(range(planned or 0)) - set(done) - set(partial_list))
    return {"planned": planned, "done": done, "partial": partial_list, "missing": missing}


def format_states(states: dict[str, Any]) -> str:
    planned = states["planned"] if states["planned"] is not None else "?"
    return (f"{len(states['done'])}/{planned} done, {len(states['partial'])} partial {_short(states['partial'])}, "
            f"{len(states['missing'])} missing {_short(states['missing'])}").replace(" []", "")


def _short(indices: list[int], limit: int = 8) -> str:
    head = ", ".join(map(str, indices[:limit]))
    return f"[{head}{', ...' if len(indices) > limit else ''}]"


@dataclass(frozen=True)
class Problem:
    """One finding of ``verify``; ``shard`` is set when re-running that shard would fix it."""

    shard: str | None
    message: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def shard_of(message: str) -> str | None:
    """The shard a validation message starts with (``storage.validate`` prefixes its messages)."""
    match = SHARD_NAME.match(message)
    return match.group(0) if match else None


def set_aside(parent: Path, name: str, paths: list[Path]) -> Path:
    """Move ``paths`` (those that exist) into ``parent/.bad-<name>-<time>/``; nothing is deleted.

    A shard directory among them becomes that directory itself (one rename, no copy); other
    files go inside it. Returns the new directory.
    """
    base = parent / f".bad-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    dest, n = base, 1
    while dest.exists():  # two repairs within a second
        dest, n = base.with_name(f"{base.name}-{n}"), n + 1
    existing = [p for p in paths if p.exists()]
    dirs = [p for p in existing if p.is_dir()]
    if dirs:
        os.replace(dirs[0], dest)
    else:
        dest.mkdir(parents=True)
    for p in existing:
        if p not in dirs[:1]:
            os.replace(p, dest / p.name)
    return dest


def requeue(item: Inspected, index: int, paths: list[Path], bad_parent: Path) -> dict[str, Any]:
    """Set a shard's files aside, then forget it in the manifest, in that order: a shard dir
    left at its final name would be re-committed as is by the writer's resume logic."""
    entry = item.manifest.get("shards", {}).get(shard_key(index), {})
    name = entry.get("name") or f"shard-{index:05d}"
    dest = set_aside(bad_parent, name, paths)
    Manifest(item.path).clear_shard(index)
    return {"shard": index, "name": name, "moved_to": str(dest)}


def fmt_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def fmt_counts(counts: dict[str, int], indent: str = "  ") -> list[str]:
    """``count  key`` lines, largest first."""
    return [f"{indent}{v:8,d}  {k}" for k, v in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def format_diff(d: dict[str, Any]) -> str:
    """Human form of a ``diff`` result (stores and stage 1 directories alike)."""
    unit = d["unit"]
    lines = [f"A {d['a']} ({d['counts'][0]:,} {unit})", f"B {d['b']} ({d['counts'][1]:,} {unit})"]
    if d["identical"]:
        lines.append(f"identical: the same {d['counts'][0]:,} {unit} in the same order, all stored bytes equal")
    else:
        lines.append(f"DIFFERENT: {d['differing']:,} {unit} with different contents")
        lines += [f"  {x}" for x in d["differences"]]
        if d["truncated"]:
            lines.append("  ... (more; raise --max-listed to see them)")
    lines += [f"  note: {x}" for x in d["notes"]]
    return "\n".join(lines)


def format_verify(v: dict[str, Any], repair: dict[str, Any] | None = None) -> str:
    """Human form of a ``verify`` result and, with ``--repair``, of what was done."""
    what = "hidden-state store" if v["kind"] == STORE else "stage 1 output"
    lines = [f"verify {what} {v['path']}{' (deep)' if v['deep'] else ''}: {v['shards_checked']} committed shards"]
    problems = v["problems"]
    lines.append(f"PROBLEMS ({len(problems)}):" if problems else "OK: no problems found")
    lines += [f"  {p['message']}" for p in problems]
    lines += [f"  note: {n}" for n in v["notes"]]
    if repair is not None:
        for a in repair["requeued"]:
            lines.append(f"repair: shard {a['shard']} ({a['name']}) dropped from the manifest, files moved to "
                         f"{a['moved_to']}")
        lines += [f"repair: cannot fix by rerunning a shard: {m}" for m in repair["not_repairable"]]
        if repair["rerun"]:
            lines.append("rerun to redo them:")
            lines += [f"  {c}" for c in repair["rerun"]]
    return "\n".join(lines)


def format_du(d: dict[str, Any]) -> str:
    """Human form of a ``du`` result (a stage 1 directory has no ``by_array``)."""
    lines = [f"{d['path']}: {fmt_bytes(d['total'])} ({d['total']:,} B); shards {fmt_bytes(d['shards_total'])}"]
    if d.get("by_array"):
        tokens = max(d["tokens"], 1)
        lines.append(f"  {'part':24s} {'bytes':>12s} {'share':>7s} {'B/token':>9s}")
        for name, size in d["by_array"].items():
            lines.append(f"  {name:24s} {fmt_bytes(size):>12s} {size / max(d['shards_total'], 1):7.1%} "
                         f"{size / tokens:9.1f}")
    for s in d["shards"]:
        size = fmt_bytes(s["bytes"]) if s["bytes"] is not None else f"? ({s['error']})"
        count = next((f"  {s[k]:,} {k}" for k in ("samples", "records") if s.get(k) is not None), "")
        lines.append(f"  {s['name']:24s} {size:>12s}{count}")
    lines += [f"  {name:24s} {fmt_bytes(size):>12s}" for name, size in d["other"].items()]
    if d.get("by_array"):
        lines.append("  (shards being written are not counted)")
    return "\n".join(lines)


def entry_counts(entry: dict[str, Any]) -> tuple[int | None, int, int]:
    """(input records, accepted, rejected) of a shard's manifest entry, in stage 1's vocabulary,
    which stores use since format 2 (older stores wrote num_input / num_accepted / num_rejected)."""
    n_in = entry.get("input_records", entry.get("num_input"))
    accepted = entry.get("accepted", entry.get("num_accepted", entry.get("num_samples", 0)))
    rejected = entry.get("rejected", entry.get("num_rejected", 0))
    return (None if n_in is None else int(n_in)), int(accepted), int(rejected)
