"""``summary``, ``du`` and ``diff`` of ``python -m storage.inspect`` for a hidden-state store.

Everything but ``diff`` reads only the manifest, the per-shard ``checksums.json`` and the errors
files: a summary of a 500-shard store needs no directory walk and no chunk reads.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.data.shard_stage import entry_rejections
from storage.checksum import store_checksum
from storage.footprint import raw_store_bytes
from storage.inspect.common import (
    TMP_NAME,
    Inspected,
    entry_counts,
    fmt_bytes,
    fmt_counts,
    format_states,
    shard_states,
)
from storage.layout import ARRAYS_DIR, CHECKSUMS_NAME, INDEX_NAME, SHARDS_DIR
from storage.reader import ShardReader
from storage.store import HiddenStateStore, open_store

# SpecForge's offline layout: per token 3 aux states + the last hidden state in bf16 (4*H*2 B,
# 32,768 B at H=4096) plus input_ids and loss_mask as int64 (16 B), whatever the loss mask says
SPECFORGE_ID_BYTES = 16
HEADER_VOLATILE = ("created", "updated")  # differ between two otherwise identical runs


def partial_shards(item: Inspected) -> set[int]:
    """Shards with a writer temp dir (being written, or killed mid-shard)."""
    shards_dir = item.path / SHARDS_DIR
    names = os.listdir(shards_dir) if shards_dir.is_dir() else []
    return {int(m.group(1)) for n in names if (m := TMP_NAME.fullmatch(n))}


def rejections_by_reason(item: Inspected) -> Counter:
    """Rejections of the committed shards, classed like stage 1's summary (errors files are small)."""
    from pipeline.data.records import reason_key  # one classification for both stages' rejections

    counts: Counter = Counter()
    for _, entry in item.done_entries():
        path = item.path / str(entry.get("errors_file", ""))
        if entry.get("errors_file") and path.is_file():
            counts.update(reason_key(json.loads(line)) for line in path.read_text("utf-8").splitlines())
        else:
            counts.update(entry_rejections(entry))  # this release's field name or the one before
    return counts


def raw_bf16_bytes(hidden: int, layers: int, tokens: int, last: int, audio: int) -> int:
    """The same content uncompressed, every hidden value as 2 bytes (ids int32, mask uint8)."""
    return raw_store_bytes(hidden, tokens, last, audio, layers)


def summarize_store(item: Inspected, dataset_tokens: int | None = None) -> dict[str, Any]:
    """The numbers ``summary`` prints (JSON-able)."""
    m, entries = item.manifest, [e for _, e in item.done_entries()]
    hidden, layers = int(m["hidden_size"]), int(m["num_aux_layers"])
    total = {k: sum(int(e.get(k, 0)) for e in entries)
             for k in ("num_samples", "num_tokens", "num_loss_tokens", "num_last", "num_audio", "bytes")}
    counts = [entry_counts(e) for e in entries]
    total["num_rejected"] = sum(c[2] for c in counts)
    total["num_input"] = sum(c[0] or 0 for c in counts)
    tokens, size = total["num_tokens"], total["bytes"]
    raw = raw_bf16_bytes(hidden, layers, tokens, total["num_last"], total["num_audio"])
    per_token = size / tokens if tokens else None
    specforge = 4 * hidden * 2 + SPECFORGE_ID_BYTES
    out: dict[str, Any] = {
        "kind": "store", "path": str(item.path), "target": m.get("target"), "aux_layers": m.get("aux_layers"),
        "hidden_size": hidden, "dtype": m.get("dtype"), "quantization": m.get("quantization", {}).get("mode"),
        "format_version": m.get("format_version"), "read_checksum": store_checksum(m),
        "arrays": {a["name"]: _codec(a) for a in m.get("arrays", [])},
        "shards": shard_states(item, partial_shards(item)),
        "samples": total["num_samples"], "input_records": total["num_input"] or None, "tokens": tokens,
        "loss_tokens": total["num_loss_tokens"], "last_hidden_rows": total["num_last"],
        "audio_tokens": total["num_audio"], "rejected": total["num_rejected"],
        "rejected_by_reason": dict(rejections_by_reason(item)),
        "bytes": size, "bytes_per_token": per_token, "raw_bf16_bytes": raw,
        "stored_vs_raw_bf16": size / raw if raw else None,
        "specforge_bytes_per_token": specforge, "specforge_bytes": specforge * tokens,
    }
    if dataset_tokens:
        out["estimate"] = {"dataset_tokens": dataset_tokens, "specforge_bytes": specforge * dataset_tokens,
                           "bytes": per_token * dataset_tokens if per_token else None}
    return out


