"""``verify [--deep] [--repair]`` of ``python -m storage.inspect`` for a hidden-state store.

The checks themselves are :mod:`storage.validate`'s (manifest vs ``checksums.json``, file sizes
and hashes, index offsets vs array shapes; deep: chunk hashes, decoding, NaN/Inf). This module
adds what a damaged store needs before those can run at all (a shard directory, index or
``zarr.json`` that is gone would stop the reader), the errors files, a look at ``shards/`` for
directories the manifest does not list, the samples a bad chunk holds, and the repair: set the
bad shards aside under ``shards/.bad-<name>-<time>/`` and drop them from the manifest, so that
stage 2 redoes exactly those shards. Nothing is deleted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.core.durable import sha256_file
from storage.inspect.common import (
    SHARD_NAME,
    TMP_NAME,
    Inspected,
    Problem,
    entry_counts,
    planned_shards,
    requeue,
    shard_of,
)
from storage.layout import (
    ARRAYS_DIR,
    CHECKSUMS_NAME,
    INDEX_NAME,
    INDEX_SCHEMA,
    ROW_SPACES,
    SHARDS_DIR,
    read_index,
)
from storage.reader import ShardReader
from storage.store import HiddenStateStore

CHUNK_PATH = re.compile(rf"{ARRAYS_DIR}/(\w+)/c\.(\d+)")


class _VerifiableStore(HiddenStateStore):
    """The store without the shards in ``broken`` (the reader could not even open them)."""

    def __init__(self, path: str, broken: set[str]):
        self._broken = broken
        super().__init__(path, {})
        keep = [i for i, e in enumerate(self.entries.values()) if e["name"] not in broken]
        self.entries = {k: e for k, e in self.entries.items() if e["name"] not in broken}
        self._shards = [self._shards[i] for i in keep]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards]).tolist()

    def _load_shard(self, name: str) -> ShardReader:
        if name in self._broken:  # a placeholder, dropped again in __init__
            return ShardReader(name, "", INDEX_SCHEMA.empty_table(), self.specs, self.fs)
        return super()._load_shard(name)


def _unopenable(shard_dir: Path, arrays: list[str]) -> str | None:
    """Why the reader or the validator could not open a committed shard at all, if so."""
    if not shard_dir.is_dir():
        return "shard directory is missing"
    try:
        read_index((shard_dir / INDEX_NAME).read_bytes())
    except (OSError, pa.ArrowException) as err:
        return f"{INDEX_NAME} cannot be read ({err})"
    try:
        listing = json.loads((shard_dir / CHECKSUMS_NAME).read_text())
        if not {"files", "summary"} <= set(listing):
            return f"{CHECKSUMS_NAME} lacks 'files' or 'summary'"
    except FileNotFoundError:
        pass  # storage.validate reports it
    except (OSError, ValueError) as err:
        return f"{CHECKSUMS_NAME} cannot be read ({err})"
    missing = [a for a in arrays if not (shard_dir / ARRAYS_DIR / a / "zarr.json").is_file()]
    return f"{ARRAYS_DIR}/{missing[0]}/zarr.json is missing" if missing else None


def _with_samples(message: str, reader: ShardReader | None, store: HiddenStateStore) -> str:
    """Append which samples a bad chunk holds (validate names the chunk file only)."""
    match = CHUNK_PATH.search(message)
    if reader is None or match is None or match.group(1) not in store.specs:
        return message
    spec, ci = store.specs[match.group(1)], int(match.group(2))
    offsets = reader.col(f"{ROW_SPACES[spec.rows]}_offset")
    total = int(reader.col("num_tokens" if spec.rows == "tokens" else f"num_{spec.rows}").sum())
    lo, hi = ci * spec.chunk_rows, min((ci + 1) * spec.chunk_rows, total)
    if hi <= lo:
        return message
    first, last = (int(np.searchsorted(offsets, r, side="right")) - 1 for r in (lo, hi - 1))
    ids = reader.ids()[first:last + 1]
    which = f"sample {first}" if first == last else f"samples {first}-{last}"
    return f"{message} (rows {lo}-{hi - 1}: {which}, {', '.join(map(repr, ids[:3]))}{', ...' if len(ids) > 3 else ''})"


def _errors_file_problems(item: Inspected) -> list[Problem]:
    out = []
    for _, e in item.done_entries():
        name, errors = e["name"], e.get("errors_file")
        n_in, n_acc, n_rej = entry_counts(e)
        if n_in is not None and n_in != n_acc + n_rej:
            out.append(Problem(name, f"{name}: manifest says {n_in} input != accepted + rejected"))
        if not errors:
            continue
        path = item.path / errors
        if not path.is_file():
            out.append(Problem(name, f"{name}: {errors} is missing"))
        elif e.get("errors_sha256") and sha256_file(path) != e["errors_sha256"]:
            out.append(Problem(name, f"{name}: {errors} does not match its sha256 in the manifest"))
        elif len(path.read_bytes().splitlines()) != n_rej:
            out.append(Problem(name, f"{name}: {errors} has a line count other than the {n_rej} rejected"))
    return out


def _listing_notes(item: Inspected) -> list[str]:
    """What ``shards/`` holds beyond the committed shards (states, not damage)."""
    done = {e["name"] for _, e in item.done_entries()}
    shards_dir = item.path / SHARDS_DIR
    out = []
    for name in sorted(os.listdir(shards_dir)) if shards_dir.is_dir() else []:
        if TMP_NAME.fullmatch(name):
            out.append(f"{name}: a shard being written or interrupted; stage 2 resumes it")
        elif name.startswith(".bad-"):
            out.append(f"{name}: set aside by an earlier --repair (safe to delete once rerun)")
        elif SHARD_NAME.fullmatch(name) and name not in done:
            finished = (shards_dir / name / CHECKSUMS_NAME).is_file()
            out.append(f"{name}: not in the manifest, so readers ignore it"
                       + ("; finished, stage 2's rerun commits it" if finished else ""))
    planned = planned_shards(item)
    if planned is not None and len(done) < planned:
        out.append(f"{planned - len(done)} of {planned} planned shards are not committed yet")
    return out


def verify_store(item: Inspected, deep: bool = False) -> dict[str, Any]:
    """Every problem of the committed shards, each naming its shard (and sample when known)."""
    arrays = [a["name"] for a in item.manifest["arrays"]]
    problems: list[Problem] = []
    for _, entry in item.done_entries():
        why = _unopenable(item.path / SHARDS_DIR / entry["name"], arrays)
        if why:
            problems.append(Problem(entry["name"], f"{entry['name']}: {why}"))
    store = _VerifiableStore(str(item.path), {p.shard for p in problems if p.shard})
    try:
        found = store.validate(deep=deep)
    except Exception as err:  # damage the validator does not expect: report it, do not crash
        found = [f"validation stopped: {type(err).__name__}: {err}"]
    readers = {r.name: r for r in store.shard_readers()}
    problems += [Problem(shard_of(m), _with_samples(m, readers.get(shard_of(m) or ""), store)) for m in found]
    problems += _errors_file_problems(item)
    problems.sort(key=lambda p: p.shard or "")  # stable: each shard's findings stay in check order
    notes = _listing_notes(item)
    if not deep:
        notes.append("chunk files were checked by size only; --deep hashes and decodes them and scans for NaN/Inf")
    return {"kind": "store", "path": str(item.path), "deep": deep, "shards_checked": len(item.done_entries()),
            "samples_checked": len(store), "problems": [p.to_json() for p in problems], "notes": notes}


def repair_store(item: Inspected, problems: list[Problem]) -> dict[str, Any]:
    """Set every shard with a problem aside and drop it from the manifest; say what to rerun."""
    index_of = {e["name"]: i for i, e in item.done_entries()}
    entries = dict(item.done_entries())
    bad = sorted({index_of[p.shard] for p in problems if p.shard in index_of})
    actions = []
    for i in bad:
        entry = entries[i]
        paths = [item.path / SHARDS_DIR / entry["name"]]
        if entry.get("errors_file"):  # its rejections are redone with the shard
            paths.append(item.path / entry["errors_file"])
        actions.append(requeue(item, i, paths, item.path / SHARDS_DIR))
    return {"requeued": actions, "rerun": _rerun_commands(item, bad),
            "not_repairable": [p.message for p in problems if p.shard not in index_of]}


def _rerun_commands(item: Inspected, indices: list[int]) -> list[str]:
    dump = item.manifest.get("dump", {})
    inputs = dump.get("input", [])
    # a stage 1 directory was given as its shard files: point back at the directory
    inp = (str(Path(inputs[0]).parent) if len(inputs) > 1 or (inputs and SHARD_NAME.match(Path(inputs[0]).name))
           else (inputs[0] if inputs else "INPUT"))
    base = (f"python -m stages.dump --target {item.manifest.get('target', {}).get('path', 'TARGET')} "
            f"--input {inp} --store {item.path} --num-shards {planned_shards(item) or 'N'}")
    return [f"{base} --shard-index {i}  # + the original run's other flags (or its --config)" for i in indices]
