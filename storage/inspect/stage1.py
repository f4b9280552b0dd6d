"""``summary``, ``verify``, ``du`` and ``diff`` of ``python -m storage.inspect`` for a stage 1 directory.

Stage 1 (``stages.regenerate``) commits a shard as ``shard-XXXXX-of-YYYYY.jsonl`` +
``errors-XXXXX.jsonl`` and a manifest entry with counts and each file's sha256, size and line
count; a shard in progress has ``progress/<shard>.jsonl``. See the README, "Stage 1".
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.core.durable import sha256_file
from pipeline.core.shards import SHARD_NAME
from pipeline.core.stage1_layout import PROGRESS_DIR, entry_files
from pipeline.data.shard_stage import entry_rejections
from storage.inspect.common import (
    Inspected,
    Problem,
    fmt_counts,
    format_states,
    planned_shards,
    requeue,
    shard_states,
)

COUNTS = ("input_records", "accepted", "rejected", "output_records", "generated_tokens")


def shard_name(index: int, entry: dict[str, Any]) -> str:
    """``shard-XXXXX-of-YYYYY`` from the entry's records file name."""
    names = [n[:-len(".jsonl")] for n in entry.get("files", {}) if SHARD_NAME.fullmatch(n[:-len(".jsonl")])]
    return names[0] if names else f"shard-{index:05d}"


def _files(item: Inspected, entry: dict[str, Any]) -> tuple[Path | None, Path | None]:
    """(records file, errors file) of a committed shard."""
    return entry_files(item.path, entry)


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


def summarize_stage1(item: Inspected) -> dict[str, Any]:
    """Records, rejections by reason, generated tokens and finish reasons of the committed shards."""
    m, entries = item.manifest, [e for _, e in item.done_entries()]
    totals = {k: sum(int(e.get(k, 0)) for e in entries) for k in COUNTS}
    reasons: Counter = Counter()
    finish: Counter = Counter()
    for e in entries:
        reasons.update(entry_rejections(e))
        records, _ = _files(item, e)
        for line in _lines(records) if records and records.is_file() else []:
            for turn in json.loads(line).get("conversations", []):
                if "finish_reason" in turn:
                    finish[str(turn["finish_reason"])] += 1
    partial = {int(m_.group(1)) for p in (item.path / PROGRESS_DIR).glob("*.jsonl")
               if (m_ := SHARD_NAME.fullmatch(p.stem))}
    return {"kind": "stage1", "path": str(item.path), "input": m.get("input"), "target": m.get("target"),
            "engine": m.get("engine"), "sampling": m.get("sampling"), "total_input_records": m.get("input_records"),
            "shards": shard_states(item, partial), **totals, "rejected_by_reason": dict(reasons),
            "finish_reasons": dict(finish)}


def format_stage1_summary(s: dict[str, Any]) -> str:
    turns = max(sum(s["finish_reasons"].values()), 1)
    return "\n".join([
        f"stage 1 output {s['path']}",
        f"  input       {s['input']} ({s['total_input_records']} records)",
        f"  target      {s['target']} ({s['engine']} engine), sampling {s['sampling']}",
        f"  shards      {format_states(s['shards'])}",
        f"  records     {s['input_records']:,} input in committed shards: {s['accepted']:,} regenerated "
        f"({s['output_records']:,} output records), {s['rejected']:,} rejected",
        *fmt_counts(s["rejected_by_reason"], indent="    "),
        f"  generated   {s['generated_tokens']:,} tokens in {sum(s['finish_reasons'].values()):,} turns "
        f"({s['generated_tokens'] / turns:.1f} per turn)",
        "  finish reasons:",
        *fmt_counts(s["finish_reasons"], indent="    "),
    ])


