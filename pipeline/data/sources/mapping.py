"""From a row of any format to a validated conversation :class:`~pipeline.data.records.Record`.

Two shapes of rows:

- **conversations**: a ``conversations`` (or ``messages``, or ``--conversations-column``) value in
  the README's format (a list, or that list as a JSON string; ShareGPT's ``from``/``value`` keys
  are accepted too). An audio item's ``audio`` is a path (relative to the dataset), a
  ``{"bytes", "path"}`` or ``{"array", "sampling_rate"}`` dict (the ``datasets`` Audio forms), or
  empty: then it takes the next clip of the audio column.
- **pairs** (ASR-style: an audio column and an optional text column): one user turn, the clip and
  an instruction, which is the row's ``--instruction-column`` value or one of ``--instruction``
  chosen by a hash of the record id (stable across runs, shards and machines). The text is kept
  as the record's ``reference`` (the benchmark's WER reference); stage 1 generates the answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.data.audio import Clip
from pipeline.data.records import Record, RecordError, Rejection, parse_record
from pipeline.data.sources.base import Row

DEFAULT_INSTRUCTIONS = ("Transcribe the speech.", "Repeat what the speaker says.", "What is said in the audio?",
                        "Write down exactly what you hear.")
TEXT_COLUMNS = ("text", "transcription", "transcript", "sentence", "normalized_text", "raw_text")
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user",
                  "assistant": "assistant"}
MAGIC = ((b"RIFF", ".wav"), (b"fLaC", ".flac"), (b"OggS", ".ogg"), (b"ID3", ".mp3"), (b"\xff\xfb", ".mp3"),
         (b"\xff\xf3", ".mp3"), (b"\xff\xf2", ".mp3"))


@dataclass(frozen=True)
class ColumnMapping:
    audio_column: str = "audio"
    text_column: str = ""  # "": the first of TEXT_COLUMNS the row has
    id_column: str = "id"
    conversations_column: str = ""  # "": conversations, else messages
    instructions: tuple[str, ...] = DEFAULT_INSTRUCTIONS
    instruction_column: str = ""


def _suffix(data: bytes, path: Any) -> str:
    for magic, suffix in MAGIC:
        if data.startswith(magic):
            return suffix
    return Path(path).suffix.lower() if isinstance(path, str) and Path(path).suffix else ".bin"


def to_audio(value: Any, name: str, base: Path, members: dict[str, bytes]) -> Path | Clip:
    """One audio value in any of its dataset forms; raises RecordError naming what is wrong."""
    if isinstance(value, (bytes, bytearray)):
        return Clip(name, data=bytes(value), suffix=_suffix(bytes(value), None))
    if isinstance(value, str) and value:
        if value in members:
            return Clip(f"{name} (member {value})", data=members[value], suffix=_suffix(members[value], value))
        path = Path(value)
        return (path if path.is_absolute() else base / path).resolve()
    if isinstance(value, dict):
        if value.get("bytes"):
            data = bytes(value["bytes"])
            return Clip(name, data=data, suffix=_suffix(data, value.get("path")))
        if value.get("array") is not None:
            return Clip(name, array=value["array"], sampling_rate=value.get("sampling_rate"), suffix=".wav")
        if isinstance(value.get("data"), str):  # OpenAI input_audio: base64 + format
            try:
                data = base64.b64decode(value["data"], validate=True)
            except ValueError as err:
                raise RecordError("audio", f"{name}: input_audio data is not base64 ({err})") from None
            return Clip(name, data=data, suffix="." + str(value.get("format", "wav")))
        if isinstance(value.get("path"), str) and value["path"]:
            return to_audio(value["path"], name, base, members)
        raise RecordError("audio", f"{name}: audio has neither bytes, array nor path (keys {sorted(value)})")
    raise RecordError("audio", f"{name}: expected a path, bytes or an Audio dict, got "
                               f"{'nothing' if value is None else type(value).__name__}")


def _jsonable(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


class Mapper:
    """Maps rows of one input to records; ``base`` resolves relative audio paths."""

    def __init__(self, mapping: ColumnMapping, base: Path, require_assistant: bool):
        self.m, self.base, self.require_assistant = mapping, base, require_assistant

    def record(self, row: Row, index: int) -> Record | Rejection:
        values = row.values or {}
        rid = row.id_hint if row.id_hint is not None else values.get(self.m.id_column)
        rid = None if rid is None else str(rid)
        if row.error is not None:
            return Rejection(index, row.line, str(row.file), rid, *row.error, row.where)
        try:
            rid, obj, raw = self._conversation(row, values, rid)
            turns = parse_record(obj, base=self.base, require_assistant=self.require_assistant)[1]
        except RecordError as err:
            return Rejection(index, row.line, str(row.file), rid, err.field, err.reason, row.where)
        return Record(rid, turns, index, row.line, str(row.file), row.digest, raw, row.where)

    def _conversation(self, row: Row, values: dict[str, Any], rid: str | None) -> tuple[str, dict, dict]:
        given = values.get(self.m.id_column)
        if row.id_hint is None and given is not None and not isinstance(given, (str, int)):
            raise RecordError(self.m.id_column, f"must be a string or an integer, got {type(given).__name__}")
        rid = rid if rid is not None else row.default_id
        extra = {k: v for k, v in values.items() if _jsonable(v) and k != self.m.id_column}
        column = self.m.conversations_column or next((c for c in ("conversations", "messages") if c in values), "")
        if column and column in values:
            convs, raw_convs = self._turns(row, values, column)
            raw = values if row.is_json else {"id": rid, **extra, "conversations": raw_convs}
            return rid, {"id": rid, "conversations": convs}, raw
        if self.m.audio_column not in values:
            raise RecordError(self.m.conversations_column or "conversations",
                              f"missing (and no audio column {self.m.audio_column!r} for a pair record; columns: "
                              f"{sorted(k for k in values if k != '__members__')}; see --audio-column)")
        return self._pair(row, values, rid, extra)

    def _clip_name(self, row: Row, column: str) -> str:
        return f"{row.file}{'' if row.where is None else ' ' + row.where} column {column}"

    def _turns(self, row: Row, values: dict[str, Any], column: str) -> tuple[list, list]:
        convs = values[column]
        if isinstance(convs, str):
            try:
                convs = json.loads(convs)
            except json.JSONDecodeError as err:
                raise RecordError(column, f"a string that is not JSON ({err.msg})") from None
        if not isinstance(convs, list) or not convs:
            raise RecordError("conversations" if column == "conversations" else column,
                              "must be a non-empty list of turns")
        clips = values.get(self.m.audio_column)
        clips = list(clips) if isinstance(clips, (list, tuple)) else ([] if clips is None else [clips])
        members = values.get("__members__", {})
        out, raw_out = [], []
        for i, turn in enumerate(convs):
            if isinstance(turn, dict) and "from" in turn and "role" not in turn:  # ShareGPT
                turn = {"role": SHAREGPT_ROLES.get(turn["from"], turn["from"]), "content": turn.get("value")}
            if not isinstance(turn, dict) or not isinstance(turn.get("content"), list):
                out.append(turn)
                raw_out.append(turn)
                continue
            items, raw_items = [], []
            for j, item in enumerate(turn["content"]):
                kind = item.get("type") if isinstance(item, dict) else None
                if kind in ("audio", "input_audio") or (isinstance(item, dict) and kind is None and "audio" in item):
                    value = item.get("audio", item.get("input_audio", item.get("audio_url")))
                    where = f"{column}[{i}].content[{j}].audio"
                    if value is None:
                        if not clips:
                            raise RecordError(where, f"no audio given and no clip left in column "
                                                     f"{self.m.audio_column!r}")
                        value = clips.pop(0)
                    try:
                        audio = to_audio(value, f"{self._clip_name(row, where)}", self.base, members)
                    except RecordError as err:
                        raise RecordError(where, err.reason) from None
                    items.append({"type": "audio", "audio": audio})
                    raw_items.append({"type": "audio", "audio": str(audio)})
                else:
                    items.append(item)
                    raw_items.append(item)
            out.append({**turn, "content": items})
            raw_out.append({**turn, "content": raw_items})
        return out, raw_out

    def _pair(self, row: Row, values: dict[str, Any], rid: str, extra: dict) -> tuple[str, dict, dict]:
        col = self.m.audio_column
        audio = to_audio(values[col], self._clip_name(row, col), self.base, values.get("__members__", {}))
        text_col = self.m.text_column or next((c for c in TEXT_COLUMNS if c in values), "")
        reference = values.get(text_col) if text_col else None
        if text_col and reference is not None and not isinstance(reference, str):
            raise RecordError(text_col, f"must be a string, got {type(reference).__name__}")
        if self.m.instruction_column:
            instruction = values.get(self.m.instruction_column)
            if not isinstance(instruction, str) or not instruction.strip():
                raise RecordError(self.m.instruction_column, "must be a non-empty string (--instruction-column)")
        else:
            pick = int(hashlib.sha256(rid.encode()).hexdigest()[:8], 16) % len(self.m.instructions)
            instruction = self.m.instructions[pick]
        content = [{"type": "audio", "audio": audio}, {"type": "text", "text": instruction}]
        obj = {"id": rid, "conversations": [{"role": "user", "content": content}]}
        raw_content = [{"type": "audio", "audio": str(audio)}, {"type": "text", "text": instruction}]
        extra = {k: v for k, v in extra.items() if k not in (col, text_col)}
        raw = {"id": rid, **extra, "reference": reference, "conversations": [{"role": "user", "content": raw_content}]}
        return rid, obj, raw