def _codec(spec: dict[str, Any]) -> str:
    c = spec["compressor"]
    comp = "raw (no codec)" if c["cname"] == "none" else f"{c['cname']}-{c['clevel']} {c['shuffle']}"
    return f"{spec['encoding']} {spec['dtype']}, {comp}, {spec['chunk_rows']} rows/chunk"


def format_store_summary(s: dict[str, Any]) -> str:
    layers = s["aux_layers"] or {}
    others = ", ".join(f"{k} {v}" for k, v in layers.get("by_convention", {}).items() if k != layers.get("convention"))
    tokens = max(s["tokens"], 1)
    lines = [
        f"hidden-state store {s['path']}",
        f"  target      {s['target'].get('path')} (identity sha256 {s['target'].get('config_hash')})",
        f"  aux layers  {layers.get('convention')} {layers.get('ids')}" + (f" (= {others})" if others else ""),
        f"  values      hidden size {s['hidden_size']}, {s['dtype']}, quantization {s['quantization']}",
        f"  format      {s['format_version']}, reads check {s['read_checksum']} per chunk (verify --deep: sha256)",
        *(f"  {name:27s} {codec}" for name, codec in s["arrays"].items()),
        f"  shards      {format_states(s['shards'])}",
        f"  samples     {s['samples']:,}" + (f" of {s['input_records']:,} input records" if s["input_records"] else ""),
        f"  tokens      {s['tokens']:,} (loss {s['loss_tokens']:,} = {s['loss_tokens'] / tokens:.1%}; "
        f"last_hidden rows {s['last_hidden_rows']:,}; audio {s['audio_tokens']:,})",
        f"  rejected    {s['rejected']:,}",
        *fmt_counts(s["rejected_by_reason"], indent="    "),
        f"  on disk     {fmt_bytes(s['bytes'])} in committed shards"
        + (f" = {s['bytes_per_token']:,.0f} B/token" if s["bytes_per_token"] else ""),
    ]
    if s["stored_vs_raw_bf16"]:
        lines.append(f"  vs raw bf16 {s['stored_vs_raw_bf16']:.1%} of {fmt_bytes(s['raw_bf16_bytes'])} "
                     f"({1 / s['stored_vs_raw_bf16']:.2f}x smaller)")
    ratio = f" ({s['specforge_bytes'] / s['bytes']:.1f}x this store)" if s["bytes"] else ""
    lines.append(f"  SpecForge   {s['specforge_bytes_per_token']:,} B/token (4*H*2 + int64 ids/mask) -> "
                 f"{fmt_bytes(s['specforge_bytes'])} for these tokens{ratio}")
    if "estimate" in s:
        e = s["estimate"]
        here = fmt_bytes(e["bytes"]) if e["bytes"] else "unknown (no tokens yet)"
        lines.append(f"  estimate    {e['dataset_tokens']:,} tokens: {here} here vs "
                     f"{fmt_bytes(e['specforge_bytes'])} in SpecForge's layout")
    return "\n".join(lines)


def _part(rel: str) -> str:
    """The du bucket of a file listed in checksums.json: its array, the index, or metadata."""
    parts = rel.split("/")
    if parts[0] == ARRAYS_DIR and len(parts) > 2:
        return parts[1]
    return "index" if rel == INDEX_NAME else "metadata"


def du_store(item: Inspected) -> dict[str, Any]:
    """Bytes per shard and per array, from each shard's checksums.json (no directory walk)."""
    shards, arrays = [], Counter()
    for _, entry in item.done_entries():
        name = entry["name"]
        try:
            listing = json.loads((item.path / SHARDS_DIR / name / CHECKSUMS_NAME).read_text())
        except (OSError, json.JSONDecodeError) as err:
            shards.append({"name": name, "bytes": None, "error": f"{CHECKSUMS_NAME}: {err}"})
            continue
        parts = Counter({_part(rel): 0 for rel in listing["files"]})
        for rel, (size, _sha) in listing["files"].items():
            parts[_part(rel)] += size
        parts[CHECKSUMS_NAME] = int(entry["bytes"]) - int(entry["data_bytes"])  # the entry counts it
        arrays.update(parts)
        shards.append({"name": name, "bytes": sum(parts.values()), "samples": entry.get("num_samples"),
                       "parts": dict(parts)})
    other = {"manifest.json": (item.path / "manifest.json").stat().st_size}
    for _, entry in item.done_entries():
        errors = item.path / str(entry.get("errors_file", ""))
        if entry.get("errors_file") and errors.is_file():
            other[errors.name] = errors.stat().st_size
    shard_total = sum(s["bytes"] or 0 for s in shards)
    tokens = sum(int(e.get("num_tokens", 0)) for _, e in item.done_entries())
    return {"kind": "store", "path": str(item.path), "total": shard_total + sum(other.values()),
            "shards_total": shard_total, "tokens": tokens, "by_array": dict(arrays.most_common()),
            "shards": shards, "other": other}