def _shard_problems(item: Inspected, entry: dict[str, Any], deep: bool) -> list[str]:
    out = []
    for fname, info in entry.get("files", {}).items():
        path = item.path / fname
        if not path.is_file():
            out.append(f"{fname} is missing")
        elif path.stat().st_size != info.get("bytes"):
            out.append(f"{fname} has {path.stat().st_size} bytes, the manifest says {info.get('bytes')}")
        elif sha256_file(path) != info.get("sha256"):
            out.append(f"{fname} does not match its sha256 in the manifest")
        elif len(lines := _lines(path)) != info.get("lines"):
            out.append(f"{fname} has {len(lines)} lines, the manifest says {info.get('lines')}")
        elif deep:
            out += [f"{fname} line {n}: not valid JSON" for n, line in enumerate(lines, 1) if not _is_json(line)]
    records, errors = _files(item, entry)
    files = entry.get("files", {})
    if records is None or files[records.name].get("lines") != entry.get("output_records"):
        out.append(f"records file lines != output_records {entry.get('output_records')}")
    if errors is None or files[errors.name].get("lines") != entry.get("rejected"):
        out.append(f"errors file lines != rejected {entry.get('rejected')}")
    if entry.get("accepted", 0) + entry.get("rejected", 0) != entry.get("input_records"):
        out.append(f"accepted {entry.get('accepted')} + rejected {entry.get('rejected')} != input "
                   f"{entry.get('input_records')}")
    return out


def _is_json(line: bytes) -> bool:
    try:
        json.loads(line)
        return True
    except ValueError:
        return False


def verify_stage1(item: Inspected, deep: bool = False) -> dict[str, Any]:
    """Each committed shard's files against the manifest: presence, size, sha256, line counts."""
    problems = []
    for index, entry in item.done_entries():
        name = shard_name(index, entry)
        problems += [Problem(name, f"{name}: {msg}") for msg in _shard_problems(item, entry, deep)]
    notes = [f"{PROGRESS_DIR}/{p.name}: shard in progress (stage 1 resumes from this log)"
             for p in sorted((item.path / PROGRESS_DIR).glob("*.jsonl"))]
    notes += [f"{p.name}: set aside by an earlier --repair" for p in sorted(item.path.glob(".bad-*"))]
    planned, done = planned_shards(item), len(item.done_entries())
    if planned and done < planned:
        notes.append(f"{planned - done} of {planned} planned shards are not committed yet")
    return {"kind": "stage1", "path": str(item.path), "deep": deep, "shards_checked": done,
            "problems": [p.to_json() for p in problems], "notes": notes}


def repair_stage1(item: Inspected, problems: list[Problem]) -> dict[str, Any]:
    """Set bad shards' files aside in ``.bad-<name>-<time>/`` and drop them from the manifest."""
    entries = dict(item.done_entries())
    names = {shard_name(i, e): i for i, e in entries.items()}
    bad = sorted({names[p.shard] for p in problems if p.shard in names})
    actions = [requeue(item, i, [item.path / f for f in entries[i].get("files", {})], item.path) for i in bad]
    base = (f"python -m stages.regenerate --target {item.manifest.get('target')} --input "
            f"{item.manifest.get('input')} --output {item.path} --num-shards {planned_shards(item)}")
    return {"requeued": actions, "not_repairable": [p.message for p in problems if p.shard not in names],
            "rerun": [f"{base} --shard-index {i}  # + the original sampling flags (or its --config)" for i in bad]}


def du_stage1(item: Inspected) -> dict[str, Any]:
    """Bytes per committed shard from the manifest, plus the manifest and progress logs."""
    shards = [{"name": shard_name(i, e), "bytes": sum(int(f.get("bytes", 0)) for f in e.get("files", {}).values()),
               "records": e.get("output_records")} for i, e in item.done_entries()]
    other = {"manifest.json": (item.path / "manifest.json").stat().st_size}
    other.update({f"{PROGRESS_DIR}/{p.name}": p.stat().st_size for p in sorted((item.path / PROGRESS_DIR).glob("*.jsonl"))})
    total = sum(s["bytes"] for s in shards)
    return {"kind": "stage1", "path": str(item.path), "total": total + sum(other.values()), "shards_total": total,
            "shards": shards, "other": other}


