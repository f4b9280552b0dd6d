"""What stage 1 (regenerate) and stage 2 (dump) share as sharded stages over one input.

- :class:`ShardStageOptions`: the config fields both have (target, input, shards, audio splitting);
- :class:`ShardResult`: what one shard's run produced, in one vocabulary;
- :func:`shard_accounting`: the manifest fields that prove ``accepted + rejected == input`` for a
  shard, written once; a shard whose counts do not add up is never committed.

Manifest entries of both stages carry ``input_records``, ``accepted``, ``rejected`` and
``rejected_by_reason`` (rejections classed by :func:`pipeline.data.records.reason_key`). Stores of earlier
releases wrote ``rejected_by_field`` instead; :func:`entry_rejections` reads either.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pipeline.core.config import opt, require
from pipeline.core.shards import Shard
from pipeline.data.records import reason_key

# the manifest field of per-reason rejection counts; stores before this release wrote the other
REJECTED_BY_REASON = "rejected_by_reason"
OLD_REJECTED_BY_FIELD = "rejected_by_field"


@dataclass(kw_only=True)
class ShardStageOptions:
    """Config fields of every sharded stage over conversations (a dataclass base of their configs)."""

    target: str = opt("", "target model directory (Hugging Face layout; its tokenizer builds the prompts)")
    input: str = opt("", "input conversations (formats: docs/inputs.md)")
    num_shards: int = opt(1, "shards the input is split into (contiguous record ranges; one Slurm array task each)")
    shard_index: int | None = opt(None, "shard to run (default $SLURM_ARRAY_TASK_ID, else every shard in sequence)")
    split_long_audio: bool = opt(False, "split clips over the family's audio window (30 s) into pieces instead "
                                        "of rejecting them")

    def check_shard_options(self, output_flag: str) -> None:
        """The shared checks (call from ``__post_init__``); ``output_flag`` names the stage's output field."""
        for name in ("target", "input", output_flag):
            require(bool(getattr(self, name)), f"--{name} is required")
        require(self.num_shards >= 1, f"--num-shards must be >= 1, got {self.num_shards}")


@dataclass
class ShardResult:
    """What one shard's run produced; ``accepted + rejected == len(shard)`` (:func:`shard_accounting`)."""

    shard: Shard
    accepted: int = 0
    rejected: int = 0
    tokens: int = 0  # real tokens this run processed: generated (stage 1) or forwarded (stage 2); a resume
    #                  counts only what it did itself
    seconds: float = 0.0
    reasons: Counter = field(default_factory=Counter)
    output_records: int | None = None  # stage 1 with --n > 1 writes n records per accepted input


def shard_accounting(shard: Shard, accepted: int, rejections: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The manifest fields of a shard's counts; raises when accepted + rejected != the shard's inputs
    (a bug that must not be committed as complete)."""
    reasons = Counter(reason_key(r) for r in rejections)
    rejected = sum(reasons.values())
    if accepted + rejected != len(shard):
        raise RuntimeError(f"{shard.name}: {accepted} accepted + {rejected} rejected != {len(shard)} input "
                           "records; not committing it")
    return {"input_records": len(shard), "accepted": accepted, "rejected": rejected,
            REJECTED_BY_REASON: dict(sorted(reasons.items()))}


def result_of(shard: Shard, accounting: dict[str, Any], tokens: int, seconds: float) -> ShardResult:
    """The :class:`ShardResult` of a committed entry's counts."""
    return ShardResult(shard, accounting["accepted"], accounting["rejected"], tokens, seconds,
                       Counter(accounting[REJECTED_BY_REASON]))


def entry_rejections(entry: dict[str, Any]) -> dict[str, int]:
    """Per-reason rejection counts of a manifest entry, of this release or an earlier one."""
    return dict(entry.get(REJECTED_BY_REASON, entry.get(OLD_REJECTED_BY_FIELD, {})))
