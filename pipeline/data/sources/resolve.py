"""From an ``--input`` spec to a format and its files, in a stable order.

Accepted specs (docs/inputs.md has one example command each):

- a ``.jsonl`` file; a glob (``data/**/*.jsonl``, ``shards/*.tar``, ``train-*.parquet``);
- a ``.parquet`` file or a directory of them (the Hub's layout, ``data/train-00000-of-00004.parquet``);
- a directory written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict with ``--split``);
- a WebDataset ``.tar`` shard or a directory of them;
- stage 1's output directory (its ``manifest.json``: only committed shards).

Files are sorted by path, so every job of an array sees the same list. ``--split NAME`` picks a
DatasetDict's split, or the files named ``NAME-*`` / ``NAME.*`` or under a ``NAME/`` folder.
"""

from __future__ import annotations

import glob
import json
import logging
from pathlib import Path

from pipeline.core.config import ConfigError
from pipeline.data.sources.arrow import ArrowFormat, saved_files
from pipeline.data.sources.base import Format
from pipeline.data.sources.jsonl import JsonlFormat
from pipeline.data.sources.parquet import ParquetFormat
from pipeline.data.sources.tar import TarFormat

log = logging.getLogger(__name__)
BY_SUFFIX: dict[str, type[Format]] = {".jsonl": JsonlFormat, ".json": JsonlFormat, ".parquet": ParquetFormat,
                                      ".tar": TarFormat, ".arrow": ArrowFormat}
DIR_SUFFIXES = (".jsonl", ".parquet", ".tar", ".arrow")  # not .json: Hub folders hold metadata json files
GLOB_CHARS = set("*?[")


class SourceError(ConfigError):
    """The input spec names nothing readable; the message says what was found instead."""


def _in_split(path: Path, root: Path, split: str) -> bool:
    rel = path.relative_to(root) if path.is_relative_to(root) else path
    name = path.name
    return split in rel.parts[:-1] or any(name.startswith(split + sep) for sep in ("-", ".", "_"))


def _by_suffix(files: list[Path], spec: str) -> type[Format]:
    kinds = {BY_SUFFIX.get(f.suffix.lower()) for f in files}
    if None in kinds or len(kinds) != 1:
        suffixes = sorted({f.suffix or f.name for f in files})
        raise SourceError(f"--input {spec}: expected files of one kind among {sorted(BY_SUFFIX)}, found {suffixes}")
    return kinds.pop()  # type: ignore[return-value]


def _saved_dataset(root: Path, split: str) -> tuple[list[Path], Path, str | None]:
    if (root / "dataset_dict.json").is_file():
        splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
        chosen = split or ("train" if "train" in splits else (splits[0] if len(splits) == 1 else ""))
        if chosen not in splits:
            raise SourceError(f"--input {root}: a DatasetDict with splits {splits}; choose one with --split")
        return saved_files(root / chosen), root / chosen, chosen
    if split:
        raise SourceError(f"--split {split}: {root} is a single saved Dataset without split names")
    return saved_files(root), root, None


def resolve(spec: str, split: str = "") -> tuple[type[Format], list[Path], Path, str | None]:
    """(format class, files, base folder for relative audio paths, the split used)."""
    from pipeline.core.stage1_layout import committed_files

    if GLOB_CHARS & set(spec):
        files = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"--input {spec}: the glob matches no file")
        prefix = Path(spec.split("*")[0].split("?")[0].split("[")[0])
        base = (prefix if spec.split("*")[0].endswith("/") else prefix.parent).resolve()
        if split:
            files = [f for f in files if _in_split(f, base, split)]
            if not files:
                raise SourceError(f"--split {split}: no file of {spec} is named {split}-* or lies under {split}/")
        return _by_suffix(files, spec), files, base, split or None
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"input {spec} does not exist")
    if path.is_file():
        if split:
            raise SourceError(f"--split {split}: {spec} is one file, it has no split names")
        return _by_suffix([path], spec), [path], path.parent.resolve(), None
    if (path / "manifest.json").is_file():
        if split:
            raise SourceError(f"--split {split}: {spec} is a stage 1 output directory, it has no split names")
        return JsonlFormat, committed_files(path, log), path.resolve(), None
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        files, base, chosen = _saved_dataset(path, split)
        return ArrowFormat, files, base.resolve(), chosen
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in DIR_SUFFIXES
                   and not any(p.startswith(".") for p in f.relative_to(path).parts))
    if split:
        files = [f for f in files if _in_split(f, path, split)]
    if not files:
        raise SourceError(f"--input {spec}: a directory with no {'/'.join(DIR_SUFFIXES)} files"
                          f"{f' of split {split}' if split else ''}, no save_to_disk dataset and no stage 1 manifest")
    return _by_suffix(files, spec), files, path.resolve(), split or None