# ---- diff -----------------------------------------------------------------------------------------


def _ids(store: HiddenStateStore) -> list[str]:
    return [sid for shard in store.shard_readers() for sid in shard.ids()]


def diff_stores(path_a: Path, path_b: Path, max_listed: int = 10) -> dict[str, Any]:
    """Same sample ids in the same order, and bit-identical stored arrays and index fields?"""
    a, b = open_store(path_a), open_store(path_b)
    ids_a, ids_b = _ids(a), _ids(b)
    listed: list[str] = []
    notes = [f"header key {k!r} differs" for k in sorted(set(a.header) | set(b.header))
             if k not in HEADER_VOLATILE and a.header.get(k) != b.header.get(k)]
    if ids_a == ids_b:
        pairs = [(i, i) for i in range(len(ids_a))]
    else:
        first = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b, strict=False)) if x != y),
                     min(len(ids_a), len(ids_b)))
        only_a, only_b = set(ids_a) - set(ids_b), set(ids_b) - set(ids_a)
        at = [repr(ids[first]) if first < len(ids) else "(end)" for ids in (ids_a, ids_b)]
        listed.append(f"sample ids differ from position {first} ({at[0]} vs {at[1]}); {len(only_a)} ids only "
                      f"in A, {len(only_b)} only in B (contents are compared for the ids in both)")
        pos_b = {sid: i for i, sid in enumerate(ids_b)}
        pairs = [(i, pos_b[sid]) for i, sid in enumerate(ids_a) if sid in pos_b]
    readers_a, readers_b = a.shard_readers(), b.shard_readers()
    n_diff = 0
    for ia, ib in pairs:
        (pa, ra), (pb, rb) = a.locate(ia), b.locate(ib)
        found = sample_differences(readers_a[pa], ra, readers_b[pb], rb)
        if found:
            n_diff += 1
            if len(listed) < max_listed:
                listed.append(f"sample {ia} ({ids_a[ia]!r}; A {readers_a[pa].name} row {ra}, "
                              f"B {readers_b[pb].name} row {rb}): " + "; ".join(found))
    return {"kind": "store", "a": str(path_a), "b": str(path_b), "unit": "samples",
            "counts": [len(ids_a), len(ids_b)], "identical": ids_a == ids_b and n_diff == 0, "differing": n_diff,
            "differences": listed, "truncated": n_diff + (ids_a != ids_b) > len(listed), "notes": notes}


def sample_differences(sa: ShardReader, ra: int, sb: ShardReader, rb: int) -> list[str]:
    """How one sample differs between two shards: index fields, then each array's stored bytes."""
    info_a, info_b = sa.row_info(ra), sb.row_info(rb)
    out = [f"{k} {info_a[k]!r} vs {info_b[k]!r}" for k in info_a if info_a[k] != info_b.get(k)]
    for name in sorted(set(sa.specs) | set(sb.specs)):
        if name not in sa.specs or name not in sb.specs:
            out.append(f"{name} only in {'A' if name in sa.specs else 'B'}")
            continue
        xa = sa.read_rows(sa.specs[name], *sa.extent(ra, sa.specs[name].rows))
        xb = sb.read_rows(sb.specs[name], *sb.extent(rb, sb.specs[name].rows))
        if xa.dtype != xb.dtype or xa.shape != xb.shape:
            out.append(f"{name} is {xa.dtype}{list(xa.shape)} vs {xb.dtype}{list(xb.shape)}")
            continue
        # compare bytes, not values: NaN != NaN, and -0.0 == 0.0 would hide a difference
        # (a text-only sample has 0 audio rows: reshape(0, -1) would be ambiguous)
        width = int(np.prod(xa.shape[1:], dtype=np.int64))
        va, vb = xa.reshape(len(xa), width).view(np.uint8), xb.reshape(len(xb), width).view(np.uint8)
        rows = np.flatnonzero((va != vb).any(axis=1))
        if len(rows):
            out.append(f"{name}: {len(rows)} of {len(xa)} rows differ (first: row {rows[0]})")
    return out
