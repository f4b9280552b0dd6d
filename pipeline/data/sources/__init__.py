"""Inputs of every format behind one reader (docs/inputs.md).

    source = InputSource("data/train-*.parquet", mapping=ColumnMapping(text_column="sentence"),
                         subset=Subset(take=1000))
    for item in source.read(shard.start, shard.stop):   # Record or Rejection, one per index
        ...

One module per format (jsonl, parquet, arrow = ``save_to_disk``, tar = WebDataset), the spec
resolution (:mod:`.resolve`), the column mapping (:mod:`.mapping`) and the reader with subsets
and duplicate ids (:mod:`.reader`). :class:`SourceOptions` holds the flags every stage that reads
conversations shares.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import opt
from pipeline.data.sources.mapping import DEFAULT_INSTRUCTIONS, ColumnMapping
from pipeline.data.sources.reader import InputSource, Plan, Subset
from pipeline.data.sources.resolve import SourceError

__all__ = ["ColumnMapping", "InputSource", "Plan", "SourceError", "SourceOptions", "Subset", "open_source"]


@dataclass(kw_only=True)
class SourceOptions:
    """Input flags shared by stage 1 and the benchmark (a dataclass mixin of their configs)."""

    split: str = opt("", "the dataset's split to read (a DatasetDict's split, or files named SPLIT-* / under SPLIT/)")
    skip: int = opt(0, "leave out the first N records of the input (before sharding; recorded in the manifest)")
    take: int | None = opt(None, "read at most N records after --skip (before sharding)")
    take_fraction: float | None = opt(None, "read this fraction (0-1] of the records after --skip, from the start")
    audio_column: str = opt("audio", "column (or tar member) holding the audio of pair datasets, or the clips "
                                     "that conversation audio items without a path take in order")
    text_column: str = opt("", "column of the reference text of pair datasets (default: the first of text, "
                               "transcription, transcript, sentence, normalized_text, raw_text)")
    id_column: str = opt("id", "column of the record id (default ids: FILE-ROW; tar samples: their key)")
    conversations_column: str = opt("", "column holding conversations (default: conversations, else messages)")
    instruction: list[str] = opt(list(DEFAULT_INSTRUCTIONS), "instructions for pair records, repeatable; one is "
                                 "picked per record by a hash of its id", repeatable=True,
                                 comma_split=False)
    instruction_column: str = opt("", "column with each pair record's own instruction (instead of --instruction)")

    def column_mapping(self) -> ColumnMapping:
        return ColumnMapping(audio_column=self.audio_column, text_column=self.text_column,
                             id_column=self.id_column, conversations_column=self.conversations_column,
                             instructions=tuple(self.instruction) or DEFAULT_INSTRUCTIONS,
                             instruction_column=self.instruction_column)

    def subset(self) -> Subset:
        return Subset(self.skip, self.take, self.take_fraction)


def open_source(spec: str, options: SourceOptions) -> InputSource:
    """The input ``spec`` read with ``options``' column mapping, split and subset."""
    return InputSource(spec, mapping=options.column_mapping(), subset=options.subset(), split=options.split)