def _first_difference(x: Any, y: Any, path: str = "") -> str:
    """Dotted path of the first place two JSON values differ."""
    if type(x) is not type(y):
        return path or "(whole record)"
    if isinstance(x, dict):
        for k in sorted(set(x) | set(y), key=str):
            if k not in x or k not in y or x[k] != y[k]:
                return _first_difference(x.get(k), y.get(k), f"{path}.{k}" if path else str(k))
    if isinstance(x, list):
        if len(x) != len(y):
            return f"{path} (length {len(x)} vs {len(y)})"
        for i, (u, v) in enumerate(zip(x, y, strict=True)):
            if u != v:
                return _first_difference(u, v, f"{path}[{i}]")
    return path or "(whole record)"


def _file_differences(label: str, la: list[bytes], lb: list[bytes]) -> list[str]:
    """One line per differing JSON line of two committed files' lines (records or errors)."""
    out = []
    for n in range(max(len(la), len(lb))):
        if n >= len(la) or n >= len(lb):
            out.append(f"{label} line {n + 1}: only in {'A' if n < len(la) else 'B'}")
        elif la[n] != lb[n]:
            x, y = json.loads(la[n]), json.loads(lb[n])
            out.append(f"{label} line {n + 1} (id {x.get('id')!r}): {_first_difference(x, y)} differs")
    return out


def _read(path: Path | None) -> list[bytes]:
    return _lines(path) if path and path.is_file() else []


def _joined(item: Inspected, entries: dict[int, dict[str, Any]]) -> tuple[list[bytes], list[bytes]]:
    """All committed records and all rejections, in shard order (= input order)."""
    records: list[bytes] = []
    errors: list[bytes] = []
    for i in sorted(entries):
        r, x = _files(item, entries[i])
        records += _read(r)
        errors += _read(x)
    return records, errors


def _complete(item: Inspected, entries: dict[int, dict[str, Any]]) -> bool:
    planned = planned_shards(item)
    return planned is not None and sorted(entries) == list(range(planned))


def diff_stage1(a: Inspected, b: Inspected, max_listed: int = 10) -> dict[str, Any]:
    """Same records and rejections, line by line? Shard by shard when both were sharded alike;
    in input order over all shards when both are complete but sharded differently."""
    ea, eb = dict(a.done_entries()), dict(b.done_entries())
    found, notes = [], []
    records = 0
    if planned_shards(a) != planned_shards(b) and _complete(a, ea) and _complete(b, eb):
        notes.append(f"sharded differently ({planned_shards(a)} vs {planned_shards(b)} shards): "
                     "records and rejections compared in input order")
        (ra, xa), (rb, xb) = _joined(a, ea), _joined(b, eb)
        differing = _file_differences("records", ra, rb)
        records = len(differing)
        found = differing + _file_differences("errors", xa, xb)
    else:
        if set(ea) != set(eb):
            found.append(f"committed shards differ: only in A {sorted(set(ea) - set(eb))}, "
                         f"only in B {sorted(set(eb) - set(ea))}")
        for i in sorted(set(ea) & set(eb)):
            (ra, xa), (rb, xb) = _files(a, ea[i]), _files(b, eb[i])
            differing = _file_differences(shard_name(i, ea[i]), _read(ra), _read(rb))
            records += len(differing)
            found += differing + _file_differences(f"errors-{i:05d}", _read(xa), _read(xb))
    return {"kind": "stage1", "a": str(a.path), "b": str(b.path), "unit": "records",
            "counts": [sum(int(e.get("output_records", 0)) for e in x.values()) for x in (ea, eb)],
            "identical": not found, "differing": records, "differences": found[:max_listed],
            "truncated": len(found) > max_listed, "notes": notes}
