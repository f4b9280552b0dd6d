"""WebDataset shards: ``.tar`` files whose members are grouped into samples by key
(``clip-00.flac`` + ``clip-00.json`` are sample ``clip-00``), split by ``webdataset``'s own rule.

A sample's values: the fields of its ``.json`` member, ``text`` from a ``.txt`` member, ``audio``
from its audio member (``{"bytes", "path"}``, as the ``datasets`` Audio feature stores it), and
every member's bytes under ``__members__`` (a conversation may name a member as its audio). The
key is the sample's id. Headers are read by seeking past member data, so counting a shard reads
only its headers; a member whose data cannot be read rejects its sample; a header that cannot be
read ends the shard with one unreadable record for the rest.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.data.sources.base import Format, Row, value_digest

AUDIO_EXTS = ("flac", "wav", "mp3", "ogg", "opus", "m4a", "webm", "aac")


def _samples(file: Path, tf: tarfile.TarFile) -> Iterator[tuple[str, list[tarfile.TarInfo]] | Exception]:
    """(key, members) per sample in file order; an exception last if a header is unreadable."""
    from webdataset.tariterators import base_plus_ext

    key, members = None, []
    try:
        for info in tf:
            if not info.isreg():
                continue
            prefix, _ = base_plus_ext(info.name)
            if prefix is None or Path(info.name).name.startswith("__"):
                continue  # webdataset skips these too (no key, or __meta__ files)
            if prefix != key and members:
                yield key, members
                members = []
            key = prefix
            members.append(info)
    except (tarfile.TarError, OSError) as err:
        if members:
            yield key, members
        yield err
        return
    if members:
        yield key, members


class TarFormat(Format):
    name = "webdataset"

    def count(self, file: Path) -> int:
        try:
            with tarfile.open(file, "r:") as tf:
                return sum(1 for _ in _samples(file, tf))
        except (tarfile.TarError, OSError):
            return 1

    def rows(self, file: Path, start: int, stop: int) -> Iterator[Row]:
        try:
            tf = tarfile.open(file, "r:")
        except (tarfile.TarError, OSError) as err:
            if start == 0 and stop >= 1:
                yield Row(file, 0, "(whole file)", f"{file.stem}-0", "", error=(
                    "file", f"not a readable tar file ({err}); counted as one rejected record"))
            return
        with tf:
            for position, item in enumerate(_samples(file, tf)):
                if position >= stop:
                    return
                if position < start:
                    continue
                if isinstance(item, Exception):
                    yield Row(file, position, f"sample {position} on", f"{file.stem}-{position}", "", error=(
                        "file", f"tar unreadable from sample {position} on ({item}); the rest of the file is "
                                "counted as one rejected record"))
                    return
                yield _row(file, tf, position, *item)

    def ids(self, file: Path) -> Iterator[str | None]:
        try:
            with tarfile.open(file, "r:") as tf:
                for item in _samples(file, tf):
                    yield None if isinstance(item, Exception) else item[0]
        except (tarfile.TarError, OSError):
            yield None


def _row(file: Path, tf: tarfile.TarFile, position: int, key: str, members: list[tarfile.TarInfo]) -> Row:
    row = Row(file, position, f"key {key}", key, "", id_hint=key)
    data: dict[str, bytes] = {}
    for info in members:
        try:
            fh = tf.extractfile(info)
            data[info.name] = fh.read() if fh is not None else b""
        except (tarfile.TarError, OSError, EOFError) as err:
            row.error = (Path(info.name).name, f"member {info.name} unreadable ({err})")
            return row
    values: dict = {"__members__": {}}
    for name, blob in data.items():
        ext = name[len(key) + 1 :].lower()
        values["__members__"][ext] = blob
        values["__members__"][Path(name).name] = blob
        if ext == "json":
            try:
                obj = json.loads(blob)
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                row.error = ("json", f"member {Path(name).name}: malformed JSON ({err})")
                return row
            if not isinstance(obj, dict):
                row.error = ("json", f"member {Path(name).name}: must be a JSON object, got {type(obj).__name__}")
                return row
            values.update({k: v for k, v in obj.items() if k != "__members__"})
        elif ext in ("txt", "text"):
            values.setdefault("text", blob.decode("utf-8", errors="replace"))
        elif ext.rsplit(".", 1)[-1] in AUDIO_EXTS and "audio" not in values:
            values["audio"] = {"bytes": blob, "path": Path(name).name}
    row.values = values
    row.digest = value_digest({k: v for k, v in values.items() if k != "__members__"} | {"__key__": key})
    return row
